"""Node data for Google's Model Explorer: fxsparse's masks shown on the graph of an exported ``.pt2``.

Model Explorer's PyTorch adapter draws ``program.graph_module.graph`` of an
``ExportedProgram`` as one graph with the id ``"graph"``, each node under its FX name
(``p_fc_weight``, ``b_fc_weight_mask``, ``mul``, ``linear``), and its node-data overlays
are JSON files of ``{graph id: {"results": {node id: {"value": ...}}, ...}}``. This module
writes such a file, keyed by those names, from the masks fxsparse recorded in the program.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.export
import torch.fx
from torch import nn

from .._sparsity import density_of, input_axis_of, pattern_of
from .._tags import Role, role_of, tag_of
from ..masks._importers import of

__all__ = ["GRAPH_ID", "model_explorer_data"]

GRAPH_ID = "graph"
"""The id Model Explorer's PyTorch adapter gives the one graph of an exported program."""

# Low density (most weights pruned) red, dense white: Model Explorer spreads the gradient over the values' range.
_GRADIENT = ({"stop": 0, "bgColor": "#e06666"}, {"stop": 1, "bgColor": "#ffffff"})
_PATTERN_COLOURS = {
    "dense": "#ffffff",
    "unstructured": "#f4b183",
    "rows": "#9dc3e6",
    "columns": "#9dc3e6",
    "empty": "#999999",
    "soft": "#d9d9d9",
}
# Text values: a layer's box counts its patterns ("2:4: 6 of 7") rather than drawing a colour bar.
_TEXT_SUMMARIES = {"showExpandedSummaryOnGroupNode": True, "showLabelCountColumnsInChildrenStatsTable": True}
_N_OF_M_COLOUR = "#93c47d"  # what sparse tensor cores run
_BLOCK_COLOUR = "#b4a7d6"


def model_explorer_data(
    out: torch.export.ExportedProgram,
    path: str | Path | None = None,
    *,
    value: Literal["density", "pattern"] = "density",
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """Model Explorer node data of the masks in ``out`` (fxsparse's ``emit="export"`` output, or
    its ``.pt2`` loaded again): one value per node, written to ``path`` as JSON when given.

    ``value="density"`` gives the fraction of the weight each mask keeps (a number, coloured
    from red, sparse, to white, dense); ``value="pattern"`` its pattern (``"2:4"``,
    ``"block 4x4"``, ``"unstructured"``..., as :func:`fxsparse.viz.summarize` names them). Each
    masked weight's value is set on its ``mask * weight`` node, on the weight and mask inputs,
    and on each operation that reads the product (its ``linear``, ``addmm``, ``embedding``):
    the nodes Model Explorer shows for the program, under their FX names in the graph
    ``"graph"``. ``model`` (the model the masks are for) tells patterns along a weight's real
    input dimension (a Hugging Face ``Conv1D`` holds ``[in, out]``); without it they are read
    from the module types the program recorded, where it still holds them.

    Built with the ``model_explorer`` package's own ``node_data_builder`` when it is installed
    (``pip install 'fxsparse[model-explorer]'``), else as plain JSON of the same schema. Load
    it in Model Explorer beside the ``.pt2``: ``model-explorer model.pt2
    --node_data_paths=density.json``, or ``model_explorer.visualize_pytorch(name, program,
    node_data={"name": "mask density", "node_data_path": "density.json"})``.

    Example:
        >>> import torch, fxsparse
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> program = fxsparse.transform(model, {"0": torch.eye(4)}, emit="export", example_inputs=(torch.ones(1, 4),))
        >>> data = fxsparse.viz.model_explorer_data(program)
        >>> {node: result["value"] for node, result in sorted(data["graph"]["results"].items())}
        {'b_0_weight_mask': 0.25, 'linear': 0.25, 'mul': 0.25, 'p_0_weight': 0.25}
    """
    if not isinstance(out, torch.export.ExportedProgram):
        raise TypeError(
            "model_explorer_data takes an ExportedProgram (fxsparse.transform(..., emit='export'), or a .pt2 "
            f"loaded with torch.export.load): Model Explorer shows exported programs; got {type(out).__name__}"
        )
    if value not in ("density", "pattern"):
        raise ValueError(f"value must be 'density' or 'pattern', got {value!r}")
    masks = of(out)
    kinds = _holder_kinds(out.graph, model)
    values: dict[str, float | str] = {}
    for mask_name, mask in masks.items():
        if value == "density":
            values[mask_name] = density_of(mask)
        else:
            axis = input_axis_of(kinds.get(mask_name)) if mask.dim() > 1 else 0
            values[mask_name] = pattern_of(mask, axis)
    results: dict[str, float | str] = {}
    for node in out.graph.nodes:
        tag = tag_of(node)
        if role_of(node) not in (Role.MASKED, Role.FOLDED) or tag is None or str(tag["param"]) not in values:
            continue
        shown = values[str(tag["param"])]
        results[node.name] = shown
        for source in node.all_input_nodes:
            if source.op == "placeholder":  # the weight and the mask, lifted to inputs
                results[source.name] = shown
        for user in node.users:
            readers = [source for source in user.all_input_nodes if role_of(source) in (Role.MASKED, Role.FOLDED)]
            if len(readers) == 1:  # an operation reading two masked weights has no one value
                results[user.name] = shown
    data = _built(results, value)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return data


def _built(results: Mapping[str, float | str], value: str) -> dict[str, Any]:
    """``{GRAPH_ID: graph node data}``, through Model Explorer's builder where it is installed."""
    colours = {name: _pattern_colour(str(shown)) for name, shown in results.items()} if value == "pattern" else {}
    try:
        from model_explorer import node_data_builder as builder  # the optional extra
    except ImportError:
        builder = None
    if builder is not None:
        graph = builder.GraphNodeData(
            results={
                name: builder.NodeDataResult(value=shown, bgColor=colours.get(name)) for name, shown in results.items()
            },
            gradient=[builder.GradientItem(**stop) for stop in _GRADIENT] if value == "density" else [],
            **_TEXT_SUMMARIES if value == "pattern" else {},
        )
        built: dict[str, Any] = json.loads(builder.ModelNodeData(graphsData={GRAPH_ID: graph}).to_json_string())
        return built
    plain: dict[str, Any] = {
        "results": {
            name: {"value": shown, **({"bgColor": colours[name]} if name in colours else {})}
            for name, shown in results.items()
        }
    }
    if value == "density":
        plain["gradient"] = [dict(stop) for stop in _GRADIENT]
    else:
        plain.update(_TEXT_SUMMARIES)
    return {GRAPH_ID: plain}


def _pattern_colour(pattern: str) -> str:
    if pattern.startswith("block"):
        return _BLOCK_COLOUR
    if ":" in pattern:
        return _N_OF_M_COLOUR
    return _PATTERN_COLOURS.get(pattern, "#ffffff")


def _holder_kinds(graph: torch.fx.Graph, model: nn.Module | None) -> dict[str, list[type[nn.Module]]]:
    """Each masked parameter -> the types of the modules holding it: from ``model`` when given, else
    from the module stack the program recorded on the nodes reading the product (types, not
    names, so a loaded program that kept only names gives none: rows along dimension 1)."""
    if model is not None:
        from .._sparsity import holder_types

        return holder_types(model)
    kinds: dict[str, list[type[nn.Module]]] = {}
    for node in graph.nodes:
        tag = tag_of(node)
        if role_of(node) not in (Role.MASKED, Role.FOLDED) or tag is None:
            continue
        holder = str(tag["param"]).rpartition(".")[0]
        for user in [node, *node.users]:
            for entry in (user.meta.get("nn_module_stack") or {}).values():
                path, kind = entry if isinstance(entry, tuple) and len(entry) == 2 else (None, None)
                if isinstance(kind, type) and issubclass(kind, nn.Module) and _same_path(path, holder):
                    kinds.setdefault(str(tag["param"]), []).append(kind)
    return kinds


def _same_path(recorded: Any, holder: str) -> bool:
    """Whether a module path as torch.export records it (``L['self'].h[0].attn`` in older releases,
    ``h.0.attn`` now) names ``holder``."""
    if not isinstance(recorded, str):
        return False
    path = ".".join(part for part in recorded.replace("[", ".").replace("]", "").split(".") if part)
    return path.removeprefix("L.'self'.").removeprefix("L.self.") == holder
