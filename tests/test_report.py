"""The HTML report, the draw/diff commands, and the demo's report opened in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

import fxsparse
from fxsparse._cli import main

from chromium import Chromium
from zoo import ZOO, build, make_masks


def seed_report(path: Path) -> Path:
    case = ZOO["seed_model"]
    model = build(case)
    out = fxsparse.transform(model, make_masks(model, case, "bool"))
    return fxsparse.viz.report(torch.fx.symbolic_trace(model), out, path, title="seed model")


def test_report_is_one_offline_file(tmp_path: Path) -> None:
    page = seed_report(tmp_path / "report.html").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    assert page.count("<svg") == 4 and "id='fxv-data'" in page  # the viewer, and the diff, before, after pictures
    for figure in ("figure-diff", "figure-before", "figure-after"):
        assert f"id='{figure}'" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from a network
    for name in ("linear.weight", "seq.0.weight", "seq.1.weight"):
        assert f"<td>{name}</td>" in page
    assert "added           12" in page


def test_report_totals_and_unique_ids(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    masks = {"0": torch.eye(4), "2": torch.ones(2, 4)}
    before, after = torch.fx.symbolic_trace(model), fxsparse.transform(model, masks)
    page = fxsparse.viz.report(before, after, tmp_path / "r.html", graph_diff=fxsparse.viz.diff(before, after))
    text = page.read_text()
    # 24 weights, 12 kept; 24 multiply-adds per output, 12 skippable
    assert "<td>2 parameters</td><td>24 weights</td><td>0.500</td><td></td><td>24</td><td>12</td>" in text
    ids = re.findall(r'\bid="([^"]+)"', text)
    assert ids and len(ids) == len(set(ids))


def test_masks_of_reads_an_output() -> None:
    mask = torch.rand(4, 4) > 0.5
    out = fxsparse.transform(nn.Sequential(nn.Linear(4, 4)), {"0": mask})
    (name, found), = fxsparse.viz.masks_of(out).items()  # fmt: skip
    assert name == "0.weight" and torch.equal(found, mask)


def test_report_without_a_renderer_keeps_the_dot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, path=None: None)
    page = seed_report(tmp_path / "report.html").read_text()
    assert "</svg>\n</figure>" not in page and "digraph" in page and "pip install graphviz-pure" in page


def test_draw_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["draw", "zoo:ModelUnderTest", "--out", str(tmp_path / "graph.svg")]) == 0
    assert "<svg" in (tmp_path / "graph.svg").read_text()
    assert "nodes ->" in capsys.readouterr().out


def test_draw_command_on_a_saved_output(tmp_path: Path) -> None:
    out = fxsparse.transform(nn.Sequential(nn.Linear(4, 4)), {"0": torch.eye(4)})
    torch.save(out, tmp_path / "out.pt")
    assert main(["draw", str(tmp_path / "out.pt"), "--trust-source", "--out", str(tmp_path / "out.svg")]) == 0
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


def broken_factory() -> nn.Module:
    raise ValueError("no such width")


class RunsCode:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this ran",))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["diff", "zoo:ModelUnderTest", "--sparsity", "2"], "--sparsity must be between 0 and 1, got 2.0"),
        (["diff", "zoo:ModelUnderTest", "--masks", "missing.pt"], "--masks: no mask file at missing.pt"),
        (
            ["diff", "zoo:ModelUnderTest", "--masks", "code.pt"],
            "--masks: cannot read code.pt as a mask file: torch.load(weights_only=True) refused",
        ),
        (
            ["diff", "zoo:ModelUnderTest", "--masks", "list.pt"],
            "list.pt must hold a dict of parameter name -> tensor, got list",
        ),
        (
            ["diff", "zoo:ModelUnderTest", "--masks", "wrong.pt"],
            "cannot transform 'zoo:ModelUnderTest': mask key 'nope'",
        ),
        (["draw", "zoo:ZOO"], "'zoo:ZOO' is a dict object, not a function that makes a model"),
        (
            ["draw", "zoo:ModelUnderTest", "--depth", "abc"],
            "argument --depth: must be a whole number, 0 or more; got 'abc'",
        ),
        (["draw", "zoo:ModelUnderTest", "--out", "x.gif"], "--out x.gif: the suffix picks the format, and .gif is not"),
        (["draw", "zoo:ModelUnderTest", "--out", "x"], "--out x: the suffix picks the format, and no suffix is not"),
        (["diff", "zoo:ModelUnderTest", "--masks", "empty.pt"], "--masks: empty.pt holds no masks (an empty dict)"),
        (["draw", "test_report:broken_factory"], "'test_report:broken_factory' raised ValueError: no such width"),
        (["draw", "script.pt", "--trust-source"], "'script.pt' is TorchScript, which has no FX graph to draw"),
        (["draw", "torch.nn:Linear"], "'torch.nn:Linear' must be callable with no arguments"),
        (["draw", "zoo:ModelUnderTest", "--depth", "-1"], "argument --depth: must be 0 or more, got -1"),
        (["draw", "garbage.pt", "--trust-source"], "cannot load garbage.pt with torch.load"),
    ],
)
def test_commands_answer_bad_arguments(
    arguments: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save(RunsCode(), "code.pt")
    torch.save([torch.ones(1)], "list.pt")
    torch.save({"nope": torch.ones(1)}, "wrong.pt")
    torch.save({}, "empty.pt")
    torch.jit.save(torch.jit.script(nn.ReLU()), "script.pt")
    Path("garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert f"usage: fxsparse {arguments[0]}" in captured.err  # the command's own usage
    assert message in captured.err and "this ran" not in captured.out + captured.err
    assert "Traceback" not in captured.err


def test_factories_import_from_the_working_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As uvicorn and gunicorn do: a user's own module next to them is found by the console script too."""
    (tmp_path / "my_models_here.py").write_text("import torch\ndef make():\n    return torch.nn.Linear(2, 2)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".", str(tmp_path))])
    assert main(["draw", "my_models_here:make", "--out", "g.svg"]) == 0


def test_commands_say_when_they_cannot_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exited:
        main(["draw", "zoo:ModelUnderTest", "--out", str(tmp_path / "file" / "graph.svg")])
    assert exited.value.code == 2
    assert "cannot write" in capsys.readouterr().err


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
    assert dom.count("<svg") == 4 and "Masked parameters" in dom  # three pictures and the viewer
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], json.dumps(console)


def test_masks_of_every_output_form() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    masks = {"0": torch.rand(4, 4) > 0.5, "2": torch.rand(2, 4) > 0.5}
    example = (torch.randn(2, 4),)
    for emit in ("graph", "export", "parametrize"):
        found = fxsparse.viz.masks_of(fxsparse.transform(model, masks, emit=emit, example_inputs=example))
        assert sorted(found) == ["0.weight", "2.weight"], emit
        assert torch.equal(found["0.weight"].bool(), masks["0"]), emit
    # fxsparse.masks.of under its first name: the same refusal
    with pytest.raises(fxsparse.MaskError, match=r"^masks\.of takes fxsparse's output .* got int"):
        fxsparse.viz.masks_of(3)  # type: ignore[arg-type]


def test_viz_names_what_it_takes() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TypeError, match=r"got Sequential: trace it first, or pass fxsparse\.transform"):
        fxsparse.viz.draw(model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"diff takes a torch\.fx\.GraphModule"):
        fxsparse.viz.diff(model, model)  # type: ignore[arg-type]


def test_report_of_exported_programs(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    example = (torch.randn(2, 4),)
    before = fxsparse.transform(model, {}, emit="export", example_inputs=example)
    after = fxsparse.transform(model, {"0": torch.eye(4)}, emit="export", example_inputs=example)
    text = fxsparse.viz.report(before, after, tmp_path / "r.html").read_text()
    assert "<td>0.weight</td><td>4×4</td><td>0.250</td>" in text
    assert ">guards<" not in text and ">called<" not in text  # the legend shows the kinds drawn


def test_draw_command_on_an_exported_program(tmp_path: Path) -> None:
    program = fxsparse.transform(nn.Sequential(nn.Linear(4, 4)), {"0": torch.eye(4)}, emit="export",
                                 example_inputs=(torch.randn(2, 4),))  # fmt: skip
    torch.export.save(program, tmp_path / "model.pt2")
    assert main(["draw", str(tmp_path / "model.pt2"), "--trust-source", "--out", str(tmp_path / "g.dot")]) == 0
    assert "linear" in (tmp_path / "g.dot").read_text()


class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.conv(x)).mean(dim=(2, 3)))


def test_diff_command_masks_convolutions_and_says_what(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["diff", "test_report:SmallConvNet", "--html", "r.html"]) == 0
    captured = capsys.readouterr()
    assert "masking 2 weights (Conv2d ×1, Linear ×1) at 50% sparsity by magnitude" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]  # no diff.svg when only the report is asked
    assert "<td>conv.weight</td>" in (tmp_path / "r.html").read_text()


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Chromium]:
    browser = Chromium(tmp_path / "profile")
    yield browser
    browser.close()


# A module name Graphviz once read as an HTML-like label: a table whose cell links to script.
SCRIPT_LINK = "<<TABLE HREF='javascript:void(document&#46;title=&quot;pwned&quot;)'><TR><TD>click</TD></TR></TABLE>>"


def test_report_runs_no_script_when_a_module_box_is_clicked(tmp_path: Path, chromium: Chromium) -> None:
    model = nn.Sequential()
    model.add_module(SCRIPT_LINK, nn.Sequential(nn.Linear(4, 4)))
    out = fxsparse.transform(model, {f"{SCRIPT_LINK}.0": torch.eye(4)})
    page = fxsparse.viz.report(torch.fx.symbolic_trace(model), out, tmp_path / "report.html", title="named")
    chromium.open(page)
    assert chromium.evaluate("document.querySelectorAll('figure > svg').length") == 3  # pictures, not DOT text
    for figure in ("diff", "before", "after"):
        # The module's box label: a link when the name was read as markup, its text when drawn as text.
        label = f"#figure-{figure} g.cluster a, #figure-{figure} g.cluster text"
        chromium.click(label)
        time.sleep(0.5)  # a javascript: link runs as a task after the click
        assert chromium.evaluate("document.title") == "named", figure
        assert chromium.evaluate(f"document.querySelector('{label}').textContent") in ("click", SCRIPT_LINK)
    assert not [event for event in chromium.events if event["method"] == "Page.javascriptDialogOpening"]


def test_report_policy_forbids_script_and_remote_loads(tmp_path: Path, chromium: Chromium) -> None:
    """Should a model's string ever slip through the escaping, the page's own policy stops it."""
    chromium.open(seed_report(tmp_path / "report.html"))
    policy = chromium.evaluate("document.querySelector('meta[http-equiv=\"Content-Security-Policy\"]').content")
    script_src = next(part for part in policy.split(";") if "script-src" in part).split()[1:]
    assert "default-src 'none'" in policy and all(source.startswith("'sha256-") for source in script_src)
    tries = {
        "img-src": "const i = document.createElement('img'); i.src = 'https://example.invalid/p.png'; "
        "document.body.append(i);",
        "script-src-elem": "const s = document.createElement('script'); s.textContent = 'document.title = 1'; "
        "document.body.append(s);",
        "connect-src": "fetch('https://example.invalid/').catch(() => {});",
        "script-src-elem ": "const a = document.createElement('a'); a.href = 'javascript:document.title = 1'; "
        "document.body.append(a); a.click();",
    }
    for directive, code in tries.items():
        violated = chromium.evaluate(
            "new Promise(done => { document.addEventListener('securitypolicyviolation', "
            f"e => done(e.effectiveDirective), {{once: true}}); {code} setTimeout(() => done('allowed'), 3000); }})"
        )
        assert violated == directive.strip(), code
    assert chromium.evaluate("document.title") == "seed model"
    chromium.click("details summary")  # what the page does without script still works
    assert chromium.evaluate("document.querySelector('details').open") is True


def script_link_model() -> nn.Module:
    """A factory for the CLI: a model with a module named :data:`SCRIPT_LINK`."""
    model = nn.Sequential()
    model.add_module(SCRIPT_LINK, nn.Sequential(nn.Linear(4, 4)))
    return model


def test_diff_command_draws_module_names_as_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``fxsparse diff --html`` and ``--out``: the same escaping and policy as ``fxsparse.viz.report``."""
    monkeypatch.chdir(tmp_path)
    assert main(["diff", "test_report:script_link_model", "--out", "d.svg", "--html", "r.html"]) == 0
    page, picture = Path("r.html").read_text(), Path("d.svg").read_text()
    assert page.count("<svg") == 4 and "<meta http-equiv='Content-Security-Policy'" in page
    markup = re.sub(r"<script>.*?</script>", "", page, flags=re.DOTALL)  # the viewer's own code: JavaScript, not markup
    for text in (markup, picture):
        assert not re.search(r"<a\b|<image\b|href=", text)


def test_report_shows_no_picture_holding_links_images_or_handlers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever a renderer writes, a picture with more than shapes and text never reaches the page."""
    pictures = [
        '<svg><g><a xlink:href="javascript:alert(1)"><text>x</text></a></g></svg>',
        '<svg><g><image xlink:href="/etc/passwd"/></g></svg>',
        '<svg onload="alert(1)"><g><text>x</text></g></svg>',
    ]
    for picture in pictures:
        monkeypatch.setattr("fxsparse.viz._report.render_bytes", lambda dot, svg=picture: svg.encode())
        page = seed_report(tmp_path / "report.html").read_text()
        page = page.replace(page[page.index("<div class='fxv-frame'>") : page.rindex("</script>")], "")  # the viewer
        assert "alert" not in page and "/etc/passwd" not in page and "<svg" not in page, picture
        assert page.count("which a report never shows. The DOT source:") == 3
