"""tools/bench_prune.py runs end to end in its quick mode and writes every part of its results.

A smoke test: the quick model is trained for a few steps, so its perplexities are noise;
only the structure of the JSON and the report is checked, never the numbers' order.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ("50%", "2:4")
# The quick Llama: one layer's q, k, v, o, gate, up and down projections (lm_head left out).
WEIGHTS = [
    f"model.layers.0.{module}.weight"
    for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
]  # fmt: skip


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_prune.py"), *args],
        cwd=ROOT, capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def test_bench_prune_quick_writes_perplexities_target_and_reconstruction_errors(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    data, report = tmp_path / "prune.json", tmp_path / "prune.md"
    done = run_tool("--quick", "--json", str(data), "--markdown", str(report))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(data.read_text())

    assert results["quick"] is True
    assert results["corpus"]["files"] > results["corpus"]["held_out_files"] > 0
    assert math.isfinite(results["dense_perplexity"]) and results["dense_perplexity"] > 1
    assert set(results["perplexity"]) == set(PATTERNS) == set(results["target"])
    for pattern in PATTERNS:
        rows = results["perplexity"][pattern]
        assert set(rows) == set(METHODS)
        for row in rows.values():
            assert math.isfinite(row["perplexity"])
            assert row["increase"] == pytest.approx(row["perplexity"] - results["dense_perplexity"])
            assert row["weights"] == len(WEIGHTS)
            assert row["sparsity"] == pytest.approx(0.5)  # every masked weight half pruned, at 50 % and 2:4
        assert rows["magnitude"]["increase_to_magnitude"] == pytest.approx(1.0)
        assert set(results["target"][pattern]) == {
            "wanda_within_a_third", "sparsegpt_within_a_third", "sparsegpt_at_most_wanda", "holds",
        }  # fmt: skip
    runs = {f"{method} {pattern}" for method in METHODS for pattern in PATTERNS}
    assert [row["weight"] for row in results["reconstruction_error"]] == WEIGHTS
    for row in results["reconstruction_error"]:
        assert set(row) == {"weight", "input_norm_max_to_median", *runs}
        assert all(0 < row[run] < math.inf for run in runs)
        assert row["input_norm_max_to_median"] >= 1

    text = report.read_text()
    for heading in ("## Held-out perplexity", "## Target", "## Reconstruction error"):
        assert heading in text

    # --from-json renders the same report without measuring.
    again = tmp_path / "again.md"
    done = run_tool("--from-json", str(data), "--markdown", str(again))
    assert done.returncode == 0, done.stderr[-3000:]
    assert again.read_text() == text
