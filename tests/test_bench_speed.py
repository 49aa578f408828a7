"""tools/bench_speed.py runs end to end in its quick mode, and tools/bench_gpu.py refuses clearly without CUDA.

Smoke tests: nothing is timed or compared, only that every section runs and is written.
The torch.compile children are left out (``--no-compile``) to keep the test short; the
quick run with them takes about a minute.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent
SECTIONS = ("setup", "forward", "training", "kernels", "memory")


def run_tool(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / script), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_bench_speed_quick_writes_every_section(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    data, report = tmp_path / "speed.json", tmp_path / "speed.md"
    done = run_tool("bench_speed.py", "--quick", "--no-compile", "--json", str(data), "--markdown", str(report),
                    timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(data.read_text())
    assert set(SECTIONS) <= set(results)
    assert results["machine"]["torch"] == torch.__version__
    assert {row["model"] for row in results["forward"]} == {"mlp", "llama"}
    for row in results["forward"]:
        assert {"dense", "fakesparsity", "masked", "frozen"} <= set(row["ratio_to_dense"])
    assert {row["model"] for row in results["training"]} == {"mlp_train", "llama"}
    assert {row["pattern"] for row in results["kernels"]} >= {"unstructured", "2:4"}
    assert results["memory"]["bytes"]["mask_packed_file"] < results["memory"]["bytes"]["mask_bool"]
    text = report.read_text()
    for heading in ("## Setup cost", "## Forward latency", "## Training step", "## Sparse kernels", "## Mask and"):
        assert heading in text

    # --from-json re-renders the report without measuring anything.
    again = tmp_path / "again.md"
    done = run_tool("bench_speed.py", "--from-json", str(data), "--markdown", str(again), timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert again.read_text() == text


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: bench_gpu.py would measure")
def test_bench_gpu_without_cuda_exits_2_with_a_message(tmp_path: Path) -> None:
    """Documented in tools/bench_gpu.py: no CUDA, nothing measured, status 2, a message on stderr."""
    out = tmp_path / "gpu.json"
    done = run_tool("bench_gpu.py", "--out", str(out), timeout=60)
    assert done.returncode == 2
    assert "needs an NVIDIA GPU with CUDA" in done.stderr
    assert not out.exists()
