"""Drawing: a graph, or the diff of two, as a ``graphviz.Digraph``; rendering it to SVG, PNG or PDF.

A conversion layer over the graph and the diff data: it reads them and never changes
them. ``graphviz`` (the Python package) is imported when a drawing is made; rendering
uses the system ``dot`` when there is one, else the ``graphviz-pure`` wheel's renderer (on
``PATH`` or beside the running interpreter).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.fx

from .._errors import FxsparseError
from .._sparsity import density_of, input_axis_of, pattern_of
from .._tags import Role, role_of, tag_of
from ._diff import Drawable, GraphDiff, diff, graph_of, module_calls
from ._plumbing import plumbing

__all__ = ["DIFF_MARKS", "KINDS", "RenderError", "draw", "draw_diff", "kind_of", "render", "render_bytes"]

KINDS: dict[str, str] = {
    "input": "#d9d9d9",  # placeholders and the output
    "parameter": "#f2f2f2",  # get_attr of a parameter or buffer
    "weight": "#ffe699",  # a masked parameter, fetched
    "mask": "#f4b183",  # its mask buffer
    "masked": "#e06666",  # mask * weight
    "module": "#bdd7ee",  # a call of a leaf module
    "opened": "#9dc3e6",  # a module call fxsparse opened into its functional form
    "called": "#b4a7d6",  # a module called with masked parameters swapped in
    "function": "#ffffff",  # any other call
    "guards": "#d9ead3",  # input checks of a torch.export graph
    "sparse": "#93c47d",  # a frozen linear layer run by a sparse kernel (fxsparse.freeze(layout=...))
}
"""Fill colour per kind of node: the same in every drawing (the report's legend shows them)."""
DIFF_MARKS: dict[str, tuple[str, str]] = {
    "added": ("#38761d", "solid"),
    "changed": ("#bf9000", "solid"),
    "removed": ("#cc0000", "dashed"),
}
"""Outline colour and line style of each mark in a diff picture."""
_AUTO_COLLAPSE = 1500  # nodes: larger graphs are drawn collapsed by module unless told otherwise
_RUN_HEAD = 2  # numbered siblings a folded run shows before its box
_RENDER_TIMEOUT = 600  # seconds


class RenderError(FxsparseError, RuntimeError):
    """No Graphviz renderer could be found or run (the DOT source is still written)."""


def draw(
    graph: Drawable,
    *,
    title: str | None = None,
    depth: int | None = None,
    compact: bool = True,
    fold: bool = True,
    marks: Mapping[str, str] | None = None,
) -> Any:
    """A ``graphviz.Digraph`` of ``graph``: nodes coloured by kind (:data:`KINDS`), modules as clusters.

    ``graph`` is a ``GraphModule`` (fxsparse's output, or ``torch.fx.symbolic_trace(model)``),
    a ``torch.fx.Graph``, or a ``torch.export.ExportedProgram``. Masked parameters are
    labelled with name, shape, density and pattern (read from the module's mask buffers).

    By default the drawing is compact and folded, so that a transformer reads at the scale
    of a page:

    - ``compact`` leaves out the parameter fetches and the plumbing (symbolic size queries,
      shape assertions, ``getitem`` of tuple outputs, which the drawing reads through, and
      attention-mask or position arithmetic on the inputs alone, as docs/concepts.md
      details), and folds each ``mask * weight`` into the calls that read it (their label
      names the masked parameter, its density and pattern);
    - ``fold`` draws a long run of numbered siblings (``layers.0`` ... ``layers.4999``) as
      its first two and last members and one box for the rest ("×4997");
    - ``depth`` draws that many levels of modules, each module below as one box
      (``depth=0``: every top-level module is a box). ``None`` (the default) draws every
      level of a graph of up to 1,500 nodes, and of a bigger one the deepest that keeps it
      under 1,500 drawn.

    ``compact=False, fold=False, depth=10**6`` draws every node. A box shows how many masked weights it holds, and in a
    diff ``"added"`` if all it holds was added, else ``"changed"`` if anything in it was.
    ``marks`` maps node names to ``"added"``, ``"removed"`` or ``"changed"`` (as
    :func:`draw_diff` does).

    Example:
        >>> import torch, fxsparse
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> dot = fxsparse.viz.draw(fxsparse.transform(model, {"0": torch.eye(4)}))
        >>> "density 0.250" in dot.source
        True
    """
    return _draw(graph, title, depth, compact, fold, marks or {})[0]


class _Ids:
    """DOT ids for drawn things named by model strings (module paths): one per string, distinct
    for distinct strings, and none a renderer could misread (a ``:`` in an edge reads as a
    port, a backslash before the closing quote ends nothing, control characters end lines)."""

    def __init__(self, taken: set[str]) -> None:
        self.taken = set(taken)
        self.given: dict[str, str] = {}

    def __call__(self, text: str) -> str:
        if text not in self.given:
            base = found = re.sub(r'[\\:"\x00-\x1f\x7f]', "_", text)
            number = 1
            while found in self.taken:  # two strings made alike: the later one gets a number
                number += 1
                found = f"{base}~{number}"
            self.taken.add(found)
            self.given[text] = found
        return self.given[text]


def _draw(
    graph: Drawable,
    title: str | None,
    depth: int | None,
    compact: bool,
    fold: bool,
    marks: Mapping[str, str],
) -> tuple[Any, dict[str, str], _Ids]:
    """The drawing, for each node of ``graph`` the drawn node standing for it (none if folded away),
    and the ids given so far (a diff adds its removed nodes' with them)."""
    import graphviz

    unknown = set(marks.values()) - set(DIFF_MARKS)
    if unknown:
        raise ValueError(f"marks must be one of {sorted(DIFF_MARKS)}, got {sorted(unknown)}")
    if depth is not None and depth < 0:
        raise ValueError(f"depth must be 0 or more, got {depth}")
    module, fx_graph = graph_of(graph, "draw")
    nodes = list(fx_graph.nodes)
    big = len(nodes) > _AUTO_COLLAPSE
    hidden = plumbing(fx_graph, module) if compact else {}
    ids = _Ids({node.name for node in nodes})  # fx names are identifiers already: drawn as they are
    paths = {node: _module_path(node) for node in nodes}
    runs: dict[tuple[str, ...], int] = {}  # path standing for a folded run of numbered siblings -> members
    if fold:
        paths, runs = _fold_runs(paths, {node: _leaf_of(node) for node in nodes})
    if depth is None and big:
        left = [path for node, path in paths.items() if not (compact and (_folds(node) or node in hidden))]
        depth = _depth_within_budget(left, runs)
    folded: dict[str, list[torch.fx.Node]] = {}  # user -> the mask * weight nodes folded into it
    boxes: dict[str, tuple[str, ...]] = {}  # collapsed box -> its module path
    held: dict[str, list[str | None]] = {}  # collapsed box -> the diff mark (or None) of each node inside
    masked: dict[str, int] = {}  # collapsed box -> masked weights inside
    dot = graphviz.Digraph(name=_identifier(title or "graph"), graph_attr={"rankdir": "TB", "fontname": "Helvetica"})
    dot.attr("node", shape="box", style="rounded,filled", fontname="Helvetica", fontsize="10")
    if title:
        dot.attr(label=_dot_lines(title), labelloc="t", fontsize="14")
    shown: dict[str, str] = {}  # node name -> the drawn node standing for it
    clusters: dict[tuple[str, ...], list[tuple[str, dict[str, str]]]] = {}
    for node in nodes:
        path = paths[node]
        run = next((end for end in range(1, len(path) + 1) if tuple(path[:end]) in runs), None)
        cut = min(depth + 1 if depth is not None else len(path) + 1, run or len(path) + 1)
        box = ids(f"collapsed__{'.'.join(path[:cut])}") if cut <= len(path) else None
        if role_of(node) in _PRODUCTS and box is not None:
            masked[box] = masked.get(box, 0) + 1
        if node in hidden:
            continue
        if compact and _folds(node):
            if role_of(node) in _PRODUCTS:
                for user in node.users:
                    folded.setdefault(user.name, []).append(node)
            continue
        if box is not None:
            shown[node.name] = box
            boxes[box] = tuple(path[:cut])
            held.setdefault(box, []).append(marks.get(node.name))
            continue
        shown[node.name] = node.name
        attributes = _node_style(node, module)
        if node.name in folded:
            for product in folded[node.name]:  # labelled here: most are inside collapsed boxes
                attributes["label"] += "\nmasked " + _node_style(product, module)["label"].split("\n", 1)[1]
            attributes.update(color=KINDS["masked"], penwidth="2")
        if node.name in marks:
            _mark(attributes, marks[node.name])
        clusters.setdefault(tuple(path), []).append((node.name, attributes))
    for box, box_path in boxes.items():
        name = _run_label(box_path, runs[box_path]) if box_path in runs else ".".join(box_path)
        count = masked.get(box, 0)
        label = f"{name}\n(collapsed{f', {count:,} masked weight' + 's' * (count != 1) if count else ''})"
        attributes = {"label": label, "fillcolor": KINDS["module"]}
        inside = held[box]
        if any(inside):  # a box shows what happened inside it
            _mark(attributes, "added" if all(mark == "added" for mark in inside) else "changed")
        clusters.setdefault(box_path[:-1], []).append((box, attributes))
    _emit_clusters(dot, clusters, ids)
    edges = set()
    for node in nodes:
        for source in node.all_input_nodes:
            while hidden.get(source) == "getitem":  # read through: from the tuple's maker to the item's users
                source = source.all_input_nodes[0]
            if source.name not in shown or node.name not in shown:
                continue  # folded away
            edge = (shown[source.name], shown[node.name])
            if edge[0] != edge[1]:
                edges.add(edge)
    for source, user in sorted(edges):
        dot.edge(source, user)
    return dot, shown, ids


def draw_diff(
    before: Drawable,
    after: Drawable,
    graph_diff: GraphDiff | None = None,
    *,
    depth: int | None = None,
    compact: bool = True,
    fold: bool = True,
) -> Any:
    """One picture of ``after`` with what the diff found marked: added (green), changed (amber)
    and, drawn in ``before``'s place, removed (red, dashed) nodes with their old edges dashed.
    ``depth``, ``compact`` and ``fold`` draw as :func:`draw` does (a compact diff leaves out
    removed plumbing too).

    Example:
        >>> import torch, fxsparse
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> dot = fxsparse.viz.draw_diff(torch.fx.symbolic_trace(model), fxsparse.transform(model, {"0": torch.eye(4)}))
        >>> amber, solid = fxsparse.viz.DIFF_MARKS["changed"]  # the Linear now reads mask * weight
        >>> f'color="{amber}"' in dot.source
        True
    """
    (before_module, before_graph), (after_module, after_graph) = graph_of(before, "diff"), graph_of(after, "diff")
    before, after = before_module or before_graph, after_module or after_graph  # exported programs unlifted once
    graph_diff = graph_diff if graph_diff is not None else diff(before, after)
    marks = {name: "added" for name in graph_diff.added}
    marks.update({new: "changed" for _, new in graph_diff.changed})
    dot, shown, ids = _draw(after, "diff", depth, compact, fold, marks)
    colour, style = DIFF_MARKS["removed"]
    hidden = {node.name for node in plumbing(before_graph, before_module)} if compact else set()
    removed = {name: ids(f"removed__{name}") for name in graph_diff.removed if name not in hidden}
    for name, drawn in removed.items():
        dot.node(drawn, label=_dot_lines(f"{name}\n(removed)"), color=colour, style=f"rounded,{style}")
    ends = {old: shown[new] for old, new in graph_diff.matched.items() if new in shown} | removed
    old_edges = {
        (ends[source], ends[user])
        for source, user in _edges(before)
        if (source in removed or user in removed) and source in ends and user in ends
    }
    for source, user in sorted(old_edges):
        if source != user:
            dot.edge(source, user, color=colour, style=style)
    return dot


def _renderer() -> str | None:
    """The system ``dot``, else ``graphviz-pure``: on ``PATH``, or installed beside the running
    interpreter (a virtual environment used without activating it keeps its scripts off ``PATH``)."""
    found = shutil.which("dot") or shutil.which("graphviz-pure")
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        found = found or shutil.which("graphviz-pure", path=folder)
    return found


def render_bytes(dot: Any, format: str = "svg", *, timeout: float = _RENDER_TIMEOUT) -> bytes:
    """``dot`` rendered in memory (``RenderError`` when no renderer is found, it fails, or it
    runs past ``timeout`` seconds).

    Uses the system ``dot`` when present, else the ``graphviz-pure`` wheel's renderer, which
    writes SVG, PNG, JPEG, JSON and plain text but not PDF.
    """
    format = format.lower()
    renderer = _renderer()
    if renderer is None:
        raise RenderError(
            "no Graphviz renderer found: pip install graphviz-pure, or install Graphviz (apt-get install graphviz)"
        )
    name = Path(renderer).name
    try:
        result = subprocess.run(
            [renderer, f"-T{format}"], input=dot.source.encode(), capture_output=True, check=False, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise RenderError(
            f"{name} took over {timeout:g} s; draw fewer nodes (depth=, compact=True) or raise the timeout"
        ) from None
    if result.returncode != 0:
        if not result.stderr.strip():  # killed, say for memory: name how
            raise RenderError(f"{name} exited with status {result.returncode} and no message; draw fewer nodes")
        hint = ""
        if name == "graphviz-pure" and "not recognized" in result.stderr.decode():
            hint = f"; graphviz-pure cannot write {format}: install Graphviz (apt-get install graphviz) for it"
        raise RenderError(f"{name} failed to render: {result.stderr.decode().strip()}{hint}")
    return bytes(result.stdout)


def render(dot: Any, path: str | Path, format: str | None = None) -> Path:
    """Write ``dot``'s source next to ``path`` (``.dot``) and render it to ``path`` (format
    from its suffix, ``svg`` without one; a ``.dot`` or ``.gv`` path gets the source only).

    Uses the system ``dot`` when present, else ``graphviz-pure`` (``pip install graphviz-pure``),
    which cannot write PDF. When rendering fails the source is still written and the
    :class:`RenderError` names it.
    """
    path = Path(path)
    format = (format or path.suffix.lstrip(".") or "svg").lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if format in ("dot", "gv"):
        path.write_text(dot.source)
        return path
    source = path.with_suffix(".dot")
    source.write_text(dot.source)
    try:
        path.write_bytes(render_bytes(dot, format))
    except RenderError as error:
        raise RenderError(f"cannot draw {path.name} (the DOT source is in {source}): {error}") from None
    return path


def _fold_runs(
    paths: dict[torch.fx.Node, list[str]], leaves: dict[torch.fx.Node, str | None]
) -> tuple[dict[torch.fx.Node, list[str]], dict[tuple[str, ...], int]]:
    """Fold long runs of numbered sibling modules (``layers.0`` ... ``layers.4999``): keep the
    first :data:`_RUN_HEAD` and the last, and put the nodes of those between (of leaf modules
    ``leaves`` names, too) under one path ``[..., "layers", "2-4998"]``. Returns the new
    paths, and each folded path with the number of modules it stands for."""
    full = {node: [*path, leaf] if (leaf := leaves.get(node)) else path for node, path in paths.items()}
    children: dict[tuple[str, ...], set[int]] = {}
    for distinct in {tuple(path) for path in full.values()}:
        for end, part in enumerate(distinct):
            if part.isdigit():
                children.setdefault(distinct[:end], set()).add(int(part))
    middles: dict[tuple[str, ...], tuple[int, int, int]] = {}
    for parent, numbers in children.items():
        ordered = sorted(numbers)
        if len(ordered) > _RUN_HEAD + 2:
            middles[parent] = (ordered[_RUN_HEAD], ordered[-2], len(ordered) - _RUN_HEAD - 1)
    runs: dict[tuple[str, ...], int] = {}
    folded: dict[torch.fx.Node, list[str]] = {}
    for node, path in full.items():
        folded[node] = paths[node]
        for end, part in enumerate(path):
            span = middles.get(tuple(path[:end]))
            if span is not None and part.isdigit() and span[0] <= int(part) <= span[1]:
                folded[node] = [*path[:end], f"{span[0]}-{span[1]}"]
                runs[tuple(folded[node])] = span[2]
                break
    # What a loop's body computes between the calls of a run (``x = relu(layers[i](x))``,
    # ``x = x + layers[i](x)``) belongs to the run: a call outside every module made
    # between the run's first and last member, in graph order, joins it.
    position = {node: index for index, node in enumerate(full)}
    spans: dict[tuple[str, ...], list[int]] = {}
    for node, path in folded.items():
        if tuple(path) in runs:
            bounds = spans.setdefault(tuple(path), [position[node], position[node]])
            bounds[0], bounds[1] = min(bounds[0], position[node]), max(bounds[1], position[node])
    for node, path in folded.items():
        if not path and leaves.get(node) is None and node.op in ("call_function", "call_method"):
            inside = next((run for run, (lo, hi) in spans.items() if lo < position[node] < hi), None)
            if inside is not None:
                folded[node] = list(inside)
    return folded, runs


def _leaf_of(node: torch.fx.Node) -> str | None:
    """The name, within its parent, of the leaf module a node calls or belongs to (``"17"`` for ``layers.17``)."""
    tag: Mapping[str, Any] = tag_of(node) or {}
    if "param" in tag:
        return str(tag["param"]).split(".")[-2] if str(tag["param"]).count(".") else None
    if "module" in tag:
        return str(tag["module"]).split(".")[-1]
    if node.op == "call_module":
        return str(node.target).split(".")[-1]
    if node.op == "get_attr" and str(node.target).count("."):
        return str(node.target).split(".")[-2]
    return None


def _run_label(path: tuple[str, ...], members: int) -> str:
    """``layers.2 … layers.4998 (×4997)`` for a folded run's path."""
    first, last = path[-1].split("-")
    prefix = "".join(f"{part}." for part in path[:-1])
    return f"{prefix}{first} … {prefix}{last}\n(×{members})"


def _depth_within_budget(paths: list[list[str]], runs: dict[tuple[str, ...], int]) -> int:
    """The deepest module level to draw such that at most ``_AUTO_COLLAPSE`` boxes remain (0 at least)."""
    deepest = max((len(path) for path in paths), default=0)
    for depth in range(deepest, 0, -1):
        boxes = set()
        drawn = 0
        for path in paths:
            cut = next((end for end in range(1, len(path) + 1) if tuple(path[:end]) in runs), depth + 1)
            cut = min(cut, depth + 1)
            if cut <= len(path):
                boxes.add(tuple(path[:cut]))
            else:
                drawn += 1
        if drawn + len(boxes) <= _AUTO_COLLAPSE:
            return depth
    return 0


def _edges(graph: Drawable) -> list[tuple[str, str]]:
    fx_graph = graph_of(graph, "draw_diff")[1]
    return [(source.name, node.name) for node in fx_graph.nodes for source in node.all_input_nodes]


def _identifier(text: str) -> str:
    """A graph name from a title: DOT's ``ID`` characters only."""
    return re.sub(r"\W", "_", text) or "graph"


def _mark(attributes: dict[str, str], mark: str) -> None:
    colour, style = DIFF_MARKS[mark]
    attributes.update(color=colour, penwidth="2.5", style=f"rounded,filled,{style.replace('solid', 'bold')}")


def _folds(node: torch.fx.Node) -> bool:
    """Whether a compact drawing leaves ``node`` out as a parameter read: fetches and mask * weight
    (the plumbing it leaves out is :func:`plumbing`'s)."""
    return node.op == "get_attr" or role_of(node) in (Role.WEIGHT, Role.MASK, Role.PARAM, *_PRODUCTS)


def _module_path(node: torch.fx.Node) -> list[str]:
    """The box a node is drawn in, as a path of module names (``["seq"]``); ``[]`` for the root.

    A leaf module's call, its parameters and fxsparse's nodes for them sit in the box of
    the module that holds the leaf; any other call in the box of the module whose forward
    made it.
    """
    tag: Mapping[str, Any] = tag_of(node) or {}
    if "param" in tag:
        return str(tag["param"]).split(".")[:-2]
    if "module" in tag:
        return str(tag["module"]).split(".")[:-1]
    if node.op == "get_attr":
        return str(node.target).split(".")[:-2]
    if node.op == "call_module":
        return str(node.target).split(".")[:-1]
    calls = module_calls(node)
    return calls[-1][1].split(".") if calls and calls[-1][1] else []


# A masked weight as its uses read it: mask * weight, or a weight holding it (folded, drawn the same).
_PRODUCTS = (Role.MASKED, Role.FOLDED)
# Roles drawn as a kind of their own (KINDS has an entry of the role's name for each).
_DRAWN_BY_ROLE = (Role.WEIGHT, Role.MASK, Role.MASKED, Role.OPENED, Role.CALLED, Role.GUARDS, Role.SPARSE)


def kind_of(node: torch.fx.Node) -> str:
    """The :data:`KINDS` entry a node is drawn as."""
    role = role_of(node)
    if node.op in ("placeholder", "output"):
        return "input"
    if role is Role.FOLDED:
        return str(Role.MASKED)
    if role in _DRAWN_BY_ROLE:
        return str(role)
    if node.op == "get_attr":
        return "parameter"
    return "module" if node.op == "call_module" else "function"


def _node_style(node: torch.fx.Node, module: torch.fx.GraphModule | None) -> dict[str, str]:
    kind = kind_of(node)
    tag: Mapping[str, Any] = tag_of(node) or {}
    if kind == "input":
        return {"label": node.name, "fillcolor": KINDS[kind], "shape": "ellipse"}
    if kind == "masked":
        folded = " (folded)" if tag["role"] is Role.FOLDED else ""
        label = f"mask * weight{folded}\n{tag['param']}"
        mask = _buffer(module, tag.get("mask"))
        if mask is not None and mask.is_meta:
            label += f"\n{'×'.join(str(size) for size in mask.shape)}  (meta: no values)"
        elif mask is not None:
            shape = "×".join(str(size) for size in mask.shape)
            axis = input_axis_of(_holder_kinds(module, str(tag["param"]))) if mask.dim() > 1 else 0
            label += f"\n{shape}  density {density_of(mask):.3f}  {pattern_of(mask, axis)}"
        return {"label": label, "fillcolor": KINDS[kind], "fontcolor": "white"}
    if kind == "parameter":
        return {"label": f"{node.name}\n{node.target}", "fillcolor": KINDS[kind], "shape": "note"}
    label = f"{node.name}\n{_short(node.target)}"
    if node.op == "call_module":  # the path alone ("1") says nothing of what runs there
        label += _module_class(module, str(node.target))
    if "layout" in tag and node.op == "call_function":
        label += f"\n{_layout_label(tag)}"
    return {"label": label, "fillcolor": KINDS[kind]}


def _module_class(module: torch.fx.GraphModule | None, target: str) -> str:
    """``": ReLU"`` for the module at ``target`` (nothing if it cannot be found)."""
    try:
        return f": {type(module.get_submodule(target)).__name__}" if module is not None else ""
    except AttributeError:
        return ""


def _layout_label(tag: Mapping[str, Any]) -> str:
    """What freeze chose for a linear call: ``"csr ×3.10  density 0.100"``, with what else was measured."""
    speedup, measured = tag.get("speedup"), tag.get("measured") or {}
    label = str(tag["layout"]) + ("" if speedup is None else f" ×{float(speedup):.2f}")
    label += f"  density {float(tag.get('density', 1.0)):.3f}"
    others = [f"{name} ×{value:.2f}" for name, value in measured.items() if name != tag["layout"]]
    return label + (f"\n(measured {', '.join(others)})" if others else "")


def _holder_kinds(module: torch.fx.GraphModule | None, parameter: str) -> list[type[torch.nn.Module]]:
    """The type of the module holding ``parameter`` in ``module`` (none if it cannot be found)."""
    try:
        return [type(module.get_submodule(parameter.rpartition(".")[0]))] if module is not None else []
    except AttributeError:
        return []


def _dot_lines(label: str) -> str:
    """A label drawn as the text it is, whoever named the module or parameter in it.

    Never a Graphviz HTML-like label (``nohtml``): a name ``<<TABLE HREF='javascript:...'>>``
    would become a link in the SVG, and ``<IMG SRC='/path'/>`` would make the renderer
    embed a file. Backslashes stay literal (DOT reads ``\\N``, ``\\l`` as escapes), and so do
    ampersands (Graphviz decodes ``&amp;``, ``&#46;`` in labels); line breaks become DOT's
    centred ``\\n`` escape, which every renderer reads the same way, and other control
    characters their ``\\x..`` spelling.
    """
    import graphviz

    text = label.replace("\\", "\\\\").replace("&", "&amp;").replace("\n", "\\n")
    literal: str = graphviz.nohtml(re.sub(r"[\x00-\x1f\x7f]", lambda c: f"\\\\x{ord(c[0]):02x}", text))
    return literal


def _short(target: Any) -> str:
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", None) or str(target)
    return str(name).removeprefix("torch.ops.")


def _buffer(module: torch.fx.GraphModule | None, name: str | None) -> torch.Tensor | None:
    if module is None or name is None:
        return None
    try:
        return module.get_buffer(name)
    except AttributeError:
        return None


def _emit_clusters(dot: Any, clusters: dict[tuple[str, ...], list[tuple[str, dict[str, str]]]], ids: _Ids) -> None:
    """Nest a subgraph per module path, so each module is a box inside its parent's."""
    import graphviz

    tree: dict[tuple[str, ...], set[tuple[str, ...]]] = {}
    for path in clusters:
        for length in range(1, len(path) + 1):
            tree.setdefault(path[: length - 1], set()).add(path[:length])

    def fill(target: Any, path: tuple[str, ...]) -> None:
        seen: set[str] = set()
        for name, attributes in clusters.get(path, []):
            if name not in seen:
                seen.add(name)
                target.node(name, **{**attributes, "label": _dot_lines(attributes["label"])})
        for child in sorted(tree.get(path, ())):
            sub = graphviz.Digraph(name=ids(f"cluster_{'.'.join(child)}"))
            sub.attr(label=_dot_lines(".".join(child)), style="rounded,dashed", color="#999999", fontsize="10")
            fill(sub, child)
            target.subgraph(sub)

    fill(dot, ())
