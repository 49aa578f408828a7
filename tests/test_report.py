"""The HTML report, the draw/diff commands, and the demo's report opened in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

import fxsparse
from fxsparse._cli import main

from zoo import ZOO, build, make_masks


def seed_report(path: Path) -> Path:
    case = ZOO["seed_model"]
    model = build(case)
    out = fxsparse.transform(model, make_masks(model, case, "bool"))
    return fxsparse.viz.report(torch.fx.symbolic_trace(model), out, path, title="seed model")


def test_report_is_one_offline_file(tmp_path: Path) -> None:
    page = seed_report(tmp_path / "report.html").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    assert page.count("<svg") == 3  # diff, before, after
    for figure in ("figure-diff", "figure-before", "figure-after"):
        assert f"id='{figure}'" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from a network
    for name in ("linear.weight", "seq.0.weight", "seq.1.weight"):
        assert f"<td>{name}</td>" in page
    assert "added           12" in page


def test_masks_of_reads_an_output() -> None:
    mask = torch.rand(4, 4) > 0.5
    out = fxsparse.transform(nn.Sequential(nn.Linear(4, 4)), {"0": mask})
    (name, found), = fxsparse.viz.masks_of(out).items()  # fmt: skip
    assert name == "0.weight" and torch.equal(found, mask)


def test_report_without_a_renderer_keeps_the_dot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    page = seed_report(tmp_path / "report.html").read_text()
    assert "<svg" not in page and "digraph" in page and "pip install graphviz-pure" in page


def test_draw_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["draw", "zoo:ModelUnderTest", "--out", str(tmp_path / "graph.svg")]) == 0
    assert "<svg" in (tmp_path / "graph.svg").read_text()
    assert "nodes ->" in capsys.readouterr().out


def test_draw_command_on_a_saved_output(tmp_path: Path) -> None:
    out = fxsparse.transform(nn.Sequential(nn.Linear(4, 4)), {"0": torch.eye(4)})
    torch.save(out, tmp_path / "out.pt")
    assert main(["draw", str(tmp_path / "out.pt"), "--out", str(tmp_path / "out.svg")]) == 0
    assert "density 0.250" in (tmp_path / "out.dot").read_text()


def test_diff_command_with_masks_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"linear": torch.rand(16, 16) > 0.5}, tmp_path / "masks.pt")
    arguments = ["diff", "zoo:ModelUnderTest", "--masks", str(tmp_path / "masks.pt"), "--out", str(tmp_path / "d.svg")]
    assert main([*arguments, "--html", str(tmp_path / "r.html")]) == 0
    printed = capsys.readouterr().out
    assert "added            4" in printed and "report ->" in printed
    assert (tmp_path / "d.svg").exists() and (tmp_path / "r.html").exists()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("no_such_module:make", "cannot load the model factory"),
        ("nothing-here", "neither a file nor a model factory"),
        ("test_export_capture:Doubler", "torch.fx cannot trace Doubler"),
    ],
)
def test_commands_name_a_bad_source(source: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["draw", source])
    assert message in capsys.readouterr().err


def test_demo_report_in_headless_chromium(tmp_path: Path) -> None:
    """The report a newcomer opens: every picture present, nothing logged to the console."""
    assert main(["demo", "--out", str(tmp_path)]) == 0
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "headless Chromium is needed (apt-get install chromium; .ci/run installs it)"
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--dump-dom", (tmp_path / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    dom = result.stdout
    assert dom.count("<svg") == 3 and "Masked parameters" in dom
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], json.dumps(console)
