"""Plumbing (fxsparse.viz._plumbing) and the compact drawings that hide it: sizes, asserts, tuple
items and attention-mask arithmetic are never drawn by default; what computes the model always is."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

import fxsparse
from fxsparse import viz
from fxsparse.viz._diff import module_calls
from fxsparse.viz._plumbing import plumbing

GOLDEN = Path(__file__).parent / "golden"


class Attention(nn.Module):
    """One head of causal attention, written the way transformers write it: q, k, v split from one
    projection (``getitem`` of a tuple), a causal mask built from the input's size alone."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(x.size(-1), dim=-1)
        length = x.size(1)
        causal = x.new_ones(length, length).tril() == 0
        scores = (q @ k.transpose(-1, -2)).masked_fill(causal, float("-inf"))
        mixed: torch.Tensor = self.out(scores.softmax(-1) @ v)
        return x + mixed


class Stack(nn.Module):
    """Six attention layers: enough for a drawing to fold the run between the first two and the last."""

    def __init__(self, layers: int = 6) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Attention() for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_plumbing_of_a_hand_written_attention() -> None:
    traced = torch.fx.symbolic_trace(Attention())
    found = {node.name: kind for node, kind in plumbing(traced.graph, traced).items()}
    # Written out from the forward above: the sizes it asks for, the tuple items of split, and
    # the causal mask (made from the input's size, read by masked_fill beside the scores).
    assert found == {
        "size": "size",
        "getitem": "getitem",
        "getitem_1": "getitem",
        "getitem_2": "getitem",
        "size_1": "size",
        "new_ones": "side",
        "tril": "side",
        "eq": "side",
    }


def test_a_model_without_weights_has_no_plumbing_to_hide() -> None:
    class Arithmetic(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x.flatten(1)) * 2

    traced = torch.fx.symbolic_trace(Arithmetic())
    assert plumbing(traced.graph, traced) == {}


def test_input_reshapes_before_a_weight_are_not_plumbing() -> None:
    class Flattening(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(12, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.fc(x.view(x.size(0), -1))
            return out

    traced = torch.fx.symbolic_trace(Flattening())
    found = {node.name: kind for node, kind in plumbing(traced.graph, traced).items()}
    assert found == {"size": "size"}  # the view is the linear's only input: the data, not a side table


def test_module_calls_skip_torch_exports_stand_in_for_no_module() -> None:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    size = graph.call_function(torch.ops.aten.sym_size.int, (x, 0))
    size.meta["nn_module_stack"] = {
        "_empty_nn_module_stack_from_metadata_hook": (
            "_empty_nn_module_stack_from_metadata_hook",
            "_empty_nn_module_stack_from_metadata_hook",
        )
    }
    graph.output(size)
    assert module_calls(size) == []
    assert "_empty_nn_module_stack" not in viz.draw(graph, compact=False).source


def _stack_pair() -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    torch.manual_seed(0)
    model = Stack()
    masks = {f"layers.{i}.{name}": torch.rand(shape) > 0.5 for i in range(6) for name, shape in
             (("qkv", (24, 8)), ("out", (8, 8)))}  # fmt: skip
    return torch.fx.symbolic_trace(model), fxsparse.transform(model, masks)


def test_golden_default_diff_drawing() -> None:
    dot = viz.draw_diff(*_stack_pair())
    path = GOLDEN / "draw_default.dot.txt"
    if os.environ.get("FXSPARSE_UPDATE_GOLDEN"):
        path.write_text(dot.source)
    assert dot.source == path.read_text()


def test_default_drawing_hides_plumbing_and_folds_runs() -> None:
    before, after = _stack_pair()
    source = viz.draw_diff(before, after).source
    assert not re.search(r"\b(size|getitem|new_ones|tril)(_\d+)? \[", source)
    assert "layers.2 … layers.4\\n(×3)" in source  # the run between the first two and the last
    assert "masked layers.0.qkv.weight" in source and "masked layers.5.out.weight" in source
    # Through the split's items: the projection feeds the matmuls that read q, k and v.
    assert re.search(r"\bsplit -> matmul\b", source)
    full = viz.draw_diff(before, after, compact=False, fold=False).source
    assert "size_1 [" in full and "tril [" in full and "layers_3_qkv_weight_mask [" in full


@pytest.fixture(scope="module")
def gpt2_pair() -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    pytest.importorskip("transformers")
    from fxsparse._demo import tiny_gpt2

    demo = tiny_gpt2(0)
    options = {"example_kwargs": demo.inputs, "dynamic_shapes": demo.dynamic_shapes}
    masks = fxsparse.masks.magnitude(demo.model, 0.5)
    return fxsparse.transform(demo.model, {}, **options), fxsparse.transform(demo.model, masks, **options)


def test_plumbing_of_exported_gpt2(gpt2_pair: tuple[torch.fx.GraphModule, torch.fx.GraphModule]) -> None:
    after = gpt2_pair[1]
    found = plumbing(after.graph, after)
    by_target: dict[str, set[str]] = {}
    for node in after.graph.nodes:
        name = getattr(node.target, "__name__", str(node.target))
        by_target.setdefault(name, set()).add(found.get(node, "drawn"))
    assert by_target["sym_size.int"] == {"size"}
    assert by_target["_assert_tensor_metadata.default"] == {"assert"}
    assert by_target["getitem"] == {"getitem"}
    assert {"cumsum.default", "new_ones.default", "diff.default"} <= {
        name for name, kinds in by_target.items() if kinds == {"side"}
    }  # the attention mask's arithmetic
    for computing in ("addmm.default", "linear.default", "scaled_dot_product_attention.default", "layer_norm.default",
                      "embedding.default", "tanh.default"):  # fmt: skip
        assert by_target[computing] == {"drawn"}, computing


def _fan_out(source: str) -> int:
    edges = re.findall(r"^\s*(\S+) -> \S+", source, flags=re.MULTILINE)
    return max(edges.count(edge) for edge in set(edges))


def test_default_drawing_of_gpt2_is_readable(gpt2_pair: tuple[torch.fx.GraphModule, torch.fx.GraphModule]) -> None:
    dot = viz.draw_diff(*gpt2_pair)
    assert "_empty_nn_module_stack" not in dot.source and "sym_size" not in dot.source
    assert _fan_out(dot.source) <= 3  # a split's q, k, v at most; no size query fanning out to every layer
    svg = viz.render_bytes(dot).decode()
    width = float(re.search(r'<svg width="([\d.]+)pt"', svg)[1])  # type: ignore[index]
    smallest = min(float(size) for size in re.findall(r'font-size="([\d.]+)"', svg))
    # A docs page (about 740 CSS px of text width) shows it at full scale: text of 10 pt, 13 px.
    assert width * 4 / 3 <= 740 and smallest >= 10


def test_report_takes_depth_and_compact(
    tmp_path: Path, gpt2_pair: tuple[torch.fx.GraphModule, torch.fx.GraphModule]
) -> None:
    pytest.importorskip("graphviz")
    before, after = gpt2_pair
    default = viz.report(before, after, tmp_path / "default.html").read_text()
    full = viz.report(before, after, tmp_path / "full.html", compact=False).read_text()
    shallow = viz.report(before, after, tmp_path / "shallow.html", depth=0).read_text()
    assert ">sym_size_int_12<" not in default and ">sym_size_int_12<" in full
    assert "(collapsed, 8 masked weights)" in shallow  # transformer: the 2 layers' 4 projections each
