"""fxsparse.viz.model_explorer_data: Model Explorer node data of an exported program's masks, keyed by
the node names Model Explorer's PyTorch adapter shows (the FX names of ``program.graph_module``)."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fxsparse


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down(torch.relu(self.up(x)))
        return out


def _masks() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    two_of_four = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=torch.bool).repeat(8, 2)  # 16 x 8
    return {"up.weight": two_of_four, "down.weight": torch.rand(4, 16) > 0.7}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> torch.export.ExportedProgram:
    """The exported program as Model Explorer opens it: saved to a .pt2 and loaded again."""
    program = fxsparse.transform(TwoLayers(), _masks(), emit="export", example_inputs=(torch.ones(2, 8),))
    path = tmp_path_factory.mktemp("pt2") / "model.pt2"
    torch.export.save(program, path)
    return torch.export.load(path)


def _nodes_of(program: torch.export.ExportedProgram, parameter: str) -> dict[str, str]:
    """The node names Model Explorer shows for one masked weight, found from the program's signature and
    its ``aten.linear`` calls (not from fxsparse's tags): weight input, mask input, product, linear."""
    signature = program.graph_signature
    weight = next(name for name, target in signature.inputs_to_parameters.items() if target == parameter)
    mask = next(name for name, target in signature.inputs_to_buffers.items() if target == f"{parameter}_mask")
    for node in program.graph_module.graph.nodes:
        if node.target is torch.ops.aten.linear.default:
            product = node.args[1]
            if {source.name for source in product.all_input_nodes} == {weight, mask}:
                return {"weight": weight, "mask": mask, "product": product.name, "linear": node.name}
    raise AssertionError(f"no linear reads mask * weight of {parameter}")


def test_model_explorer_density_per_node(loaded: torch.export.ExportedProgram, tmp_path: Path) -> None:
    data = fxsparse.viz.model_explorer_data(loaded, tmp_path / "density.json")
    assert json.loads((tmp_path / "density.json").read_text()) == data
    assert set(data) == {"graph"}  # the id Model Explorer gives an exported program's one graph
    graph = data["graph"]
    assert [stop["stop"] for stop in graph["gradient"]] == [0, 1]
    expected = {}
    for parameter, mask in _masks().items():
        density = mask.sum().item() / mask.numel()
        expected |= {name: density for name in _nodes_of(loaded, parameter).values()}
    assert {name: result["value"] for name, result in graph["results"].items()} == expected


def test_model_explorer_pattern_per_node(loaded: torch.export.ExportedProgram) -> None:
    data = fxsparse.viz.model_explorer_data(loaded, value="pattern")
    results = data["graph"]["results"]
    for parameter, pattern in (("up.weight", "2:4"), ("down.weight", "unstructured")):
        for name in _nodes_of(loaded, parameter).values():
            assert results[name]["value"] == pattern
            assert results[name]["bgColor"].startswith("#")
    assert data["graph"]["showExpandedSummaryOnGroupNode"] is True  # a layer's box counts its patterns


def test_model_explorer_data_names_what_it_takes() -> None:
    out = fxsparse.transform(TwoLayers(), _masks())
    with pytest.raises(TypeError, match=r"model_explorer_data takes an ExportedProgram .* got TwoLayers"):
        fxsparse.viz.model_explorer_data(out)  # type: ignore[arg-type]


def test_model_explorer_data_is_built_by_model_explorers_builder_when_installed(
    loaded: torch.export.ExportedProgram, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``model_explorer`` importable, its ``node_data_builder`` makes the JSON (a stand-in of the
    same classes here: the real package starts a web server's worth of imports)."""
    built: list[str] = []

    @dataclass
    class NodeDataResult:
        value: Any
        bgColor: str | None = None  # Model Explorer's field names

    @dataclass
    class GradientItem:
        stop: float
        bgColor: str | None = None

    @dataclass
    class GraphNodeData:
        results: dict[str, NodeDataResult]
        gradient: list[GradientItem] = field(default_factory=list)
        showExpandedSummaryOnGroupNode: bool = False
        showLabelCountColumnsInChildrenStatsTable: bool = False

    @dataclass
    class ModelNodeData:
        graphsData: dict[str, GraphNodeData]

        def to_json_string(self) -> str:
            built.append("ModelNodeData")
            return json.dumps({key: asdict(graph) for key, graph in self.graphsData.items()})

    builder = types.ModuleType("model_explorer.node_data_builder")
    for kind in (NodeDataResult, GradientItem, GraphNodeData, ModelNodeData):
        setattr(builder, kind.__name__, kind)
    package = types.ModuleType("model_explorer")
    package.node_data_builder = builder  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "model_explorer", package)
    monkeypatch.setitem(sys.modules, "model_explorer.node_data_builder", builder)
    data = fxsparse.viz.model_explorer_data(loaded)
    assert built == ["ModelNodeData"]
    monkeypatch.delitem(sys.modules, "model_explorer")
    monkeypatch.delitem(sys.modules, "model_explorer.node_data_builder")
    plain = fxsparse.viz.model_explorer_data(loaded)
    assert {name: result["value"] for name, result in data["graph"]["results"].items()} == {
        name: result["value"] for name, result in plain["graph"]["results"].items()
    }
    assert data["graph"]["gradient"] == [{**stop, "bgColor": stop["bgColor"]} for stop in plain["graph"]["gradient"]]
