"""tools/bench_train.py's fine-tune runs end to end in its quick mode: folded and FakeSparsity
fine-tuning of the small language model give identical loss curves and weights.

A smoke test of the tool and an end-to-end check of the folded mode's claim (a few steps of
AdamW with gradient clipping at 50 % and 2:4); its times are not checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def test_bench_train_quick_fine_tune_curves_are_identical(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    data = tmp_path / "train.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_train.py"), "--finetune", "--quick", "--json", str(data)],
        cwd=ROOT, capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(data.read_text())
    for pattern in ("50%", "2:4"):
        row = results["finetune"]["patterns"][pattern]
        assert row["first_differing_step"] is None, row
        assert row["final_weights_equal"], row
    assert "none: identical curves" in done.stdout
    assert "## Fine-tuning, folded" in done.stdout
