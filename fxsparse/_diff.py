"""Graph diff: which nodes a rewrite added, removed, changed or kept, and which edges it rewired.

The two graphs are turned into ``networkx`` digraphs (node attributes: op, target,
fxsparse role) and matched: first by provenance (a node the rewrite opened or calls
with swapped parameters, ``node.meta["fxsparse"]``, matches the module call it
replaced), then by name with the same op and target, then by op and target in graph
order. The result is plain data; drawing and text read it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import torch.fx

from ._rewrite import META_KEY

__all__ = ["GraphDiff", "diff", "to_networkx"]


@dataclass(frozen=True)
class GraphDiff:
    """The difference between two graphs, nodes by name.

    ``changed`` and ``unchanged`` pair a node of ``before`` with its match in ``after``;
    ``changed`` ones differ in op, target, or the (matched) nodes they read. ``rewired``
    lists edges ``(source, user)`` of ``after`` between matched nodes that ``before`` did
    not have, ``dropped`` the edges of ``before`` (by ``before``'s names) that ``after`` lost.
    """

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[tuple[str, str], ...]
    unchanged: tuple[tuple[str, str], ...]
    rewired: tuple[tuple[str, str], ...]
    dropped: tuple[tuple[str, str], ...]
    roles: dict[str, str]  # fxsparse role of each tagged node of ``after``
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
        """A unified diff of the two graphs' generated code."""
        return "".join(
            difflib.unified_diff(
                self.before_code.splitlines(keepends=True),
                self.after_code.splitlines(keepends=True),
                "before",
                "after",
                n=context,
            )
        )

    def __str__(self) -> str:
        return f"{self.summary()}\n\n{self.unified()}"


def to_networkx(graph: torch.fx.Graph) -> Any:
    """A ``networkx.DiGraph`` of ``graph``: a node per FX node (op, target, role), an edge per use."""
    import networkx as nx

    digraph = nx.DiGraph()
    for node in graph.nodes:
        tag = node.meta.get(META_KEY, {})
        digraph.add_node(node.name, op=node.op, target=_target(node), role=tag.get("role"), tag=tag)
        for source in node.all_input_nodes:
            digraph.add_edge(source.name, node.name)
    return digraph


def diff(before: torch.fx.GraphModule | torch.fx.Graph, after: torch.fx.GraphModule | torch.fx.Graph) -> GraphDiff:
    """How ``after`` differs from ``before`` (typically a model traced, and fxsparse's output).

    Example:
        >>> import torch, fxsparse
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> d = fxsparse.viz.diff(torch.fx.symbolic_trace(model), fxsparse.transform(model, {"0": torch.eye(4)}))
        >>> d.changed, sorted(d.added)
        ((('_0', '_0'),), ['_0_bias', '_0_weight', '_0_weight_mask', '_0_weight_masked'])
    """
    old, new = _graph(before), _graph(after)
    a, b = to_networkx(old), to_networkx(new)
    match: dict[str, str] = {}
    taken: set[str] = set()

    def pair(old_name: str, new_name: str) -> None:
        match[old_name] = new_name
        taken.add(new_name)

    by_target: dict[tuple[str, str], list[str]] = {}
    for name, data in a.nodes(data=True):
        by_target.setdefault((data["op"], data["target"]), []).append(name)
    # 1. provenance: an opened or swapped-parameter call replaces the module call it names
    for name, data in b.nodes(data=True):
        module = data["tag"].get("module")
        if data["role"] in ("opened", "called") and module is not None:
            candidates = [n for n in by_target.get(("call_module", module), []) if n not in match]
            if candidates:
                pair(name if name in candidates else candidates[0], name)
    # 2. same name, op and target
    for name, data in a.nodes(data=True):
        if name not in match and name in b and name not in taken and _same_kind(data, b.nodes[name]):
            pair(name, name)
    # 3. same op and target, in graph order
    waiting: dict[tuple[str, str], list[str]] = {}
    for name, data in b.nodes(data=True):
        if name not in taken:
            waiting.setdefault((data["op"], data["target"]), []).append(name)
    for name, data in a.nodes(data=True):
        queue = waiting.get((data["op"], data["target"]))
        if name not in match and queue:
            pair(name, queue.pop(0))

    renamed_edges = {(match[u], match[v]) for u, v in a.edges if u in match and v in match}
    new_edges = {(u, v) for u, v in b.edges if u in taken and v in taken}
    rewired = new_edges - renamed_edges
    back = {v: k for k, v in match.items()}
    dropped = {(back[u], back[v]) for u, v in renamed_edges - new_edges}
    changed: list[tuple[str, str]] = []
    unchanged: list[tuple[str, str]] = []
    for old_name, new_name in match.items():
        same = _same_kind(a.nodes[old_name], b.nodes[new_name]) and _same_inputs(a, b, old_name, new_name, match)
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


def _graph(value: torch.fx.GraphModule | torch.fx.Graph) -> torch.fx.Graph:
    return value.graph if isinstance(value, torch.fx.GraphModule) else value


def _target(node: torch.fx.Node) -> str:
    return node.target if isinstance(node.target, str) else torch.fx.node._get_qualified_name(node.target)


def _same_kind(first: dict[str, Any], second: dict[str, Any]) -> bool:
    return bool(first["op"] == second["op"] and first["target"] == second["target"])


def _same_inputs(a: Any, b: Any, old_name: str, new_name: str, match: dict[str, str]) -> bool:
    return {match.get(u) for u in a.predecessors(old_name)} == set(b.predecessors(new_name))
