"""The fxsparse command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxsparse._cli import main


def test_demo_writes_and_checks_everything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "bitwise equal to torch.ao.pruning.FakeSparsity: yes" in printed
    assert "NO" not in printed
    for name in ("model.script.pt", "model.pt2", "state_dict.pt", "graph.py"):
        assert (tmp_path / name).stat().st_size > 0
    assert "torch.mul(" in (tmp_path / "graph.py").read_text()
    state = torch.load(tmp_path / "state_dict.pt")
    assert sum(k.endswith("_mask") for k in state) == 5
    assert len(printed.splitlines()) <= 8


def test_demo_rejects_a_bad_sparsity(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--sparsity", "1.5"])
    assert exited.value.code == 2
    assert "--sparsity must be between 0 and 1" in capsys.readouterr().err


def test_module_entry_point_help() -> None:
    result = subprocess.run([sys.executable, "-m", "fxsparse", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in result.stdout


@pytest.mark.parametrize(
    ("arguments", "message"),
    [(["--seed", "99999999999999999999"], "--seed must be between"), (["--out", __file__], "is a file")],
)
def test_demo_rejects_bad_arguments(arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["demo", *arguments])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("fxsparse 0.")
