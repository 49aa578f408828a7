"""The fxsparse command line."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    assert main(["check", "out.pt", "--trust-source"]) == 0  # an fxsparse output checks the masks it applies
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


# -- files you did not make ---------------------------------------------------------------------


class WritesAMarker:
    """A pickle payload: loading it with torch.load(weights_only=False) creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("file_name", ["model.pt", "model.pt2", "model.script.pt"])
@pytest.mark.parametrize(
    "command",
    [
        ["check"],
        ["masks", "--out", "m.safetensors"],
        ["draw", "--out", "g.dot"],
        ["diff", "--out", "d.dot"],
        ["prune", "--method", "magnitude", "--out", "pruned"],
    ],
)
def test_model_files_load_only_with_trust_source(
    command: list[str], file_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    torch.save(WritesAMarker(tmp_path / "ran"), file_name)
    with pytest.raises(SystemExit) as exited:
        main([command[0], file_name, *command[1:]])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "--trust-source" in error and "runs any code" in error and "Traceback" not in error
    assert not (tmp_path / "ran").exists()  # the payload never ran


@pytest.mark.parametrize("command", ["check", "masks", "draw", "diff", "prune"])
def test_every_model_command_names_trust_source_and_why(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--trust-source" in text and "loading it runs any code its maker put in it" in text


def _console_script(folder: Path) -> Path:
    """What pip's console script does: sys.path[0] is its own folder, not the current one."""
    folder.mkdir()
    script = folder / "fxsparse_console.py"
    script.write_text("import sys\nfrom fxsparse._cli import main\nsys.exit(main())\n")
    return script


@pytest.mark.parametrize("how", ["console script", "python -m"])
def test_a_module_planted_in_the_working_folder_never_runs(how: str, tmp_path: Path) -> None:
    import os

    import fxsparse

    work = tmp_path / "downloads"
    work.mkdir()
    fxsparse.save_masks({"weight": torch.ones(2, 2)}, work / "m.safetensors")
    (work / "safetensors.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    launcher = [str(_console_script(tmp_path / "bin"))] if how == "console script" else ["-m", "fxsparse"]
    root = str(Path(__file__).parent.parent)
    environment = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, *launcher, "check", "torch.nn:Identity", "--masks", "m.safetensors"],
        cwd=work, env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "names no parameter" in result.stdout, result.stderr  # the real safetensors read the file
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "ran").exists()


def test_factories_leave_sys_path_as_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_factories_here.py").write_text("import torch\ndef make():\n    return torch.nn.Linear(2, 2)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    before = list(sys.path)
    assert main(["masks", "my_factories_here:make", "--out", "m.safetensors"]) == 0  # found in the working folder
    assert sys.path == before


def test_check_prints_names_from_a_file_escaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fxsparse

    monkeypatch.chdir(tmp_path)
    fake_row = "\x1b[1A\x1b[2K\r3 masks, no problems\n\x1b]0;title\x07"
    fxsparse.save_masks({"0.weight": torch.ones(8, 6), fake_row: torch.ones(1)}, "m.safetensors")
    assert main(["check", "test_cli:six_wide", "--masks", "m.safetensors"]) == 1
    printed = capsys.readouterr().out
    assert not any(c in printed for c in "\x1b\r\x07")
    assert r"\x1b[1A\x1b[2K\r3 masks, no problems\n\x1b]0;title\x07" in printed
    assert printed.splitlines()[-2:] == [
        "2 masks, 1 problems:",
        r"  - mask key '\x1b[1A\x1b[2K\r3 masks, no problems\n\x1b]0;title\x07' names no parameter or module of "
        "the model; valid names include: '0.weight', '0.bias', '2.weight', '2.bias', '0'",
    ]


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),  # torch.save's
        type("SafetensorError", (Exception,), {})("Error while serializing: I/O error: No space left on device"),
    ],
    ids=["OSError", "torch.save", "safetensors"],
)
def test_masks_command_on_a_full_disk_says_so(
    error: Exception, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What writing to a full disk raises, by writer (each seen on a 64 KiB tmpfs)."""
    import fxsparse

    def full_disk(*args: object, **kwargs: object) -> Path:
        raise error

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fxsparse, "save_masks", full_disk)
    with pytest.raises(SystemExit) as exited:
        main(["masks", "test_cli:six_wide", "--out", "m.safetensors"])
    assert exited.value.code == 2
    printed = capsys.readouterr().err
    assert "fxsparse masks: error: cannot write m.safetensors:" in printed and str(error) in printed


def test_cli_failures_are_sentences_with_exit_status_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whatever no command caught (here check itself failing): a sentence and status 2, never a traceback."""
    import fxsparse

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("\x1b[31mboom")

    monkeypatch.chdir(tmp_path)
    fxsparse.save_masks({"0.weight": torch.ones(8, 6)}, "m.safetensors")
    monkeypatch.setattr(fxsparse, "check", broken)
    with pytest.raises(SystemExit) as exited:
        main(["check", "test_cli:six_wide", "--masks", "m.safetensors"])
    assert exited.value.code == 2
    assert r"fxsparse check: error: RuntimeError: \x1b[31mboom" in capsys.readouterr().err


class BranchesOnValues(torch.nn.Module):
    """A forward torch.fx cannot trace (it branches on a tensor's value), as Hugging Face models' cannot be."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else x


def branches_on_values() -> torch.nn.Module:
    return BranchesOnValues()


def test_draw_of_a_model_fx_cannot_trace_points_to_the_viewer_in_python(capsys: pytest.CaptureFixture[str]) -> None:
    # draw --html pointed to fxsparse.viz.report, a diff of two graphs, for a single model's viewer.
    with pytest.raises(SystemExit) as exited:
        main(["draw", "test_cli:branches_on_values", "--html", "unused.html"])
    assert exited.value.code == 2
    printed = capsys.readouterr().err
    assert "torch.fx cannot trace BranchesOnValues" in printed
    assert "fxsparse.viz.view(fxsparse.transform(model, masks, example_kwargs=...), path='graph.html')" in printed
    with pytest.raises(SystemExit):
        main(["diff", "test_cli:branches_on_values", "--html", "unused.html"])
    assert "fxsparse.viz.report(" in capsys.readouterr().err


def test_draw_loads_a_transformers_models_exported_program(tmp_path: Path) -> None:
    # In a fresh process torch.export.load could not rebuild the model's output class
    # (transformers registers it on import): fxsparse demo --model gpt2-tiny's model.pt2 failed to load.
    import fxsparse

    import hf_zoo

    family = hf_zoo.FAMILIES["gpt2"]
    model, inputs = hf_zoo.build(family), family.inputs(1, 4)
    torch.export.save(fxsparse.transform(model, {}, emit="export", example_kwargs=inputs), tmp_path / "gpt2.pt2")
    environment = {**os.environ, "PYTHONPATH": str(Path(fxsparse.__file__).parent.parent)}
    result = subprocess.run(
        [sys.executable, "-m", "fxsparse", "draw", "gpt2.pt2", "--trust-source", "--html", "gpt2.html"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "<input type='search'" in (tmp_path / "gpt2.html").read_text()
