"""fxsparse.viz.view: its data (boxes, folded runs, plumbing, marks), its page's safety, and the page
itself in headless Chromium: first screens, expanding, search, toggles, diff marks, hostile names.

The browser tests share one Chromium (a module fixture) and save a screenshot of each step under
pytest's temporary folder (``--basetemp`` to keep them where you can look).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.fx
from torch import nn

import fxsparse
from fxsparse._cli import main
from fxsparse._demo import linear_like, tiny_lm
from fxsparse.viz._view_data import RUN_PIECES, view_data

from chromium import Chromium
from zoo import ZOO, build

# --------------------------------------------------------------------------------------------------------
# The data


class Looped(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def masked_looped(layers: int) -> tuple[nn.Module, torch.fx.GraphModule]:
    model = Looped(layers)
    return model, fxsparse.transform(model, {f"layers.{i}": torch.rand(4, 4) > 0.5 for i in range(layers)})


def test_view_folds_a_long_stack_into_runs_of_runs() -> None:
    model, out = masked_looped(100)
    data = view_data(out, torch.fx.symbolic_trace(model))
    boxes = data["boxes"]
    (layers,) = (b for b, box in enumerate(boxes) if box["path"] == "layers")
    assert boxes[layers]["stack"] == 100 and boxes[layers]["of"] == "Linear"
    shown = [boxes[b] for b in range(len(boxes)) if boxes[b]["parent"] == layers]
    assert [box["name"] for box in shown if "run" not in box] == ["0", "1", "99"]
    (run,) = (box for box in shown if "run" in box)
    assert run["run"] == 97 and run["name"] == "2 … 98"
    # every box opens onto a handful of boxes, never the whole run at once
    for number in range(len(boxes)):
        assert sum(box["parent"] == number for box in boxes) <= max(RUN_PIECES, 4)
    # each layer is in exactly one place, and the loop's relu between two layers goes with the run
    members = [box for box in boxes if box["name"].isdigit() and box["path"].startswith("layers.")]
    assert len(members) == 100
    relus = [node for node in data["nodes"] if node["target"] == "torch.relu"]
    assert len(relus) == 100
    inside = {node["box"] for node in relus}
    assert all(box == layers or boxes[box].get("run") for box in inside - {0})


def test_view_marks_what_a_diff_marks_and_boxes_with_changes_inside() -> None:
    model, out = masked_looped(3)
    before = torch.fx.symbolic_trace(model)
    data = view_data(out, before)
    graph_diff = fxsparse.viz.diff(before, out)
    marks = {node["name"]: node.get("mark") for node in data["nodes"]}
    assert {name for name, mark in marks.items() if mark == "added"} == set(graph_diff.added)
    assert {name for name, mark in marks.items() if mark == "changed"} == {new for _, new in graph_diff.changed}
    assert [data["nodes"][i]["name"] for i in data["changes"]] == [
        node.name for node in out.graph.nodes if marks[node.name]
    ]
    for box in data["boxes"]:
        if box["path"].startswith("layers."):
            assert box["mark"] == "changed"  # a Linear opened (changed) with its mask nodes (added) inside


def test_view_shows_removed_nodes_with_their_old_edges() -> None:
    model = nn.Sequential(nn.Linear(16, 16))
    out = fxsparse.transform(model, {"0": torch.rand(16, 16) > 0.5})
    frozen = fxsparse.freeze(out)  # masks folded in: the mask fetch and its product are gone
    data = view_data(frozen, out)
    graph_diff = fxsparse.viz.diff(out, frozen)
    removed = [i for i, node in enumerate(data["nodes"]) if node.get("mark") == "removed"]
    assert graph_diff.removed and sorted(data["nodes"][i]["name"] for i in removed) == sorted(graph_diff.removed)
    old_edges = [edge for edge in data["edges"] if len(edge) == 3]
    assert old_edges and all(edge[0] in removed or edge[1] in removed for edge in old_edges)
    assert {data["nodes"][i]["box"] for i in removed} == {1}  # in the Linear's box, where they were
    assert set(removed) <= set(data["changes"])


def test_view_of_exported_programs() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    example = {"example_inputs": (torch.randn(2, 4),)}
    before = fxsparse.transform(model, {}, emit="export", **example)
    after = fxsparse.transform(model, {"0": torch.eye(4)}, emit="export", **example)
    data = view_data(after, before)
    marks = {node["name"]: node.get("mark") for node in data["nodes"]}
    assert marks["_0_weight_mask"] == "added" and marks["linear"] == "changed" and marks["relu"] is None
    assert data["sparsity"]["0.weight"]["density"] == "0.250" and data["sparsity"]["0.weight"]["pattern"] == "1:4"
    assert next(node for node in data["nodes"] if node["name"] == "linear")["shape"] == "float32[2, 4]"


def test_view_keeps_a_tied_weight_read_under_another_alias_unchanged() -> None:
    case = ZOO["tied_embedding_head"]
    model = build(case)
    example = {"example_inputs": case.inputs()}
    before = fxsparse.transform(model, {}, capture="export", **example)
    after = fxsparse.transform(model, {"lm_head.weight": torch.rand(20, 8) > 0.5}, capture="export", **example)
    data = view_data(after, before)
    assert not [node for node in data["nodes"] if node.get("mark") == "removed"]
    fetches = [node for node in data["nodes"] if node["op"] == "get_attr" and node["target"] == "embed.weight"]
    assert fetches == [] or all(node.get("mark") is None for node in fetches)


def test_view_shows_sparsity_and_shapes_of_a_masked_weight() -> None:
    demo = tiny_lm(0)
    masks = {name: torch.ones(demo.model.get_submodule(name).weight.shape, dtype=torch.bool) for name in ["lm_head"]}
    masks["lm_head"][:, ::2] = False  # half the input columns pruned
    out = fxsparse.transform(demo.model, masks, example_kwargs=demo.inputs, capture="export")
    data = view_data(out)
    assert data["sparsity"]["lm_head.weight"]["density"] == "0.500"
    assert data["sparsity"]["lm_head.weight"]["pattern"] == "columns"
    rows, columns = demo.model.lm_head.weight.shape
    assert data["sparsity"]["lm_head.weight"]["multiply-adds skipped"] == f"{rows * columns // 2:,}"
    (mask,) = (node for node in data["nodes"] if node.get("role") == "mask")
    assert mask["shape"] == f"bool[{rows}, {columns}]"
    ids = next(node for node in data["nodes"] if node["op"] == "placeholder")
    assert ids["shape"] == "int64[4, 16]"


def test_view_shows_the_layout_freeze_chose() -> None:
    model = nn.Sequential(nn.Linear(64, 64))
    out = fxsparse.transform(model, {"0": torch.rand(64, 64) > 0.9})
    frozen = fxsparse.freeze(out, layout="csr")
    data = view_data(frozen)
    layouts = {node["role"]: node["info"]["kernel layout"] for node in data["nodes"] if "choice" in str(node) or
               "kernel layout" in node.get("info", {})}  # fmt: skip
    assert layouts["sparse"] == "csr" and set(layouts.values()) == {"csr"}


def test_view_hides_plumbing_of_a_language_model() -> None:
    pytest.importorskip("transformers")
    import hf_zoo

    llama = hf_zoo.FAMILIES["llama"]
    model = hf_zoo.build(llama)
    out = fxsparse.transform(model, hf_zoo.random_masks(model), example_kwargs=llama.inputs(2, 8))
    data = view_data(out)
    plumbing = [node for node in data["nodes"] if node.get("plumbing")]
    targets = {node["target"] for node in plumbing}
    assert "torch.ops.aten._assert_tensor_metadata.default" in targets  # shape assertions
    assert "torch.ops.aten.arange.default" in targets  # position ids, attention mask
    assert not [node for node in plumbing if node.get("role") in ("weight", "mask", "masked", "opened")]
    assert not [node for node in plumbing if node["target"].startswith("torch.ops.aten.linear")]
    assert not [node for node in plumbing if node["op"] in ("placeholder", "output")]


HOSTILE = [
    "</script><script>document['title']='pwned'</script>",
    "javascript:document['title']='pwned'",
    "<img src=x onerror=document['title']='pwned'>",
    "&lt;b&gt;\u2028\u2029<!--",
]


def hostile_model() -> nn.Module:
    model = nn.Sequential()
    for name in HOSTILE:
        model.add_module(name, nn.Sequential(nn.Linear(4, 4)))
    return model


def hostile_view(path: Path) -> Path:
    model = hostile_model()
    out = fxsparse.transform(model, {f"{HOSTILE[0]}.0": torch.eye(4)})
    return fxsparse.viz.view(out, torch.fx.symbolic_trace(model), path, title=HOSTILE[0])


def test_view_page_escapes_names_and_allows_only_its_own_scripts(tmp_path: Path) -> None:
    text = hostile_view(tmp_path / "graph.html").read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", text, flags=re.DOTALL)
    assert text.lower().count("</script") == len(scripts) + 1  # the two scripts and the data block, nothing else
    (policy,) = re.findall(r'http-equiv=\'Content-Security-Policy\' content="([^"]*)"', text)
    script_src = next(part for part in policy.split(";") if part.strip().startswith("script-src")).split()[1:]
    hashes = [f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts]
    assert script_src == hashes and "default-src 'none'" in policy and "unsafe" not in " ".join(script_src)
    (block,) = re.findall(r"<script type='application/json' id='fxv-data'>(.*?)</script>", text, flags=re.DOTALL)
    assert not re.search("[<>&\u2028\u2029]", block)
    data = json.loads(block)
    assert {box["name"] for box in data["boxes"]} >= set(HOSTILE)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)


def test_report_without_graphviz_holds_the_viewer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "graphviz" else real(name, *a))
    monkeypatch.setitem(sys.modules, "graphviz", None)  # import graphviz fails
    model = nn.Sequential(nn.Linear(4, 4))
    page = fxsparse.viz.report(torch.fx.symbolic_trace(model), fxsparse.transform(model, {"0": torch.eye(4)}),
                               tmp_path / "r.html")  # fmt: skip
    text = page.read_text()
    assert "id='fxv-data'" in text and "<figure" not in text
    assert "pip install 'fxsparse[viz]'" in text and "<td>0.weight</td>" in text


def test_draw_command_writes_the_viewer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["draw", "zoo:ModelUnderTest", "--html", "graph.html"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph.html"]  # no picture when only the viewer is asked
    assert "<input type='search'" in Path("graph.html").read_text()


# --------------------------------------------------------------------------------------------------------
# In the browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    chromium = Chromium(tmp_path_factory.mktemp("profile"))
    chromium.call("Emulation.setDeviceMetricsOverride", width=1280, height=800, deviceScaleFactor=1, mobile=False)
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The viewer of the demo's model, a tiny GPT-2 and a tiny Llama, each a diff against no masks."""
    folder = tmp_path_factory.mktemp("pages")
    made = {}
    demo = tiny_lm(0)
    masks = {name: torch.rand(demo.model.get_submodule(name).weight.shape) > 0.5 for name in linear_like(demo.model)}
    before = fxsparse.transform(demo.model, {}, example_kwargs=demo.inputs)
    out = fxsparse.transform(demo.model, masks, example_kwargs=demo.inputs)
    made["demo"] = fxsparse.viz.view(out, before, folder / "demo.html", title="demo")
    if importlib.util.find_spec("transformers") is not None:
        import hf_zoo

        for name in ("gpt2", "llama"):
            family = hf_zoo.FAMILIES[name]
            model = hf_zoo.build(family)
            example = {"example_kwargs": family.inputs(2, 8)}
            before = fxsparse.transform(model, {}, **example)
            out = fxsparse.transform(model, hf_zoo.random_masks(model), **example)
            made[name] = fxsparse.viz.view(out, before, folder / f"{name}.html", title=name)
    return made


def page_of(pages: dict[str, Path], name: str) -> Path:
    if name not in pages:
        pytest.skip("needs transformers")
    return pages[name]


def open_viewer(browser: Chromium, page: Path) -> None:
    browser.open(page)
    deadline = time.monotonic() + 30
    while not browser.evaluate("document.body.hasAttribute('data-ready')"):
        assert time.monotonic() < deadline, "the viewer never drew its first screen"
        time.sleep(0.02)
    assert problems(browser) == []


def problems(browser: Chromium) -> list[Any]:
    """Script errors, console messages and policy violations the page caused."""
    kinds = ("Runtime.exceptionThrown", "Runtime.consoleAPICalled", "Log.entryAdded", "Page.javascriptDialogOpening")
    return [event for event in browser.events if event.get("method") in kinds]


def redrawn(browser: Chromium, action: Callable[[], None]) -> None:
    """Do ``action`` and wait until the viewer has laid out and drawn again."""
    browser.evaluate(
        "(window.fxvDrawn = new Promise(done => document.getElementById('fxv').addEventListener('fxv-drawn', "
        "() => requestAnimationFrame(() => done(1)), {once: true})), 0)"
    )
    action()
    assert browser.evaluate("Promise.race([window.fxvDrawn, new Promise(done => setTimeout(() => done(0), 10000))])")


def click_item(browser: Chromium, kind: str, starts: str) -> str:
    """A real click on the drawn box or node (``kind``: fxv-box, fxv-node) whose first line starts with ``starts``;
    returns its key."""
    key = browser.evaluate(
        f"(() => {{ const g = [...document.querySelectorAll('.{kind}')].find(g => "
        f"g.querySelector('text').textContent.startsWith({json.dumps(starts)}));"
        " if (!g) return null; const key = g.getAttribute('data-key');"
        " document.getElementById('fxv').fxv.centreOn(key); return key; })()"
    )
    assert key, f"no {kind} starting {starts!r}: {labels(browser, kind)}"
    time.sleep(0.1)  # the view moves on the next frame
    browser.click(f".{kind}[data-key='{key}'] rect")
    return str(key)


def labels(browser: Chromium, kind: str) -> list[str]:
    return list(
        browser.evaluate(f"[...document.querySelectorAll('.{kind}')].map(g => g.querySelector('text').textContent)")
    )


def smallest_text_px(browser: Chromium) -> float:
    return float(
        browser.evaluate(
            "Math.min(...[...document.querySelectorAll('#fxv svg text')].map(t => "
            "parseFloat(getComputedStyle(t).fontSize) * t.getScreenCTM().a))"
        )
    )


def all_on_screen(browser: Chromium) -> bool:
    return bool(
        browser.evaluate(
            "(() => { const c = document.querySelector('.fxv-canvas').getBoundingClientRect();"
            " return [...document.querySelectorAll('.fxv-item')].every(g => { const r = g.getBoundingClientRect();"
            " return r.left >= c.left && r.right <= c.right && r.top >= c.top && r.bottom <= c.bottom; }); })()"
        )
    )


FIRST_SCREENS = {
    "demo": ["embed: Embedding", "blocks: ModuleList", "norm: LayerNorm", "lm_head: Linear"],
    "gpt2": [
        "wte: Embedding",
        "wpe: Embedding",
        "drop: Dropout",
        "h: ModuleList",
        "ln_f: LayerNorm",
        "lm_head: Linear",
    ],
    "llama": ["embed_tokens: Embedding", "layers: ModuleList", "norm: LlamaRMSNorm", "lm_head: Linear"],
}
STACKS = {"demo": "×2 Sequential", "gpt2": "×2 GPT2Block", "llama": "×2 LlamaDecoderLayer"}


@pytest.mark.parametrize("name", list(FIRST_SCREENS))
def test_first_screen_is_the_top_level_structure_readable(
    name: str, browser: Chromium, pages: dict[str, Path], tmp_path: Path
) -> None:
    open_viewer(browser, page_of(pages, name))
    browser.screenshot(tmp_path / f"{name}-first.png")
    boxes = labels(browser, "fxv-box")
    assert sorted(boxes) == sorted(FIRST_SCREENS[name]), boxes
    texts = browser.evaluate("[...document.querySelectorAll('.fxv-box text')].map(t => t.textContent)")
    assert any(text.startswith(STACKS[name]) for text in texts), texts
    assert smallest_text_px(browser) >= 10
    assert all_on_screen(browser)  # nothing to scroll or zoom to on the first screen


def test_llama_layer_opens_down_to_its_q_proj_mask(browser: Chromium, pages: dict[str, Path], tmp_path: Path) -> None:
    open_viewer(browser, page_of(pages, "llama"))
    for box in ("layers: ModuleList", "0: LlamaDecoderLayer", "self_attn: LlamaAttention", "q_proj: Linear"):
        redrawn(browser, lambda box=box: click_item(browser, "fxv-box", box))
    browser.screenshot(tmp_path / "llama-q_proj.png")
    key = click_item(browser, "fxv-node", "weight_mask")  # inside q_proj's box, without its path
    node = browser.evaluate(f"document.getElementById('fxv').fxv.nodes[{key[1:]}]")
    assert node["role"] == "mask" and node["info"]["param"] == "model.layers.0.self_attn.q_proj.weight"
    assert node["name"] == "model_layers_0_self_attn_q_proj_weight_mask"
    panel = browser.evaluate("document.querySelector('.fxv-detail').textContent")
    assert re.search(r"density0\.\d{3}patternunstructured", panel.replace(" ", "")), panel
    assert "multiply-adds skipped" in panel
    assert smallest_text_px(browser) >= 10
    assert problems(browser) == []


def search(browser: Chromium, text: str) -> None:
    browser.evaluate("document.querySelector('.fxv-bar input[type=search]').focus()")
    browser.call("Input.insertText", text=text)
    redrawn(browser, lambda: browser.call(
        "Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13, text="\r"
    ))  # fmt: skip


def test_search_finds_a_parameter_and_opens_the_boxes_around_it(
    browser: Chromium, pages: dict[str, Path], tmp_path: Path
) -> None:
    open_viewer(browser, page_of(pages, "llama"))
    search(browser, "model.layers.1.mlp.down_proj.weight")
    browser.screenshot(tmp_path / "llama-search.png")
    selected = browser.evaluate("document.getElementById('fxv').fxv.state.selected")
    assert browser.evaluate(f"document.getElementById('fxv').fxv.nodes[{selected[1:]}].target") == (
        "model.layers.1.mlp.down_proj.weight"
    )
    drawn = browser.evaluate(f"!!document.querySelector('.fxv-selected[data-key=\"{selected}\"]')")
    assert drawn
    assert "down_proj.weight" in browser.evaluate("document.querySelector('.fxv-detail').textContent")
    assert browser.evaluate("document.querySelector('.fxv-found').textContent").startswith("1 of")


def test_plumbing_is_hidden_until_asked(browser: Chromium, pages: dict[str, Path], tmp_path: Path) -> None:
    open_viewer(browser, page_of(pages, "llama"))
    hidden = labels(browser, "fxv-node")
    assert not [label for label in hidden if label.startswith(("arange", "sym_size", "_assert"))]
    redrawn(browser, lambda: browser.click(".fxv-plumbing"))
    browser.screenshot(tmp_path / "llama-plumbing.png")
    shown = labels(browser, "fxv-node")
    assert [label for label in shown if label.startswith("arange")] and len(shown) > len(hidden)
    redrawn(browser, lambda: browser.click(".fxv-plumbing"))
    assert labels(browser, "fxv-node") == hidden


@pytest.mark.parametrize("name", ["demo", "llama"])
def test_diff_mode_marks_every_change(name: str, browser: Chromium, pages: dict[str, Path], tmp_path: Path) -> None:
    open_viewer(browser, page_of(pages, name))
    viewer = "document.getElementById('fxv').fxv"
    # collapsed boxes are marked when anything inside them changed, and only then
    boxes = browser.evaluate(
        f"[...document.querySelectorAll('.fxv-box')].map(g => [!!{viewer}.boxes[g.getAttribute('data-key').slice(1)]"
        ".mark, g.getAttribute('data-mark')])"
    )
    assert boxes and all(bool(changed) == bool(mark) for changed, mark in boxes)
    redrawn(browser, lambda: browser.click(".fxv-diff"))
    assert browser.evaluate("document.querySelectorAll('[data-mark]').length") == 0
    assert browser.evaluate("document.querySelector('.fxv-changelist').hidden") is True
    redrawn(browser, lambda: browser.click(".fxv-diff"))
    # every box open, plumbing shown: each change in the list is drawn, with its mark
    redrawn(browser, lambda: browser.evaluate(
        f"{viewer}.boxes.forEach((b, i) => {viewer}.state.expanded.add(i)), {viewer}.relayout(), 0"
    ))  # fmt: skip
    redrawn(browser, lambda: browser.click(".fxv-plumbing"))
    browser.click(".fxv-fit")
    time.sleep(0.2)
    browser.screenshot(tmp_path / f"{name}-diff-open.png")
    unmarked = browser.evaluate(
        f'{viewer}.changes.filter(i => {{ const g = document.querySelector(`.fxv-node[data-key="n${{i}}"]`);'
        f" return !g || g.getAttribute('data-mark') !== {viewer}.nodes[i].mark; }})"
    )
    assert unmarked == [] and browser.evaluate(f"{viewer}.changes.length") > 0
    # the list of changes jumps to one
    redrawn(browser, lambda: browser.click(".fxv-changes li:nth-child(3) button"))
    selected = browser.evaluate(f"{viewer}.state.selected")
    assert selected == browser.evaluate("document.querySelector('.fxv-changes li:nth-child(3) button').dataset.key")


def test_wheel_zooms_pinch_zooms_touchpad_pans_and_fit_fits(browser: Chromium, pages: dict[str, Path]) -> None:
    open_viewer(browser, page_of(pages, "demo"))
    view = "document.getElementById('fxv').fxv.state.view"

    def wheel(dx: float, dy: float, ctrl: bool = False) -> dict[str, float]:
        browser.call("Input.dispatchMouseEvent", type="mouseWheel", x=400, y=400, deltaX=dx, deltaY=dy,
                     modifiers=2 if ctrl else 0)  # fmt: skip
        time.sleep(0.1)
        return dict(browser.evaluate(f"({{...{view}}})"))

    start = dict(browser.evaluate(f"({{...{view}}})"))
    zoomed = wheel(0, -100)  # a mouse wheel's step
    assert zoomed["k"] > start["k"]
    pinched = wheel(0, 20, ctrl=True)  # a touchpad's pinch arrives as ctrl + wheel
    assert pinched["k"] < zoomed["k"]
    panned = wheel(15, 12.5)  # a touchpad's two-finger scroll
    assert panned["k"] == pinched["k"] and (panned["x"], panned["y"]) == (pinched["x"] - 15, pinched["y"] - 12.5)
    for _ in range(3):
        wheel(0, -100)
    browser.click(".fxv-fit")
    time.sleep(0.1)
    assert all_on_screen(browser)


def test_keyboard_opens_a_box(browser: Chromium, pages: dict[str, Path]) -> None:
    open_viewer(browser, page_of(pages, "demo"))
    key = browser.evaluate(
        "(() => { const g = [...document.querySelectorAll('.fxv-box')].find(g => g.getAttribute('aria-label')"
        ".startsWith('blocks: ModuleList')); g.focus(); return g.getAttribute('data-key'); })()"
    )
    redrawn(browser, lambda: browser.call(
        "Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13, text="\r"
    ))  # fmt: skip
    assert browser.evaluate(f"!!document.querySelector('.fxv-group[data-key=\"g{key[1:]}\"]')")


def test_hostile_names_run_nothing(browser: Chromium, tmp_path: Path) -> None:
    page = hostile_view(tmp_path / "graph.html")
    open_viewer(browser, page)
    assert browser.evaluate("document.title") == HOSTILE[0]
    groups = browser.evaluate("[...document.querySelectorAll('.fxv-header title')].map(t => t.textContent)")
    assert sorted(groups) == sorted(f"collapse {name}" for name in HOSTILE)  # the first screen opens them
    for name in HOSTILE:  # closed with a click on the label, opened again with a click on the box
        key = browser.evaluate(
            "[...document.querySelectorAll('.fxv-group')].find(g => g.querySelector('.fxv-header title').textContent"
            f" === {json.dumps(f'collapse {name}')}).getAttribute('data-key')"
        )
        browser.evaluate(f"document.getElementById('fxv').fxv.centreOn('{key}')")
        time.sleep(0.1)
        redrawn(browser, lambda key=key: browser.click(f".fxv-group[data-key='{key}'] > rect.fxv-header"))
        redrawn(browser, lambda name=name: click_item(browser, "fxv-box", name))
    search(browser, HOSTILE[2])
    browser.screenshot(tmp_path / "hostile.png")
    time.sleep(0.3)
    titles = browser.evaluate("[...document.querySelectorAll('#fxv svg title')].map(t => t.textContent)")
    assert set(titles) >= {f"collapse {name}" for name in HOSTILE}  # each name drawn as the text it is
    assert browser.evaluate("document.querySelector('.fxv-detail h2').textContent") == HOSTILE[2]  # found
    assert browser.evaluate("document.title") == HOSTILE[0]
    assert browser.evaluate("document.querySelectorAll('img, a, script:not([type])').length") == 2  # its own scripts
    assert problems(browser) == []
    # and the policy stops a script that slipped in anyway
    violated = browser.evaluate(
        "new Promise(done => { document.addEventListener('securitypolicyviolation', e => done(e.effectiveDirective),"
        " {once: true}); const s = document.createElement('script'); s.textContent = 'document.title = 1';"
        " document.body.append(s); setTimeout(() => done('allowed'), 3000); })"
    )
    assert violated == "script-src-elem" and browser.evaluate("document.title") == HOSTILE[0]


def test_docs_viewer_pages_are_up_to_date(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tools/make_viewer_pages.py writes each page again; it must equal the committed one."""
    pytest.importorskip("transformers")
    root = Path(__file__).parent.parent
    spec = importlib.util.spec_from_file_location("make_viewer_pages", root / "tools" / "make_viewer_pages.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(tool, "DOCS", tmp_path)
    stale = []
    for name, make in (("gpt2-tiny", tool.tiny_gpt2), ("llama-tiny", tool.tiny_llama)):
        if tool.write(name, make(0)).read_bytes() != (root / "docs" / "viewer" / f"{name}.html").read_bytes():
            stale.append(name)
    assert not stale, f"run python tools/make_viewer_pages.py: {stale} changed"


def test_bench_viewer_runs(tmp_path: Path) -> None:
    """tools/bench_viewer.py end to end on a small MLP (a smoke test: nothing timed is compared)."""
    root = Path(__file__).parent.parent
    result = subprocess.run(
        [sys.executable, str(root / "tools" / "bench_viewer.py"), "--layers", "30", "--repeat", "1",
         "--json", str(tmp_path / "bench.json")],
        cwd=root, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(root)},  # this checkout's fxsparse, whatever is installed
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    measured = json.loads((tmp_path / "bench.json").read_text())
    assert measured["nodes"] > 150 and len(measured["expand_ms"]) == 2 and measured["file_mb"] < 10


def test_demo_writes_the_report_without_graphviz(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's first command, without the [viz] extra: the report with the viewer, and how to get pictures."""
    real = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "graphviz" else real(name, *a))
    monkeypatch.setitem(sys.modules, "graphviz", None)  # import graphviz fails
    assert main(["demo", "--out", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "id='fxv-data'" in page and "<figure" not in page and "pip install 'fxsparse[viz]'" in page
    assert "pip install 'fxsparse[viz]'" in capsys.readouterr().out
