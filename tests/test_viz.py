"""fxsparse.viz: sparsity summaries, graph diffs on known rewrites, drawings (golden DOT), rendering."""

from __future__ import annotations

import html
import os
import re
import shutil
import struct
import sysconfig
import zlib
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
    """A 2:4 mask whose rows differ (identical rows would be column pruning)."""
    row = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=torch.bool).repeat(1, columns // 4)
    return row.repeat(rows // 2, 1)


def conv_two_of_four() -> torch.Tensor:
    """An [out 4, in 4, 1, 2] convolution mask keeping 2 of the 4 input channels at each position."""
    mask = torch.zeros(4, 4, 1, 2, dtype=torch.bool)
    for out in range(4):
        for position in range(2):
            mask[out, [(out + position) % 4, (out + position + 1) % 4], 0, position] = True
    return mask


# 2:4 along its rows, not along its columns.
LOPSIDED = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [1, 1, 0, 0]], dtype=torch.bool)


def edge_blocks() -> torch.Tensor:
    """4x4 blocks of a 10x10 matrix, the ones at the edge cut to 4x2, 2x4 and 2x2."""
    mask = torch.ones(10, 10, dtype=torch.bool)
    mask[:4, :4] = mask[8:, 4:8] = mask[8:, 8:] = False
    return mask


@pytest.mark.parametrize(
    ("mask", "pattern", "input_axis"),
    [
        (torch.ones(4, 8), "dense", 1),
        (torch.zeros(4, 8), "empty", 1),
        (two_of_four(4, 8), "2:4", 1),
        (LOPSIDED.T, "2:4", 0),  # a Hugging Face Conv1D weight is [in, out]
        (LOPSIDED.T, "unstructured", 1),  # ... whose groups run down its columns
        (conv_two_of_four(), "2:4", 1),  # along the input channels at each kernel position
        (torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), "rows", 1),
        (torch.tensor([[1, 0, 1, 1], [1, 0, 1, 1]]), "columns", 1),
        (torch.kron(torch.tensor([[1, 0], [0, 1]]), torch.ones(4, 4)), "block 4x4", 1),
        (edge_blocks(), "block 4x4", 1),
        (torch.tensor([[1, 0, 1], [1, 1, 0]]), "unstructured", 1),
        (torch.tensor([[0.5, 1.0], [0.0, 1.0]]), "soft", 1),
        (torch.tensor([1, 0, 0, 1, 0, 1, 1, 0]), "unstructured", 1),  # a 1-D mask: no groups
        (torch.tensor([1, 0, 1]), "unstructured", 1),
        (torch.tensor([[1, 1, 0, 0, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0, 1, 1]]), "2:4", 1),  # at most 2 of 4
        (torch.rand(64, 64, generator=torch.Generator().manual_seed(0)) < 0.1, "unstructured", 1),  # merely sparse
    ],
)
def test_patterns(mask: torch.Tensor, pattern: str, input_axis: int) -> None:
    assert viz.pattern_of(mask, input_axis=input_axis) == pattern


def test_pattern_names_a_wrong_axis() -> None:
    with pytest.raises(ValueError, match=r"input_axis must be a dimension of the \(4, 4\) mask, got 5"):
        viz.pattern_of(torch.ones(4, 4), input_axis=5)


def test_transposed_convolutions_read_dimension_zero() -> None:
    model = nn.ConvTranspose2d(8, 4, 3)  # weight [in 8, out 4, 3, 3]
    mask = torch.ones(8, 4, 3, 3, dtype=torch.bool)
    mask[:2] = False  # input channels 0 and 1 pruned
    (entry,) = viz.summarize({"weight": mask}, model)
    assert entry.pattern == "columns"


def test_summary_of_a_plan() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    masks = {"0": two_of_four(4, 8), "2.weight": torch.ones(2, 4)}
    first, second = viz.summarize(fxsparse.plan(model, masks))
    assert (first.name, first.shape, first.density, first.pattern) == ("0.weight", (4, 8), 0.5, "2:4")
    assert (first.macs, first.macs_skipped, first.sparsity) == (32, 16, 0.5)
    assert (second.pattern, second.macs_skipped) == ("dense", 0)


class EmbeddingConv1DBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 8)
        self.head = nn.Linear(8, 6, bias=False)
        self.head.weight = self.embed.weight  # tied: the table also multiplies
        self.table = nn.Embedding(6, 8)
        self.proj = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids) + self.table(ids))


def test_summary_knows_the_modules() -> None:
    """Embedding tables and biases multiply nothing; a tied table that is also a head does."""
    model = EmbeddingConv1DBias()
    masks = {"embed.weight": two_of_four(6, 8), "table.weight": two_of_four(6, 8), "proj.bias": torch.ones(4)}
    tied, table, bias = viz.summarize(masks, model)
    assert (tied.macs, tied.macs_skipped) == (48, 24)
    assert (table.macs, table.macs_skipped, table.pattern) == (0, 0, "2:4")
    assert (bias.macs, bias.macs_skipped) == (0, 0)


def test_summary_reads_conv1d_along_its_input_dimension() -> None:
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D(4, 4)  # weight [in, out]
    (entry,) = viz.summarize({"weight": LOPSIDED.T}, conv1d)
    assert entry.pattern == "2:4"
    (entry,) = viz.summarize({"weight": LOPSIDED}, conv1d)
    assert entry.pattern == "unstructured"


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
    assert d.removed == () and d.dropped == ()
    assert d.rewired == tuple(
        sorted((f"{n}_{p}", n) for n in ("linear", "seq_0", "seq_1") for p in ("bias", "weight_masked"))
    )
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


def test_diff_matches_a_module_call_traced_into() -> None:
    """A LayerNorm with a masked weight is traced into: its call matches the layer_norm it became."""
    case = ZOO["shared_module"]
    model = build(case)
    d = viz.diff(torch.fx.symbolic_trace(model), fxsparse.transform(model, make_masks(model, case, "random")))
    assert ("norm", "layer_norm") in d.changed and d.removed == ()
    assert ("norm_weight_masked", "layer_norm") in d.rewired


def edited(model: nn.Module, edit: object) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    before = torch.fx.symbolic_trace(model)
    after = torch.fx.symbolic_trace(model)
    (node,) = [n for n in after.graph.nodes if n.op == "call_function"]
    edit(node)  # type: ignore[operator]
    after.recompile()
    return before, after


class Arithmetic(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.sub(x, y, alpha=2)


@pytest.mark.parametrize(
    "edit",
    [
        lambda node: setattr(node, "kwargs", {"alpha": 3}),  # a constant
        lambda node: setattr(node, "args", node.args[::-1]),  # argument order
        lambda node: setattr(node, "kwargs", {}),  # a keyword dropped
    ],
    ids=["constant", "order", "keyword"],
)
def test_diff_sees_changed_arguments(edit: object) -> None:
    d = viz.diff(*edited(Arithmetic(), edit))
    assert d.changed == (("sub", "sub"),) and not (d.added or d.removed or d.rewired or d.dropped)


def test_graph_diff_is_plain_hashable_data() -> None:
    model = nn.Sequential(nn.Linear(3, 3))
    before, after = torch.fx.symbolic_trace(model), fxsparse.transform(model, {"0": torch.eye(3)})
    first, second = viz.diff(before, after), viz.diff(before, after)
    assert first == second and hash(first) == hash(second)
    assert first.matched == {"input_1": "input_1", "_0": "_0", "output": "output"}


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
        "before": lambda: viz.draw(before, title="before", compact=False),
        "after": lambda: viz.draw(after, title="after", compact=False),
        "diff": lambda: viz.draw_diff(before, after, compact=False),
        "compact": lambda: viz.draw(after),  # the default
    }[what]()
    path = GOLDEN / f"draw_{what}.dot.txt"
    if os.environ.get("FXSPARSE_UPDATE_GOLDEN"):
        path.write_text(dot.source)
    assert dot.source == path.read_text()


def test_masked_nodes_are_labelled_with_density_and_pattern() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    source = viz.draw(fxsparse.transform(model, {"0": two_of_four(4, 4)}), compact=False).source
    assert "mask * weight\n0.weight\n4×4  density 0.500  2:4" in source.replace("\\n", "\n")


def test_big_graphs_are_drawn_compact() -> None:
    layers = [module for _ in range(400) for module in (nn.Linear(2, 2), nn.ReLU())]
    model = nn.Sequential(*layers)
    out = fxsparse.transform(model, {str(2 * i): torch.ones(2, 2) for i in range(400)})
    source = viz.draw(out).source  # 2,402 nodes: over the threshold
    assert "weight_mask" not in source
    assert source.count("masked 0.weight") == 1
    assert "weight_mask" in viz.draw(out, compact=False).source


def test_module_call_nodes_are_labelled_with_their_class() -> None:
    source = viz.draw(torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))).source
    assert 'label="_1\\n1: ReLU"' in source and 'label="_0\\n0: Linear"' in source


def test_render_svg(tmp_path: Path) -> None:
    dot = viz.draw(fxsparse.transform(nn.Sequential(nn.Linear(2, 2)), {"0": torch.eye(2)}))
    path = viz.render(dot, tmp_path / "graph.svg")
    assert path.read_text().lstrip().startswith(("<?xml", "<svg"))
    assert (tmp_path / "graph.dot").read_text() == dot.source


def test_render_without_a_renderer_writes_dot_and_says_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, path=None: None)
    dot = viz.draw(fxsparse.transform(nn.Sequential(nn.Linear(2, 2)), {"0": torch.eye(2)}))
    with pytest.raises(viz.RenderError, match="pip install graphviz-pure"):
        viz.render(dot, tmp_path / "graph.svg")
    assert (tmp_path / "graph.dot").exists()


def test_render_finds_graphviz_pure_beside_the_interpreter_of_a_venv_not_activated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `/venv/bin/python -m pytest` without activating the venv: its bin folder is not on PATH.
    if shutil.which("graphviz-pure", path=sysconfig.get_path("scripts")) is None:
        pytest.skip("graphviz-pure is not installed beside this interpreter")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("dot") is None and shutil.which("graphviz-pure") is None
    dot = viz.draw(torch.fx.symbolic_trace(nn.Sequential(nn.ReLU())))
    assert viz.render_bytes(dot).decode().lstrip().startswith(("<?xml", "<svg"))


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
    assert viz.DIFF_MARKS["changed"][0] in box  # its Linear changed, and nodes were added inside it
    assert "(collapsed, 1 masked weight)" in box
    plain = viz.render_bytes(dot, "plain").decode()
    assert "node module " not in plain  # no stray node from a port-like id


class LoopedList(nn.Module):
    """A ModuleList called in a loop whose body also calls functions: ``relu(layer(x))``, or with
    ``residual`` ``x + layer(x) * 0.5`` (its nodes then sit at the root, outside every module)."""

    def __init__(self, layers: int, residual: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(layers))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x) * 0.5 if self.residual else torch.relu(layer(x))
        return x


def test_big_graphs_fold_runs_of_numbered_modules() -> None:
    model = LoopedList(400)
    out = fxsparse.transform(model, {f"layers.{i}": torch.ones(2, 2) for i in range(400)})
    source = viz.draw(out).source
    assert "layers.2 … layers.398\\n(×397)" in source
    for drawn in ("layers_0 ", "layers_1 ", "layers_399 ", "relu_1 ", "relu_398 "):
        assert f"\t\t{drawn}" in source or f"\t{drawn}" in source
    assert "relu_5 " not in source and "layers_5 " not in source  # inside the run's box
    assert 'relu_1 -> "collapsed__layers.2-398"' in source
    assert (
        '"collapsed__layers.2-398" [label="layers.2 … layers.398\\n(×397)\\n(collapsed, 397 masked weights)"' in source
    )
    shallow = viz.draw(out, depth=1).source  # runs stay folded at a depth given
    assert "layers.2 … layers.398" in shallow and "relu_5 " not in shallow
    expanded = viz.draw(out, compact=False, fold=False, depth=10).source
    assert "relu_5 " in expanded and "layers_5_weight_mask " in expanded


def test_removed_nodes_keep_their_old_edges() -> None:
    model = nn.Sequential(nn.ReLU(), nn.Tanh(), nn.Sigmoid())
    before, after = torch.fx.symbolic_trace(model), torch.fx.symbolic_trace(model)
    (tanh,) = after.graph.find_nodes(op="call_module", target="1")
    tanh.replace_all_uses_with(tanh.args[0])
    after.graph.erase_node(tanh)
    d = viz.diff(before, after)
    assert d.removed == ("_1",) and d.dropped == (("_1", "_2"),) and d.rewired == (("_0", "_2"),)
    source = viz.draw_diff(before, after, d).source
    colour, style = viz.DIFF_MARKS["removed"]
    assert f'_0 -> removed___1 [color="{colour}" style={style}]' in source
    assert f'removed___1 -> _2 [color="{colour}" style={style}]' in source


def test_draw_refuses_unknown_marks_and_negative_depth() -> None:
    graph = torch.fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match=r"marks must be one of \['added', 'changed', 'removed'\], got \['moved'\]"):
        viz.draw(graph, marks={"_0": "moved"})
    with pytest.raises(ValueError, match="depth must be 0 or more, got -1"):
        viz.draw(graph, depth=-1)


def test_labels_and_titles_are_drawn_literally(tmp_path: Path) -> None:
    """Backslashes and quotes in a title or a name are text, not DOT escapes (\\N is the node's name)."""
    title = 'C:\\models\\Net "v2"'
    dot = viz.draw(torch.fx.symbolic_trace(nn.Sequential(nn.ReLU())), title=title)
    svg = viz.render_bytes(dot).decode()
    assert "C:\\models\\Net &quot;v2&quot;" in svg


def test_render_formats(tmp_path: Path) -> None:
    dot = viz.draw(torch.fx.symbolic_trace(nn.Sequential(nn.ReLU())))
    assert viz.render(dot, tmp_path / "graph.dot").read_text() == dot.source  # the source, not re-laid out
    assert viz.render(dot, tmp_path / "GRAPH.SVG").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert viz.render(dot, tmp_path / "graph.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.skipif(shutil.which("dot") is not None, reason="the system dot writes PDF")
def test_pdf_without_graphviz_says_what_to_install(tmp_path: Path) -> None:
    dot = viz.draw(torch.fx.symbolic_trace(nn.Sequential(nn.ReLU())))
    with pytest.raises(viz.RenderError, match=r"graphviz-pure cannot write pdf: install Graphviz"):
        viz.render(dot, tmp_path / "graph.pdf")
    assert (tmp_path / "graph.dot").exists()


def patched(before: list[str], unified: str) -> list[str]:
    """``before`` with a unified diff applied (hunk headers give where each hunk starts)."""
    result: list[str] = []
    position = 0
    for line in unified.splitlines(keepends=True)[2:]:
        if line.startswith("@@"):
            start, _, length = line.split()[1][1:].partition(",")
            begin = int(start) if length == "0" else int(start) - 1
            result += before[position:begin]
            position = begin
        elif line.startswith(" "):
            result.append(before[position])
            position += 1
        elif line.startswith("-"):
            position += 1
        else:
            result.append(line[1:])
    return result + before[position:]


def test_code_diff_is_difflibs_on_the_zoo() -> None:
    import difflib

    for name, case in ZOO.items():
        model = build(case)
        before = torch.fx.symbolic_trace(model)
        after = fxsparse.transform(model, make_masks(model, case, "random"))
        a, b = (before.code + "\n").splitlines(keepends=True), (after.code + "\n").splitlines(keepends=True)
        expected = "".join(difflib.unified_diff(a, b, "before", "after", n=1))
        assert viz.diff(before, after).unified() == expected, name


def test_code_diff_applies_back() -> None:
    """On texts full of repeated lines (where anchors are few), the diff still turns before into after."""
    from fxsparse.viz._unified import unified_diff

    rng = torch.Generator().manual_seed(0)
    for _ in range(300):
        a, b = ([f"{int(v)}\n" for v in torch.randint(0, 6, (int(n),), generator=rng)]
                for n in torch.randint(0, 14, (2,), generator=rng))  # fmt: skip
        for context in (0, 1, 3):
            assert patched(a, "".join(unified_diff(a, b, context))) == b


def test_diff_of_a_graph_transformed_twice() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    once = fxsparse.transform(model, {"0.weight": torch.eye(4)})
    twice = fxsparse.transform(once, {"0.bias": torch.tensor([1.0, 0, 1, 0])})
    d = viz.diff(once, twice)
    assert ("_0_bias", "_0") in d.dropped and ("_0_bias_masked", "linear") in d.rewired
    assert all(user in d.matched for _, user in d.dropped)  # dropped edges are named as in before


def test_diff_of_tied_fetches_under_export() -> None:
    case = ZOO["shared_module"]
    model = build(case)
    example = {"example_inputs": case.inputs()}
    before = fxsparse.transform(model, {}, capture="export", **example)
    after = fxsparse.transform(model, make_masks(model, case, "random"), capture="export", **example)
    d = viz.diff(before, after)
    assert not set(d.removed) & {n for _, n in d.matched.items()}  # nothing both removed and drawn alive


@pytest.mark.parametrize("masked", ["lm_head.weight", "embed.weight"])
def test_diff_keeps_a_tied_weight_read_under_another_alias(masked: str) -> None:
    # torch.export reads a tied weight once per name; the rewrite reads it once, under its mask's name.
    case = ZOO["tied_embedding_head"]
    model = build(case)
    example = {"example_inputs": case.inputs()}
    before = fxsparse.transform(model, {}, capture="export", **example)
    tied = {"embed.weight", "lm_head.weight"}
    reads = {n.name: str(n.target) for n in before.graph.find_nodes(op="get_attr") if n.target in tied}
    assert set(reads.values()) == tied
    after = fxsparse.transform(model, {masked: torch.rand(20, 8) > 0.5}, capture="export", **example)
    d = viz.diff(before, after)
    assert d.removed == ()
    for name in reads:
        (fetch,) = (n for n in after.graph.nodes if n.name == d.matched[name])
        assert fetch.op == "get_attr" and fetch.target in tied
    assert not any(name in dict(d.changed) for name in reads)


def test_diff_of_gpt2_keeps_its_tied_embedding() -> None:
    pytest.importorskip("transformers")
    import hf_zoo

    gpt2 = hf_zoo.FAMILIES["gpt2"]
    model = hf_zoo.build(gpt2)
    example = {"example_kwargs": gpt2.inputs(2, 8)}
    before = fxsparse.transform(model, {}, **example)
    after = fxsparse.transform(model, hf_zoo.random_masks(model), **example)
    assert viz.diff(before, after).removed == ()


def test_a_residual_loop_folds_into_its_run() -> None:
    dot = viz.draw(torch.fx.symbolic_trace(LoopedList(800, residual=True)))  # 2,402 nodes, most at the root
    assert dot.source.count("[label=") < 20
    assert "layers.2 … layers.798\\n(×797)" in dot.source


class Gappy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(i): nn.Linear(2, 2) for i in (0, 1, 5, 100, *range(1000, 1400))})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            x = torch.relu(layer(x))
        return x


def test_folded_runs_count_their_members_and_colons_stay_labels() -> None:
    source = viz.draw(torch.fx.symbolic_trace(Gappy()), fold=True).source
    assert "layers.5 … layers.1398\\n(×401)" in source  # 404 members, less the first two and the last

    class Colons(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleDict({"enc:0": nn.Sequential(nn.Linear(4, 4))})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.blocks["enc:0"](x)

    dot = viz.draw(fxsparse.transform(Colons(), {"blocks.enc:0.0.weight": torch.eye(4)}), depth=1)
    plain = viz.render_bytes(dot, "plain").decode()
    drawn = [line.split()[1].strip('"') for line in plain.splitlines() if line.startswith("node ")]
    assert sorted(drawn) == ["collapsed__blocks.enc_0", "output", "x"]


def test_meta_masks_are_drawn_without_values() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4))
    out = fxsparse.transform(model, {"0": torch.ones(4, 4, dtype=torch.bool, device="meta")})
    assert "4×4  (meta: no values)" in viz.draw(out).source
    with pytest.raises(ValueError, match="on the meta device: it has a shape but no values"):
        viz.summarize(viz.masks_of(out))


def test_titles_in_angle_brackets_are_text() -> None:
    dot = viz.draw(torch.fx.symbolic_trace(nn.Sequential(nn.ReLU())), title="<GPT-2>")
    assert ">&lt;GPT&#45;2&gt;</text>" in viz.render_bytes(dot).decode()


def named(name: str) -> tuple[nn.Module, torch.fx.GraphModule]:
    """A model holding one Linear inside a module called ``name``, and its masked output."""
    model = nn.Sequential()
    model.add_module(name, nn.Sequential(nn.Linear(4, 4)))
    return model, fxsparse.transform(model, {f"{name}.0": torch.eye(4)})


def drawings_of(name: str) -> list[str]:
    """The SVG of every drawing of a model with a module called ``name``: whole, collapsed, diffed."""
    model, out = named(name)
    dots = (viz.draw(out), viz.draw(out, depth=0), viz.draw_diff(torch.fx.symbolic_trace(model), out))
    return [viz.render_bytes(dot).decode() for dot in dots]


def png_2x2() -> bytes:
    """A valid 2x2 red PNG, written out by hand."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = (b"\x00" + b"\xff\x00\x00" * 2) * 2
    header = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("<<TABLE HREF='javascript:alert(1)'><TR><TD>x</TD></TR></TABLE>>", None),
        ("<a>b>", None),  # not a valid HTML-like label: once a syntax error, and no picture at all
        ("<broken", None),
        ("&amp; &#46; <b>bold</b>", None),  # Graphviz decodes entities in labels: these stay as typed
        ("tab\there\x1b[2J", "tab\\x09here\\x1b[2J"),
    ],
)
def test_module_names_are_drawn_as_text_never_as_graphviz_html(name: str, shown: str | None) -> None:
    """A module's name is a label's text, never a Graphviz HTML-like label (a link, a table, a bad parse)."""
    for svg in drawings_of(name):
        assert not re.search(r"<a\b|<image\b|href=", svg)
        texts = [html.unescape(text) for text in re.findall(r"<text[^>]*>([^<]*)</text>", svg)]
        assert (shown or name) in texts  # the cluster's label, or the collapsed box's first line


def test_image_labels_embed_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``<IMG SRC=...>`` in a name would make the renderer put a file into the picture."""
    monkeypatch.chdir(tmp_path)  # the renderer finds SRC from here (a module name cannot hold a ".")
    (tmp_path / "picture").write_bytes(png_2x2())
    for svg in drawings_of("<<TABLE><TR><TD><IMG SRC='picture'/></TD></TR></TABLE>>"):
        assert "<image" not in svg and "<IMG SRC='picture'/>" in html.unescape(svg)  # drawn as text


def test_clashing_module_names_get_distinct_dot_ids() -> None:
    """Ids made safe for DOT (no ":" an edge reads as a port) never merge two modules' boxes."""

    class Clash(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleDict({name: nn.Sequential(nn.Linear(4, 4)) for name in ("enc:0", "enc_0")})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.blocks["enc_0"](self.blocks["enc:0"](x))

    plain = viz.render_bytes(viz.draw(torch.fx.symbolic_trace(Clash()), depth=1), "plain").decode()
    drawn = sorted(line.split()[1].strip('"') for line in plain.splitlines() if line.startswith("node "))
    assert drawn == ["collapsed__blocks.enc_0", "collapsed__blocks.enc_0~2", "output", "x"]
