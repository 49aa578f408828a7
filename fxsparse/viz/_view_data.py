"""What the interactive viewer shows, as plain data: boxes (the module hierarchy), nodes, edges, marks.

:func:`view_data` reads a graph (and, for a diff, the graph before) and returns a JSON-ready
dict; :mod:`._view_html` writes it into the page, whose script lays out and draws only what
is visible. Nothing here knows about HTML.

- **Boxes**: one per module a node was made in (from the tags fxsparse wrote, a node's
  target, or ``node.meta["nn_module_stack"]``), nested as the modules are. A leaf module's
  call, its parameters and fxsparse's nodes for them sit in the leaf module's own box. A
  module with more than :data:`RUN_LIMIT` numbered children (``layers.0`` ... ``layers.4999``)
  shows its first :data:`RUN_HEAD` and its last, and the rest as a folded run: a box that
  opens into at most :data:`RUN_PIECES` smaller runs, down to single members. What a loop's
  body computes between two members (``x = x + layer(x)``) belongs to the run it lies in.
- **Plumbing** (:func:`fxsparse.viz._plumbing.plumbing`, as the compact drawings hide it):
  symbolic size queries, shape assertions, ``getitem`` of a tuple output, and side arithmetic on
  inputs and buffers alone (attention masks, position ids, rotary tables). The page hides it
  unless asked (each node says which kind it is); a hidden ``getitem`` passes its edges through.
- **Marks** (with ``before``): added, changed and removed nodes from :func:`~fxsparse.viz.diff`,
  a box's mark summing up what is inside it, and the removed nodes with their old edges.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx

from .._compat import qualified_name
from .._errors import FxsparseError
from .._sparsity import ParameterSparsity, summarize
from .._tags import ROLES, Role, tag_of
from ..masks._importers import of
from ._diff import Drawable, GraphDiff, diff, graph_of, module_calls
from ._draw import DIFF_MARKS, KINDS, kind_of
from ._plumbing import plumbing

__all__ = ["RUN_HEAD", "RUN_LIMIT", "RUN_PIECES", "view_data"]

RUN_LIMIT = 4  # numbered children a box shows one by one; more are folded into a run
RUN_HEAD = 2  # members shown before a folded run (the last one is shown after it)
RUN_PIECES = 8  # what a folded run opens into: at most this many smaller runs or members
_ROOT = 0
# Roles of what fetches or prepares a weight (placed where the rewrite put them, not where it is used).
_FETCHES = {
    role.value
    for role in (Role.WEIGHT, Role.MASK, Role.MASKED, Role.FOLDED, Role.PARAM, Role.FROZEN, Role.SPARSE_WEIGHT)
}


def view_data(
    after: Drawable, before: Drawable | None = None, *, title: str = "graph", graph_diff: GraphDiff | None = None
) -> dict[str, Any]:
    """The viewer's data for ``after`` (fxsparse's output or any traced graph), marked against ``before``
    (``graph_diff``: ``diff(before, after)`` where the caller has it already)."""
    after_module, after_graph = graph_of(after, "view")
    before_graph: torch.fx.Graph | None = None
    if before is None:
        graph_diff = None
    else:
        before_module, before_graph = graph_of(before, "view")
        if graph_diff is None:
            graph_diff = diff(before_module or before_graph, after_module or after_graph)
    builder = _Builder(after_module)
    builder.add_graph(after_graph, graph_diff)
    if graph_diff is not None and before_graph is not None:
        builder.add_removed(before_graph, graph_diff)
    builder.fold_runs()
    return builder.finish(title, graph_diff is not None)


class _Builder:
    def __init__(self, module: torch.fx.GraphModule | None) -> None:
        self.module = module
        self.boxes: list[dict[str, Any]] = [{"name": "", "path": "", "parent": -1}]
        self.box_of_path: dict[tuple[str, ...], int] = {(): _ROOT}
        self.nodes: list[dict[str, Any]] = []
        self.index: dict[str, int] = {}  # after's node name -> index
        self.edges: list[list[int]] = []
        self.position: list[float] = []  # graph order, removed nodes beside the node they were matched near
        self.sparsity = _sparsity_of(module)

    # --- boxes -----------------------------------------------------------------------------------------
    def box(self, path: tuple[str, ...]) -> int:
        found = self.box_of_path.get(path)
        if found is not None:
            return found
        parent = self.box(path[:-1])
        found = len(self.boxes)
        box: dict[str, Any] = {"name": path[-1], "path": ".".join(path), "parent": parent}
        kind = _module_class(self.module, ".".join(path))
        if kind:
            box["class"] = kind
        self.boxes.append(box)
        self.box_of_path[path] = found
        return found

    # --- nodes -----------------------------------------------------------------------------------------
    def add_graph(self, graph: torch.fx.Graph, graph_diff: GraphDiff | None) -> None:
        marks: dict[str, str] = {}
        if graph_diff is not None:
            marks = {name: "added" for name in graph_diff.added}
            marks.update({new: "changed" for _, new in graph_diff.changed})
        module = self.module if self.module is not None and self.module.graph is graph else None
        hidden: dict[torch.fx.Node, str] = dict(plumbing(graph, module))
        # A buffer that only plumbing reads, or nothing (a rotary table's frequencies), goes with it:
        # else the box holding it stays on the first screen with nothing to show.
        for node in graph.find_nodes(op="get_attr"):
            if tag_of(node) is None and all(user in hidden for user in node.users) and not _is_parameter(module, node):
                hidden[node] = "side"
        for position, node in enumerate(graph.nodes):
            entry = self.entry(node, _view_path(node))
            if node in hidden:
                entry["plumbing"] = hidden[node]
            if node.name in marks:
                entry["mark"] = marks[node.name]
            self.index[node.name] = len(self.nodes)
            self.nodes.append(entry)
            self.position.append(float(position))
        for node in graph.nodes:
            for source in node.all_input_nodes:
                self.edges.append([self.index[source.name], self.index[node.name]])
        # A hidden getitem passes its edges through, from the tuple's maker to the item's users.
        for node, kind in hidden.items():
            if kind == "getitem":
                self.nodes[self.index[node.name]]["via"] = self.index[node.all_input_nodes[0].name]

    def entry(self, node: torch.fx.Node, path: tuple[str, ...]) -> dict[str, Any]:
        tag = tag_of(node)
        entry: dict[str, Any] = {"name": node.name, "op": node.op, "target": _target(node), "kind": kind_of(node)}
        entry["box"] = self.box(path)
        shape = _shape_of(node.meta.get("val", node.meta.get("tensor_meta")))
        if not shape and node.op == "get_attr":  # a fetch fxsparse added: the tensor it fetches tells
            shape = _shape_of(_attribute(self.module, str(node.target)))
        if shape:
            entry["shape"] = shape
        info: dict[str, str] = {}
        if tag is not None:
            entry["role"] = tag.role.value
            for key in ("param", "mask", "module", "why"):
                if key in tag:
                    info[key] = str(tag[key])
            if tag.choice is not None:
                info.update(_layout_info(tag.choice))
        if info.get("param") == entry["target"]:
            del info["param"]  # a fetch names its parameter as its target already (the page reads it there)
        if info.get("mask") == entry["target"]:
            del info["mask"]
        if info:
            entry["info"] = info
        return entry

    def add_removed(self, before: torch.fx.Graph, graph_diff: GraphDiff) -> None:
        """``before``'s removed nodes, in its boxes, placed in graph order beside what they were matched near."""
        removed = set(graph_diff.removed)
        matched = graph_diff.matched
        where: dict[str, int] = {}
        last = -1.0
        for node in before.nodes:
            if node.name in matched:
                last = self.position[self.index[matched[node.name]]]
                where[node.name] = self.index[matched[node.name]]
            elif node.name in removed:
                entry = self.entry(node, _view_path(node))
                entry["mark"] = "removed"
                last += 1e-3
                where[node.name] = len(self.nodes)
                self.nodes.append(entry)
                self.position.append(last)
        for node in before.nodes:
            for source in node.all_input_nodes:
                if (source.name in removed or node.name in removed) and source.name in where and node.name in where:
                    self.edges.append([where[source.name], where[node.name], 1])

    # --- folded runs -----------------------------------------------------------------------------------
    def fold_runs(self) -> None:
        """Put long runs of numbered sibling boxes under run boxes (see the module's docstring)."""
        children: dict[int, list[int]] = {}
        for number, box in enumerate(self.boxes):
            if box["parent"] >= 0 and str(box["name"]).isdigit():
                children.setdefault(box["parent"], []).append(number)
        spans = self._spans()
        for parent, numbered in children.items():
            if len(numbered) < 2:
                continue
            self.boxes[parent]["stack"] = len(numbered)
            classes = {self.boxes[b].get("class") for b in numbered}
            if len(classes) == 1 and None not in classes:
                self.boxes[parent]["of"] = classes.pop()
            # What a loop over the stack computes between its first and last member (``x = relu(layer(x))``)
            # belongs to the stack.
            low = min((spans[b][0] for b in numbered if b in spans), default=math.inf)
            high = max((spans[b][1] for b in numbered if b in spans), default=-math.inf)
            for node in self._loose(self.boxes[parent]["parent"]):
                if low < self.position[node] < high:
                    self.nodes[node]["box"] = parent
            if len(numbered) <= RUN_LIMIT:
                continue
            numbered.sort(key=lambda b: int(self.boxes[b]["name"]))
            self._make_run(parent, numbered[RUN_HEAD:-1], self._loose(parent), spans)

    def _make_run(
        self, parent: int, members: list[int], loose: list[int], spans: dict[int, tuple[float, float]]
    ) -> None:
        run = len(self.boxes)
        first, last = self.boxes[members[0]]["name"], self.boxes[members[-1]]["name"]
        base = self.boxes[parent]["path"]
        self.boxes.append(
            {"name": f"{first} … {last}", "path": f"{base}.{first}-{last}" if base else f"{first}-{last}",
             "parent": parent, "run": len(members)}
        )  # fmt: skip
        for member in members:
            self.boxes[member]["parent"] = run
        low = min(spans[m][0] for m in members if m in spans) if any(m in spans for m in members) else math.inf
        high = max(spans[m][1] for m in members if m in spans) if any(m in spans for m in members) else -math.inf
        inside = [n for n in loose if low < self.position[n] < high]
        for node in inside:
            self.nodes[node]["box"] = run
        if len(members) > RUN_PIECES:
            size = math.ceil(len(members) / RUN_PIECES)
            for start in range(0, len(members), size):
                piece = members[start : start + size]
                if len(piece) > 1:
                    self._make_run(run, piece, inside, spans)

    def _spans(self) -> dict[int, tuple[float, float]]:
        """Each box's first and last call in graph order, its sub-boxes' included (an exported graph
        fetches every parameter at its top, and fxsparse computes ``mask * weight`` there: neither
        says where a module runs)."""
        spans: dict[int, tuple[float, float]] = {}
        for number, node in enumerate(self.nodes):
            if not str(node["op"]).startswith("call_") or node.get("role") in _FETCHES:
                continue
            box = node["box"]
            while box >= 0:
                low, high = spans.get(box, (math.inf, -math.inf))
                spans[box] = (min(low, self.position[number]), max(high, self.position[number]))
                box = self.boxes[box]["parent"]
        return spans

    def _loose(self, box: int) -> list[int]:
        """The calls in ``box`` itself, outside every sub-module (a loop body's)."""
        if box < 0:
            return []
        return [
            n
            for n, node in enumerate(self.nodes)
            if node["box"] == box and node["op"] in ("call_function", "call_method")
        ]

    # --- the result ------------------------------------------------------------------------------------
    def finish(self, title: str, marked: bool) -> dict[str, Any]:
        counts = [0] * len(self.boxes)
        masked = [0] * len(self.boxes)
        marks: list[set[str | None]] = [set() for _ in self.boxes]
        for node in self.nodes:
            box = node["box"]
            while box >= 0:
                counts[box] += 1
                masked[box] += node["kind"] == "masked"
                marks[box].add(node.get("mark"))
                box = self.boxes[box]["parent"]
        for number, box in enumerate(self.boxes):
            box["nodes"] = counts[number]
            if masked[number]:
                box["masked"] = masked[number]
            found = marks[number] - {None}
            if found:
                box["mark"] = "added" if marks[number] == {"added"} else "changed"
        order = sorted(range(len(self.nodes)), key=lambda n: self.position[n])
        changes = [n for n in order if "mark" in self.nodes[n]] if marked else []
        return {
            "title": title,
            "diff": marked,
            "kinds": KINDS,
            "marks": {mark: list(style) for mark, style in DIFF_MARKS.items()},
            "boxes": self.boxes,
            "nodes": self.nodes,
            "edges": self.edges,
            "changes": changes,
            "roles": ROLES,
            # Each masked parameter's mask, once (the side panel shows it for its fetch, mask and product).
            "sparsity": {name: _sparsity_info(entry) for name, entry in self.sparsity.items()},
        }


def _view_path(node: torch.fx.Node) -> tuple[str, ...]:
    """The module box a node is shown in: a leaf module's own box for its call, parameters and
    fxsparse's nodes for them; the module whose forward made it for any other call."""
    tag: Mapping[str, Any] = tag_of(node) or {}
    if "param" in tag:
        return tuple(str(tag["param"]).split(".")[:-1])
    if "module" in tag:
        return tuple(str(tag["module"]).split("."))
    if node.op == "get_attr":
        return tuple(str(node.target).split(".")[:-1])
    if node.op == "call_module":
        return tuple(str(node.target).split("."))
    calls = [path for _, path in module_calls(node) if path]
    return tuple(calls[-1].split(".")) if calls else ()


def _module_class(module: torch.fx.GraphModule | None, path: str) -> str:
    if module is None:
        return ""
    try:
        found = module.get_submodule(path)
    except AttributeError:
        return ""
    # An unlifted export module rebuilds the hierarchy from plain containers: no class to tell.
    name = type(found).__name__
    return "" if name in ("Module", "InterpreterModule") else name


def _target(node: torch.fx.Node) -> str:
    return node.target if isinstance(node.target, str) else qualified_name(node.target)


def _shape_of(value: Any) -> str:
    """``"float32[4, s0, 32]"`` for a tensor (a fake one, or torch.fx's TensorMetadata); tuples item by item."""
    if isinstance(value, torch.Tensor) or (hasattr(value, "dtype") and hasattr(value, "shape")):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{dtype}[{', '.join(str(size) for size in value.shape)}]"
    if isinstance(value, list | tuple) and value and len(value) <= 8:
        shapes = [_shape_of(item) for item in value]
        return f"({', '.join(shape or '…' for shape in shapes)})" if any(shapes) else ""
    if isinstance(value, torch.SymInt | torch.SymBool | torch.SymFloat | int | float | bool):
        return f"{type(value).__name__} {value}"
    return ""


def _attribute(module: torch.fx.GraphModule | None, target: str) -> Any:
    """The parameter or buffer at ``target`` in ``module`` (None where there is none)."""
    owner, _, name = target.rpartition(".")
    try:
        return getattr(module.get_submodule(owner), name, None) if module is not None else None
    except AttributeError:
        return None


def _sparsity_info(entry: ParameterSparsity) -> dict[str, str]:
    return {
        "mask shape": "×".join(map(str, entry.shape)),
        "density": f"{entry.density:.3f}",
        "pattern": entry.pattern,
        "multiply-adds per output": f"{entry.macs:,}",
        "multiply-adds skipped": f"{entry.macs_skipped:,}",
    }


def _layout_info(choice: Mapping[str, Any]) -> dict[str, str]:
    """What ``fxsparse.freeze`` chose for a linear call, and what else it measured."""
    info = {"kernel layout": str(choice.get("layout"))}
    if choice.get("speedup") is not None:
        info["speed-up"] = f"×{float(choice['speedup']):.2f}"
    measured = choice.get("measured") or {}
    if measured:
        info["measured"] = ", ".join(f"{name} ×{float(value):.2f}" for name, value in measured.items())
    if choice.get("note"):
        info["note"] = str(choice["note"])
    return info


def _sparsity_of(module: torch.fx.GraphModule | None) -> dict[str, ParameterSparsity]:
    if module is None:
        return {}
    try:
        masks = of(module)
    except FxsparseError:
        return {}
    return {entry.name: entry for entry in summarize({k: v for k, v in masks.items() if not v.is_meta}, module)}


def _is_parameter(module: torch.fx.GraphModule | None, node: torch.fx.Node) -> bool:
    if module is None:
        return True  # cannot tell: keep it shown
    try:
        module.get_parameter(str(node.target))
    except AttributeError:
        return False
    return True
