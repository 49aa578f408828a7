"""The fxsparse command line."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxsparse._cli import main


def test_demo_writes_and_checks_everything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "captured with torch.fx" in printed
    assert "bitwise equal to torch.ao.pruning.FakeSparsity at two input shapes: yes" in printed
    assert "NO" not in printed
    for name in ("model.script.pt", "model.pt2", "state_dict.pt", "graph.py", "model.onnx", "report.html"):
        assert (tmp_path / name).stat().st_size > 0
    assert "torch.mul(" in (tmp_path / "graph.py").read_text()
    state = torch.load(tmp_path / "state_dict.pt")
    assert sum(k.endswith("_mask") for k in state) == 5
    assert len(printed.splitlines()) <= 10


def test_demo_on_a_tiny_gpt2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--model", "gpt2-tiny", "--out", str(tmp_path), "--sparsity", "0.75"]) == 0
    printed = capsys.readouterr().out
    assert "captured with torch.export (torch.fx cannot trace it): 9 mask*weight nodes" in printed
    assert "bitwise equal to torch.ao.pruning.FakeSparsity at two input shapes: yes" in printed
    assert "9 named mask initializers" in printed
    assert "NO" not in printed
    assert not (tmp_path / "model.script.pt").exists()
    state = torch.load(tmp_path / "state_dict.pt")
    assert state["transformer.h.0.mlp.c_fc.weight_mask"].float().mean() == 0.25
    assert "lm_head.weight_mask" in state  # the head tied to transformer.wte: one mask, under the name masked
    loaded = torch.export.load(tmp_path / "model.pt2")
    assert "transformer.wte.weight" in loaded.state_dict or "lm_head.weight" in loaded.state_dict


def test_demo_names_a_missing_package(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name))
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--model", "gpt2-tiny"])
    assert exited.value.code == 2
    assert "--model gpt2-tiny needs the transformers package: pip install transformers" in capsys.readouterr().err


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


def six_wide() -> torch.nn.Module:
    """A model whose one Linear takes 6 inputs: 2:4 groups do not fit, 3x3 blocks do not tile its 8 x 6 weight."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 6))


def test_check_without_masks_says_there_is_nothing_to_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["check", "test_cli:six_wide"])
    assert exited.value.code == 2
    printed = capsys.readouterr()
    assert "nothing to check" in printed.err and "--masks FILE" in printed.err and "no problems" not in printed.out
    import fxsparse

    torch.save(fxsparse.transform(six_wide(), {"0": torch.ones(8, 6)}), tmp_path / "out.pt")
    assert main(["check", "out.pt"]) == 0  # an fxsparse output checks the masks it applies
    assert "1 mask" in capsys.readouterr().out


def test_cli_errors_name_the_flag_and_python_errors_the_keyword(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fxsparse

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["masks", "test_cli:six_wide", "--recipe", "2:4"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "0.weight: its input dimension (6" in error and "leave it out (--exclude)" in error
    assert "exclude=" not in error
    with pytest.raises(fxsparse.MaskError, match=r"leave it out \(exclude=\)"):
        fxsparse.masks.n_m(six_wide())


def test_cli_warns_when_blocks_do_not_tile_a_weight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["masks", "test_cli:six_wide", "--recipe", "block", "--block", "3x3", "--out", "m.safetensors"]) == 0
    error = capsys.readouterr().err
    assert "--block 3x3 does not tile '0.weight' (shape (8, 6), blocked as 8x6)" in error
    assert "--block 3x3 does not tile '2.weight' (shape (6, 8), blocked as 6x8)" in error
    assert main(["masks", "test_cli:six_wide", "--recipe", "block", "--block", "2x2", "--out", "m.safetensors"]) == 0
    assert "does not tile" not in capsys.readouterr().err
