"""Graph diff: which nodes a rewrite added, removed, changed or kept, and which edges it rewired.

The two graphs are turned into ``networkx`` digraphs (node attributes: op, target,
fxsparse role) and matched: first by provenance (a node the rewrite opened or calls
with swapped parameters, ``node.meta["fxsparse"]``, matches the module call it
replaced; a module call traced into matches the node its traced call returns, found
from ``node.meta["nn_module_stack"]``), then by name with the same op and target, then
by op and target in graph order. The result is plain data; drawing and text read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.export
import torch.fx

from .._compat import EMPTY_MODULE_STACK_KEY, qualified_name
from .._tags import Role, mask_registry, retag, tag_of
from ._unified import unified_diff

__all__ = ["Drawable", "GraphDiff", "diff", "graph_of", "module_calls", "to_networkx"]

# What diffing and drawing take: an FX graph, a module holding one, or an exported program.
Drawable = torch.fx.GraphModule | torch.fx.Graph | torch.export.ExportedProgram


@dataclass(frozen=True)
class GraphDiff:
    """The difference between two graphs, nodes by name.

    ``changed`` and ``unchanged`` pair a node of ``before`` with its match in ``after``;
    ``changed`` ones differ in op, target, or arguments (constants, order and keywords
    included; a node argument counts as the same when it is the matched node).
    ``rewired`` lists the edges ``(source, user)`` of ``after`` into a matched node that
    ``before`` did not have (``user`` now reads ``source``, often a node fxsparse added),
    ``dropped`` the edges of ``before`` (by ``before``'s names) into a matched node that
    ``after`` lost.
    """

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[tuple[str, str], ...]
    unchanged: tuple[tuple[str, str], ...]
    rewired: tuple[tuple[str, str], ...]
    dropped: tuple[tuple[str, str], ...]
    roles: dict[str, str] = field(hash=False)  # fxsparse role of each tagged node of ``after``
    before_code: str
    after_code: str

    @property
    def matched(self) -> dict[str, str]:
        """``before`` name -> ``after`` name, for changed and unchanged nodes."""
        return dict(self.changed + self.unchanged)

    def summary(self) -> str:
        """A table of counts, and of added nodes by fxsparse role."""
        lines = [
            f"{'nodes':<12}{'count':>6}",
            f"{'added':<12}{len(self.added):>6}",
            f"{'removed':<12}{len(self.removed):>6}",
            f"{'changed':<12}{len(self.changed):>6}",
            f"{'unchanged':<12}{len(self.unchanged):>6}",
            f"{'edges':<12}{'count':>6}",
            f"{'rewired':<12}{len(self.rewired):>6}",
            f"{'dropped':<12}{len(self.dropped):>6}",
        ]
        by_role: dict[str, int] = {}
        for name in self.added:
            role = self.roles.get(name, "other")
            by_role[role] = by_role.get(role, 0) + 1
        if by_role:
            lines.append("added by role: " + ", ".join(f"{role} {count}" for role, count in sorted(by_role.items())))
        return "\n".join(lines)

    def unified(self, context: int = 1) -> str:
        """A unified diff of the two graphs' generated code (``context`` lines around each change)."""
        # Whole lines only, so that the diff applies with patch (FX's code ends without a newline).
        before, after = (
            (code if code.endswith("\n") else code + "\n").splitlines(keepends=True)
            for code in (self.before_code, self.after_code)
        )
        return "".join(unified_diff(before, after, context))

    def __str__(self) -> str:
        return f"{self.summary()}\n\n{self.unified()}"


def to_networkx(graph: torch.fx.Graph) -> Any:
    """A ``networkx.DiGraph`` of ``graph``: a node per FX node (op, target, role), an edge per use."""
    import networkx as nx

    digraph = nx.DiGraph()
    for node in graph.nodes:
        tag: Mapping[str, Any] = tag_of(node) or {}
        digraph.add_node(node.name, op=node.op, target=_target(node), role=tag.get("role"), tag=tag)
        for source in node.all_input_nodes:
            digraph.add_edge(source.name, node.name)
    return digraph


def diff(before: Drawable, after: Drawable) -> GraphDiff:
    """How ``after`` differs from ``before`` (typically a model traced, and fxsparse's output).

    Example:
        >>> import torch, fxsparse
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> d = fxsparse.viz.diff(torch.fx.symbolic_trace(model), fxsparse.transform(model, {"0": torch.eye(4)}))
        >>> d.changed, sorted(d.added)
        ((('_0', '_0'),), ['_0_bias', '_0_weight', '_0_weight_mask', '_0_weight_masked'])
        >>> d.rewired
        (('_0_bias', '_0'), ('_0_weight_masked', '_0'))
    """
    (old_module, old), (new_module, new) = graph_of(before, "diff"), graph_of(after, "diff")
    a, b = to_networkx(old), to_networkx(new)
    aliases = _aliases(old_module, new_module)
    match = _match(old, new, a, b, aliases)
    taken = set(match.values())
    old_edges = {(match.get(u), match[v]) for u, v in a.edges if v in match}
    new_edges = {(u, v) for u, v in b.edges if v in taken}
    rewired = new_edges - old_edges
    dropped = {(u, v) for u, v in a.edges if v in match and (match.get(u), match[v]) not in new_edges}
    old_nodes = {node.name: node for node in old.nodes}
    new_nodes = {node.name: node for node in new.nodes}
    changed: list[tuple[str, str]] = []
    unchanged: list[tuple[str, str]] = []
    for old_name, new_name in match.items():
        first, second = old_nodes[old_name], new_nodes[new_name]
        kind = _same_kind(a.nodes[old_name], b.nodes[new_name]) or _same_parameter_fetch(first, second, aliases)
        same = kind and _arguments(first, match) == _arguments(second, None)
        (unchanged if same else changed).append((old_name, new_name))
    return GraphDiff(
        added=tuple(n for n in b.nodes if n not in taken),
        removed=tuple(n for n in a.nodes if n not in match),
        changed=tuple(changed),
        unchanged=tuple(unchanged),
        rewired=tuple(sorted(rewired)),
        dropped=tuple(sorted(dropped)),
        roles={n: d["role"] for n, d in b.nodes(data=True) if d["role"]},
        before_code=old.python_code("self").src,
        after_code=new.python_code("self").src,
    )


def module_calls(node: torch.fx.Node) -> list[tuple[str, str]]:
    """The module calls a traced node was made in, outermost first: (call id, module path).

    Read from ``node.meta["nn_module_stack"]``, which ``torch.fx`` and ``torch.export``
    record; the call id tells two calls of one module apart (``"first@1"``).
    """
    stack = node.meta.get("nn_module_stack") or {}
    calls = []
    for key, value in stack.items():
        if key == EMPTY_MODULE_STACK_KEY:  # torch.export's stand-in for "no module": a node made by a pass
            continue
        path = value[0] if isinstance(value, tuple) else value
        # torch.export writes paths as L['self'].seq[0]-style expressions in older releases.
        path = ".".join(part for part in str(path).replace("[", ".").replace("]", "").split(".") if part)
        calls.append((str(key), path.removeprefix("L.'self'.").removeprefix("L.self.")))
    return calls


# Roles of nodes that stand where a module call stood (they record its module).
_REPLACES_A_CALL = (Role.OPENED, Role.CALLED, Role.SPARSE, Role.LINEAR)


def _match(old: torch.fx.Graph, new: torch.fx.Graph, a: Any, b: Any, aliases: dict[str, set[str]]) -> dict[str, str]:
    """``before`` name -> ``after`` name, found in five passes, each over what is still unmatched."""
    match: dict[str, str] = {}
    taken: set[str] = set()

    def pair(old_name: str, new_name: str) -> None:
        match[old_name] = new_name
        taken.add(new_name)

    calls_of: dict[str, list[str]] = {}  # module -> its leaf calls in ``before``, in order
    for node in old.find_nodes(op="call_module"):
        calls_of.setdefault(str(node.target), []).append(node.name)
    # 1. provenance: an opened or swapped-parameter call replaces the module call it names
    unmatched_calls = {module: list(names) for module, names in calls_of.items()}
    for name, data in b.nodes(data=True):
        module = data["tag"].get("module")
        candidates = unmatched_calls.get(module) if data["role"] in _REPLACES_A_CALL else None
        if candidates:
            chosen = name if name in candidates else candidates[0]
            candidates.remove(chosen)  # usually the first: calls are opened in graph order
            pair(chosen, name)
    # 2. a leaf call that ``after`` traced into matches the node its traced call returns
    still_called = {str(node.target) for node in new.find_nodes(op="call_module")}
    traced_into = {
        module: waiting
        for module, names in calls_of.items()
        if module not in still_called and (waiting := [n for n in names if n not in match])
    }
    if traced_into:
        results = _call_results(new, set(traced_into), taken)
        for module, waiting in traced_into.items():
            for old_name, new_name in zip(waiting, results.get(module, []), strict=False):
                pair(old_name, new_name)
    # 3. same name, op and target; or a fetch of the same name the rewrite pointed at a tied
    # parameter's masked name; or a linear call freeze gave a sparse kernel (it keeps its name)
    for name, data in a.nodes(data=True):
        if name not in match and name in b and name not in taken:
            other = b.nodes[name]
            renamed_fetch = data["op"] == other["op"] == "get_attr" and other["role"] is Role.WEIGHT
            if _same_kind(data, other) or renamed_fetch or other["role"] is Role.SPARSE:
                pair(name, name)
    # 4. same op and target, in graph order
    waiting_by_kind: dict[tuple[str, str], list[str]] = {}
    for name, data in b.nodes(data=True):
        if name not in taken:
            waiting_by_kind.setdefault((data["op"], data["target"]), []).append(name)
    for name, data in a.nodes(data=True):
        queue = waiting_by_kind.get((data["op"], data["target"]))
        if name not in match and queue:
            pair(name, queue.pop(0))
    # 5. a fetch of a tied parameter matches a fetch of the same parameter under another of its
    # names: the rewrite reads a tied parameter once, under the name its mask is registered at
    fetches = new.find_nodes(op="get_attr")
    for node in old.find_nodes(op="get_attr"):
        if node.name not in match:
            same = [other for other in fetches if _same_parameter_fetch(node, other, aliases)]
            if same:
                pair(node.name, next((other for other in same if other.name not in taken), same[0]).name)
    return match


def _call_results(graph: torch.fx.Graph, modules: set[str], taken: set[str]) -> dict[str, list[str]]:
    """For each module of ``modules``, the node whose value each of its traced calls in ``graph`` returns."""
    calls: dict[str, dict[str, list[torch.fx.Node]]] = {}
    for node in graph.nodes:
        if node.name not in taken:
            for call, path in module_calls(node):
                if path in modules:
                    calls.setdefault(path, {}).setdefault(call, []).append(node)
    results: dict[str, list[str]] = {}
    for module, by_call in calls.items():
        for nodes in by_call.values():
            inside = set(nodes)
            leaving = [n for n in nodes if any(user not in inside for user in n.users)]
            results.setdefault(module, []).append((leaving or nodes)[-1].name)
    return results


def graph_of(value: Drawable, what: str) -> tuple[torch.fx.GraphModule | None, torch.fx.Graph]:
    """The module (if any) and graph of what :func:`draw` and :func:`~fxsparse.viz.diff` take.

    An exported program is unlifted first (``program.module()``, a new module: the
    program is not changed), so parameters are fetched by name as in fxsparse's graphs,
    and its ``mask * weight`` products are tagged as the rewrite tags them.
    """
    if isinstance(value, torch.export.ExportedProgram):
        value = value.module()  # tags that fxsparse.transform(emit="export") recorded carry over
        # A program loaded by torch.export.load kept its products' tags only: tag what they read.
        retag(value.graph, mask_registry(value.graph), value)
    if isinstance(value, torch.fx.GraphModule):
        return value, value.graph
    if isinstance(value, torch.fx.Graph):
        return None, value
    raise TypeError(
        f"{what} takes a torch.fx.GraphModule (fxsparse.transform's output, or torch.fx.symbolic_trace(model)), "
        f"a torch.fx.Graph or a torch.export.ExportedProgram; got {type(value).__name__}"
        + (": trace it first, or pass fxsparse.transform(model, masks)" if isinstance(value, torch.nn.Module) else "")
    )


def _aliases(*modules: torch.fx.GraphModule | None) -> dict[str, set[str]]:
    """Every name of a tied parameter -> all its names, in either module (nothing for an untied one)."""
    aliases: dict[str, set[str]] = {}
    for module in modules:
        if module is None:
            continue
        names: dict[int, set[str]] = {}
        for name, parameter in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(parameter), set()).add(name)
        for group in names.values():
            if len(group) > 1:
                for name in group:
                    aliases.setdefault(name, set()).update(group)
    return aliases


def _same_parameter_fetch(first: torch.fx.Node, second: torch.fx.Node, aliases: dict[str, set[str]]) -> bool:
    """Whether both nodes fetch one tied parameter, under two of its names."""
    return first.op == second.op == "get_attr" and str(second.target) in aliases.get(str(first.target), ())


def _target(node: torch.fx.Node) -> str:
    return node.target if isinstance(node.target, str) else qualified_name(node.target)


def _same_kind(first: dict[str, Any], second: dict[str, Any]) -> bool:
    return bool(first["op"] == second["op"] and first["target"] == second["target"])


class _Ref:
    """A node in an argument list, by its name in ``after`` (``None``: it has no match)."""

    def __init__(self, name: str | None) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"%{self.name}"


def _arguments(node: torch.fx.Node, match: dict[str, str] | None) -> str:
    """``node``'s arguments and keyword arguments, constants included, with nodes named as in ``after``."""

    def rename(argument: torch.fx.Node) -> Any:
        return _Ref(match.get(argument.name) if match is not None else argument.name)

    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), rename)
    return repr((args, sorted(kwargs.items())))
