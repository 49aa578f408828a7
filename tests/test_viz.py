"""fxsparse.viz: sparsity summaries, graph diffs on known rewrites, drawings (golden DOT), rendering."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

import fxsparse
from fxsparse import viz

from zoo import ZOO, build, make_masks

GOLDEN = Path(__file__).parent / "golden"


def two_of_four(rows: int, columns: int) -> torch.Tensor:
    return torch.tensor([1, 0, 0, 1], dtype=torch.bool).repeat(rows, columns // 4)


@pytest.mark.parametrize(
    ("mask", "pattern"),
    [
        (torch.ones(4, 8), "dense"),
        (torch.zeros(4, 8), "empty"),
        (two_of_four(4, 8), "2:4"),
        (torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), "rows"),
        (torch.kron(torch.tensor([[1, 0], [0, 1]]), torch.ones(4, 4)), "block 4x4"),
        (torch.tensor([[1, 0, 1], [1, 1, 0]]), "unstructured"),
        (torch.tensor([[0.5, 1.0], [0.0, 1.0]]), "soft"),
        (two_of_four(8, 4).reshape(8, 1, 2, 2), "2:4"),  # a conv weight, along its flattened inputs
        (torch.tensor([[1, 1, 0, 0, 1, 0, 0, 0]] * 4), "2:4"),  # at most 2 of 4: what 2:4 kernels take
        (torch.rand(64, 64, generator=torch.Generator().manual_seed(0)) < 0.1, "unstructured"),  # merely sparse
    ],
)
def test_patterns(mask: torch.Tensor, pattern: str) -> None:
    assert viz.pattern_of(mask) == pattern


def test_summary_of_a_plan() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    masks = {"0": two_of_four(4, 8), "2.weight": torch.ones(2, 4)}
    first, second = viz.summarize(fxsparse.plan(model, masks))
    assert (first.name, first.shape, first.density, first.pattern) == ("0.weight", (4, 8), 0.5, "2:4")
    assert (first.macs, first.macs_skipped, first.sparsity) == (32, 16, 0.5)
    assert (second.pattern, second.macs_skipped) == ("dense", 0)


def added_roles(d: viz.GraphDiff) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in d.added:
        counts[d.roles.get(name, "other")] = counts.get(d.roles.get(name, "other"), 0) + 1
    return counts


def test_diff_of_opened_linears() -> None:
    case = ZOO["seed_model"]
    model = build(case)
    d = viz.diff(torch.fx.symbolic_trace(model), fxsparse.transform(model, make_masks(model, case, "random")))
    assert d.changed == (("linear", "linear"), ("seq_0", "seq_0"), ("seq_1", "seq_1"))
    assert d.removed == () and d.dropped == () and d.rewired == ()
    assert {name for name, _ in d.unchanged} == {"x", "output"}
    assert added_roles(d) == {"weight": 3, "mask": 3, "masked": 3, "param": 3}


def test_diff_of_a_weight_used_in_a_custom_forward() -> None:
    """A traced-into module's weight fetch stays; its use is rewired through mask * weight."""
    case = ZOO["functional_linear"]
    model = build(case)
    d = viz.diff(torch.fx.symbolic_trace(model), fxsparse.transform(model, make_masks(model, case, "random")))
    assert ("proj_weight", "proj_weight") in d.unchanged or ("proj_weight", "proj_weight") in d.changed
    assert ("proj_weight", "linear") in d.dropped
    assert "proj_weight_masked" in d.added and d.roles["proj_weight_masked"] == "masked"


def test_diff_of_identical_graphs_is_empty() -> None:
    traced = torch.fx.symbolic_trace(ZOO["conv_net"].build())
    d = viz.diff(traced, traced)
    assert not (d.added or d.removed or d.changed or d.rewired or d.dropped)
    assert d.unified() == ""


def test_text_diff() -> None:
    model = nn.Sequential(nn.Linear(3, 3))
    d = viz.diff(torch.fx.symbolic_trace(model), fxsparse.transform(model, {"0": torch.eye(3)}))
    text = str(d)
    assert "added            4" in text and "changed          1" in text
    assert "+    _0_weight_masked = torch.mul(_0_weight_mask, _0_weight)" in text
    assert '-    _0 = getattr(self, "0")(input_1);  input_1 = None' in text


def test_graph_diff_as_networkx() -> None:
    model = nn.Sequential(nn.Linear(3, 3))
    digraph = viz.to_networkx(fxsparse.transform(model, {"0": torch.eye(3)}).graph)
    assert digraph.nodes["_0_weight_masked"]["role"] == "masked"
    assert digraph.has_edge("_0_weight_masked", "_0")


@pytest.mark.parametrize("what", ["before", "after", "diff", "compact"])
def test_golden_dot(what: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    masks = {"0": two_of_four(4, 4), "2": torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)}
    before, after = torch.fx.symbolic_trace(model), fxsparse.transform(model, masks)
    dot = {
        "before": lambda: viz.draw(before, title="before"),
        "after": lambda: viz.draw(after, title="after"),
        "diff": lambda: viz.draw_diff(before, after),
        "compact": lambda: viz.draw(after, compact=True),
    }[what]()
    path = GOLDEN / f"draw_{what}.dot.txt"
    if os.environ.get("FXSPARSE_UPDATE_GOLDEN"):
        path.write_text(dot.source)
    assert dot.source == path.read_text()


def test_masked_nodes_are_labelled_with_density_and_pattern() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    source = viz.draw(fxsparse.transform(model, {"0": two_of_four(4, 4)})).source
    assert "mask * weight\n0.weight\n4×4  density 0.500  2:4" in source.replace("\\n", "\n")


def test_big_graphs_are_drawn_compact() -> None:
    layers = [module for _ in range(400) for module in (nn.Linear(2, 2), nn.ReLU())]
    model = nn.Sequential(*layers)
    out = fxsparse.transform(model, {str(2 * i): torch.ones(2, 2) for i in range(400)})
    source = viz.draw(out).source  # 2,402 nodes: over the threshold
    assert "weight_mask" not in source
    assert source.count("masked 0.weight") == 1
    assert "weight_mask" in viz.draw(out, compact=False).source


def test_render_svg(tmp_path: Path) -> None:
    dot = viz.draw(fxsparse.transform(nn.Sequential(nn.Linear(2, 2)), {"0": torch.eye(2)}))
    path = viz.render(dot, tmp_path / "graph.svg")
    assert path.read_text().lstrip().startswith(("<?xml", "<svg"))
    assert (tmp_path / "graph.dot").read_text() == dot.source


def test_render_without_a_renderer_writes_dot_and_says_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    dot = viz.draw(fxsparse.transform(nn.Sequential(nn.Linear(2, 2)), {"0": torch.eye(2)}))
    with pytest.raises(viz.RenderError, match="pip install graphviz-pure"):
        viz.render(dot, tmp_path / "graph.svg")
    assert (tmp_path / "graph.dot").exists()


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.b = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_collapsed_modules_keep_their_edges_and_marks() -> None:
    model = TwoBlocks()
    before, after = torch.fx.symbolic_trace(model), fxsparse.transform(model, {"a.0": torch.eye(4)})
    dot = viz.draw_diff(before, after, depth=0)
    assert "collapsed__a -> collapsed__b" in dot.source and "x -> collapsed__a" in dot.source
    (box,) = [line for line in dot.source.splitlines() if line.strip().startswith("collapsed__a [")]
    assert viz.DIFF_MARKS["added"][0] in box  # nodes were added inside it
    plain = viz.render_bytes(dot, "plain").decode()
    assert "node module " not in plain  # no stray node from a port-like id
