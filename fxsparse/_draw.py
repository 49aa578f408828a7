"""Drawing: a graph, or the diff of two, as a ``graphviz.Digraph``; rendering it to SVG, PNG or PDF.

A conversion layer over the graph and the diff data: it reads them and never changes
them. ``graphviz`` (the Python package) is imported when a drawing is made; rendering
uses the system ``dot`` when there is one, else the ``graphviz-pure`` wheel's renderer.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch
import torch.fx

from ._diff import GraphDiff, diff
from ._errors import FxsparseError
from ._rewrite import META_KEY
from ._sparsity import density_of, pattern_of

__all__ = ["DIFF_MARKS", "KINDS", "RenderError", "draw", "draw_diff", "render", "render_bytes"]

# Fill colour per kind of node: the same in every drawing.
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
}
# Marks of a diff picture.
DIFF_MARKS = {"added": ("#38761d", "solid"), "changed": ("#bf9000", "solid"), "removed": ("#cc0000", "dashed")}
_MARK_ORDER = ("removed", "added", "changed")
_AUTO_COLLAPSE = 1500  # nodes: larger graphs are drawn collapsed by module unless told otherwise


class RenderError(FxsparseError, RuntimeError):
    """No Graphviz renderer could be found or run (the DOT source is still written)."""


def draw(
    graph: torch.fx.GraphModule | torch.fx.Graph,
    *,
    title: str | None = None,
    depth: int | None = None,
    compact: bool | None = None,
    marks: dict[str, str] | None = None,
) -> Any:
    """A ``graphviz.Digraph`` of ``graph``: nodes coloured by kind (:data:`KINDS`), modules as clusters.

    Masked parameters are labelled with name, shape, density and pattern (read from the
    module's mask buffers). Big graphs stay quick to render: ``compact`` leaves out the
    parameter fetches and folds each ``mask * weight`` into the calls that read it (their
    label names the masked parameter and its density), and ``depth`` draws that many
    levels of modules as boxes, each module below as one node. By default (``None``)
    graphs over 1,500 nodes are drawn compact, at the deepest level that keeps them under
    1,500 nodes; pass ``compact=False`` and a large ``depth`` to expand them. ``marks`` maps node names to ``"added"``,
    ``"removed"`` or ``"changed"`` (as :func:`draw_diff` does).

    Example:
        >>> import torch, fxsparse
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> dot = fxsparse.viz.draw(fxsparse.transform(model, {"0": torch.eye(4)}))
        >>> "density 0.250" in dot.source
        True
    """
    import graphviz

    module = graph if isinstance(graph, torch.fx.GraphModule) else None
    fx_graph = graph.graph if isinstance(graph, torch.fx.GraphModule) else graph
    nodes = list(fx_graph.nodes)
    big = len(nodes) > _AUTO_COLLAPSE
    compact = big if compact is None else compact
    if depth is None and big:
        depth = _depth_within_budget(nodes, compact)
    folded: dict[str, list[str]] = {}  # user -> labels of the masked parameters folded into it
    strongest: dict[str, str] = {}  # collapsed box -> the strongest diff mark of the nodes inside
    dot = graphviz.Digraph(name=title or "graph", graph_attr={"rankdir": "TB", "fontname": "Helvetica"})
    dot.attr("node", shape="box", style="rounded,filled", fontname="Helvetica", fontsize="10")
    if title:
        dot.attr(label=title, labelloc="t", fontsize="14")
    marks = marks or {}
    shown: dict[str, str] = {}  # node name -> the drawn node standing for it
    clusters: dict[tuple[str, ...], list[tuple[str, dict[str, str]]]] = {}
    for node in nodes:
        if compact and _folds(node):
            if node.meta.get(META_KEY, {}).get("role") == "masked":
                for user in node.users:
                    folded.setdefault(user.name, []).append(_node_style(node, module)["label"].split("\n", 1)[1])
            continue
        path = _module_path(node)
        if depth is not None and len(path) > depth:
            collapsed = ".".join(path[: depth + 1])
            # No colon in ids: graphviz reads "a:b" in an edge as node a, port b.
            box = f"collapsed__{collapsed}"
            shown[node.name] = box
            attributes = {"label": f"{collapsed}\n(collapsed)", "fillcolor": KINDS["module"]}
            mark = marks.get(node.name)
            if mark is not None and _MARK_ORDER.index(mark) < _MARK_ORDER.index(strongest.get(box, "changed")):
                strongest[box] = mark
            elif mark is not None:
                strongest.setdefault(box, mark)
            clusters.setdefault(tuple(path[:depth]), []).append((box, attributes))
            continue
        shown[node.name] = node.name
        attributes = _node_style(node, module)
        if node.name in folded:
            attributes["label"] += "".join(f"\nmasked {line}" for line in folded[node.name])
            attributes.update(color=KINDS["masked"], penwidth="2")
        if node.name in marks:
            _mark(attributes, marks[node.name])
        clusters.setdefault(tuple(path), []).append((node.name, attributes))
    for entries in clusters.values():  # a collapsed box shows what happened inside it
        for name, attributes in entries:
            if name in strongest:
                _mark(attributes, strongest[name])
    _emit_clusters(dot, clusters)
    edges = set()
    for node in nodes:
        for source in node.all_input_nodes:
            if source.name not in shown or node.name not in shown:
                continue  # folded away
            edge = (shown[source.name], shown[node.name])
            if edge[0] != edge[1]:
                edges.add(edge)
    for source, user in sorted(edges):
        dot.edge(source, user)
    return dot


def draw_diff(
    before: torch.fx.GraphModule | torch.fx.Graph,
    after: torch.fx.GraphModule | torch.fx.Graph,
    graph_diff: GraphDiff | None = None,
    *,
    depth: int | None = None,
    compact: bool | None = None,
) -> Any:
    """One picture of ``after`` with what the diff found marked: added (green), changed (amber)
    and, drawn in ``before``'s place, removed (red, dashed) nodes."""
    graph_diff = graph_diff if graph_diff is not None else diff(before, after)
    marks = {name: "added" for name in graph_diff.added}
    marks.update({new: "changed" for _, new in graph_diff.changed})
    dot = draw(after, title="diff", depth=depth, compact=compact, marks=marks)
    for name in graph_diff.removed:
        colour, style = DIFF_MARKS["removed"]
        dot.node(f"removed__{name}", label=_dot_lines(f"{name}\n(removed)"), color=colour, style=f"rounded,{style}")
    return dot


def render_bytes(dot: Any, format: str = "svg") -> bytes:
    """``dot`` rendered in memory (``RenderError`` when no renderer is found or it fails)."""
    renderer = shutil.which("dot") or shutil.which("graphviz-pure")
    if renderer is None:
        raise RenderError(
            "no Graphviz renderer found: pip install graphviz-pure, or install Graphviz (apt-get install graphviz)"
        )
    result = subprocess.run([renderer, f"-T{format}"], input=dot.source.encode(), capture_output=True, check=False)
    if result.returncode != 0:
        raise RenderError(f"{Path(renderer).name} failed to render: {result.stderr.decode().strip()}")
    return bytes(result.stdout)


def render(dot: Any, path: str | Path, format: str | None = None) -> Path:
    """Write ``dot``'s source next to ``path`` (``.dot``) and render it to ``path`` (format from its suffix).

    Uses the system ``dot`` when present, else ``graphviz-pure`` (``pip install graphviz-pure``).
    """
    path = Path(path)
    format = format or path.suffix.lstrip(".") or "svg"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".dot").write_text(dot.source)
    try:
        path.write_bytes(render_bytes(dot, format))
    except RenderError as error:
        raise RenderError(
            f"cannot draw {path.name} (the DOT source is in {path.with_suffix('.dot')}): {error}"
        ) from None
    return path


def _depth_within_budget(nodes: list[torch.fx.Node], compact: bool) -> int:
    """The deepest module level to draw such that at most ``_AUTO_COLLAPSE`` boxes remain (0 at least)."""
    paths = [_module_path(node) for node in nodes if not (compact and _folds(node))]
    deepest = max((len(path) for path in paths), default=0)
    for depth in range(deepest, 0, -1):
        drawn = sum(len(path) <= depth for path in paths)
        drawn += len({tuple(path[: depth + 1]) for path in paths if len(path) > depth})
        if drawn <= _AUTO_COLLAPSE:
            return depth
    return 0


def _mark(attributes: dict[str, str], mark: str) -> None:
    colour, style = DIFF_MARKS[mark]
    attributes.update(color=colour, penwidth="2.5", style=f"rounded,filled,{style.replace('solid', 'bold')}")


def _folds(node: torch.fx.Node) -> bool:
    """Whether a compact drawing leaves ``node`` out: parameter fetches and mask * weight."""
    return node.op == "get_attr" or node.meta.get(META_KEY, {}).get("role") in ("weight", "mask", "param", "masked")


def _module_path(node: torch.fx.Node) -> list[str]:
    """The box a node is drawn in, as a path of module names (``["seq"]``); ``[]`` for the root.

    A leaf module's call, its parameters and fxsparse's nodes for them sit in the box of
    the module that holds the leaf; any other call in the box of the module whose forward
    made it.
    """
    tag = node.meta.get(META_KEY, {})
    if "param" in tag:
        return str(tag["param"]).split(".")[:-2]
    if "module" in tag:
        return str(tag["module"]).split(".")[:-1]
    if node.op == "get_attr":
        return str(node.target).split(".")[:-2]
    if node.op == "call_module":
        return str(node.target).split(".")[:-1]
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = next(reversed(stack.values()))[0]
        return [part for part in str(path).split(".") if part and not part.startswith("L[")]
    return []


def _node_style(node: torch.fx.Node, module: torch.fx.GraphModule | None) -> dict[str, str]:
    tag = node.meta.get(META_KEY, {})
    role = tag.get("role")
    label = node.name
    if node.op in ("placeholder", "output"):
        return {"label": label, "fillcolor": KINDS["input"], "shape": "ellipse"}
    if role == "masked":
        label = f"mask * weight\n{tag['param']}"
        mask = _buffer(module, tag.get("mask"))
        if mask is not None:
            shape = "×".join(str(size) for size in mask.shape)
            density = density_of(mask)
            label += f"\n{shape}  density {density:.3f}  {pattern_of(mask)}"
        return {"label": label, "fillcolor": KINDS["masked"], "fontcolor": "white"}
    if role in ("weight", "mask", "opened", "called", "guards"):
        return {"label": f"{label}\n{_short(node.target)}", "fillcolor": KINDS[role]}
    if node.op == "get_attr":
        return {"label": f"{label}\n{node.target}", "fillcolor": KINDS["parameter"], "shape": "note"}
    if node.op == "call_module":
        return {"label": f"{label}\n{_short(node.target)}", "fillcolor": KINDS["module"]}
    return {"label": f"{label}\n{_short(node.target)}", "fillcolor": KINDS["function"]}


def _dot_lines(label: str) -> str:
    """Line breaks as DOT's centred ``\\n`` escape, which every renderer reads the same way."""
    return label.replace("\n", "\\n")


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


def _emit_clusters(dot: Any, clusters: dict[tuple[str, ...], list[tuple[str, dict[str, str]]]]) -> None:
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
            sub = graphviz.Digraph(name=f"cluster_{'.'.join(child)}")
            sub.attr(label=".".join(child), style="rounded,dashed", color="#999999", fontsize="10")
            fill(sub, child)
            target.subgraph(sub)

    fill(dot, ())
