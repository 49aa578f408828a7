"""Plumbing: the nodes of a graph that move shapes and bookkeeping around rather than compute the model.

A captured transformer is a third plumbing: symbolic size queries and the arithmetic on
them, shape and metadata assertions, ``getitem`` nodes unpacking tuple outputs, and the
attention-mask and position arithmetic computed from the inputs alone. Drawings and the
viewer hide them by default, so what is left is the model as its author wrote it.

:func:`plumbing` classifies; it reads the graph and never changes it. A node fxsparse
tagged (a weight, a mask, a masked product, a replaced call) is never plumbing.
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.fx

from .._compat import OpOverload
from .._tags import Role, role_of, tag_of

__all__ = ["PlumbingKind", "plumbing"]

PlumbingKind = Literal["size", "assert", "getitem", "side"]
"""Why a node is plumbing:

- ``"size"``: a symbolic size query (``sym_size``, ``x.size()``, ``x.shape``) or arithmetic on sizes;
- ``"assert"``: a shape, metadata or input check (``_assert_tensor_metadata``, export's input guards);
- ``"getitem"``: one item of a node's tuple output (``split``, a module returning a tuple); a drawing
  reads through it, from the tuple's maker to the item's users;
- ``"side"``: arithmetic on inputs, buffers and constants alone (no weight in it) that only
  feeds nodes also reading a computed activation (attention masks, position ids, rotary
  tables), or that nothing reads. An input used only that way (a model's second input added
  to its output) is hidden with it: compact drawings show the model's main path.
"""

# Targets (by their last name) that ask a tensor for its size.
_SIZE_QUERIES = frozenset({"sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "size", "dim", "numel"})
_SIZE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device"})
# Plain scalar arithmetic: applied to sizes only, its result is a size.
_SCALAR_MODULES = frozenset({"_operator", operator.__name__, math.__name__, builtins.__name__})
# Ops whose output is a tuple, recognized by name where the capture recorded no output value (torch.fx).
_TUPLE_MAKERS = frozenset(
    {"split", "split_with_sizes", "tensor_split", "chunk", "unbind", "topk", "sort", "max", "min", "var_mean",
     "std_mean", "unique", "aminmax"}
)  # fmt: skip
# Ops that read only another tensor's shape, dtype and device, never its values.
_VALUE_FREE = frozenset(
    {"new_ones", "new_zeros", "new_empty", "new_full", "ones_like", "zeros_like", "empty_like", "full_like"}
)
_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


def plumbing(graph: torch.fx.Graph, module: torch.nn.Module | None = None) -> dict[torch.fx.Node, PlumbingKind]:
    """Each plumbing node of ``graph`` and why it is one (:data:`PlumbingKind`).

    ``module`` (the graph's owner) tells parameters from buffers: a ``get_attr`` of a
    parameter is a weight; without it every ``get_attr`` counts as one, which keeps
    arithmetic on buffers (a rotary table) visible.

    Example:
        >>> import torch
        >>> class Attention(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.q = torch.nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         causal = x.new_ones(x.size(1), x.size(1)).tril()
        ...         return self.q(x) * causal
        >>> traced = torch.fx.symbolic_trace(Attention())
        >>> sorted((node.name, kind) for node, kind in plumbing(traced.graph, traced).items())
        [('new_ones', 'side'), ('size', 'size'), ('size_1', 'size'), ('tril', 'side')]
    """
    nodes = list(graph.nodes)
    found: dict[torch.fx.Node, PlumbingKind] = {}
    for node in nodes:
        if tag_of(node) is not None and role_of(node) is not Role.GUARDS:
            continue
        kind = _own_kind(node, found)
        if kind is not None:
            found[node] = kind
    weighed = _touching_weights(nodes, module, found)
    side: dict[torch.fx.Node, bool] = {}
    for node in reversed(nodes):  # users before the nodes they read
        if node in found and found[node] != "getitem":
            continue
        if node.op not in ("call_function", "call_method") or node in weighed or tag_of(node) is not None:
            continue
        side[node] = all(_takes_as_side_input(user, node, weighed, side, found) for user in node.users)
        if side[node] and node not in found:
            found[node] = "side"
    return {node: found[node] for node in nodes if node in found}


def _own_kind(node: torch.fx.Node, found: Mapping[torch.fx.Node, PlumbingKind]) -> PlumbingKind | None:
    """The kind of plumbing a node is by what it calls (and what its inputs are), if any."""
    if role_of(node) is Role.GUARDS:
        return "assert"
    if node.op not in ("call_function", "call_method"):
        return None
    name = _name_of(node.target)
    if name.startswith(("_assert", "sym_constrain_range")) and not node.users:
        return "assert"
    if name in _SIZE_QUERIES:
        return "size"
    if name == "getattr" and len(node.args) > 1 and node.args[1] in _SIZE_ATTRIBUTES:
        return "size"
    value = node.meta.get("val")
    if isinstance(value, _SYMBOLIC):
        return "size"
    inputs = node.all_input_nodes
    if name == "getitem" and inputs:
        source = inputs[0]
        if found.get(source) == "size":
            return "size"  # an item of x.shape
        made = source.meta.get("val")
        if isinstance(made, (tuple, list)) or (made is None and _makes_a_tuple(source)):
            return "getitem"
        return None
    scalar = node.op == "call_function" and getattr(node.target, "__module__", None) in _SCALAR_MODULES
    if scalar and inputs and all(found.get(source) == "size" for source in inputs):
        return "size"
    return None


def _makes_a_tuple(node: torch.fx.Node) -> bool:
    """Whether a node recorded without an output value returns a tuple: a module call, or a known tuple maker."""
    if node.op == "call_module":
        return all(user.op == "call_function" and _name_of(user.target) == "getitem" for user in node.users)
    return node.op in ("call_function", "call_method") and _name_of(node.target) in _TUPLE_MAKERS


def _touching_weights(
    nodes: list[torch.fx.Node], module: torch.nn.Module | None, found: Mapping[torch.fx.Node, PlumbingKind]
) -> set[torch.fx.Node]:
    """The nodes whose values depend on a weight, directly or through what they read (weights
    themselves included). A size, or a new tensor shaped like another, depends on no values."""
    touching: set[torch.fx.Node] = set()
    for node in nodes:
        value_free = node.op in ("call_function", "call_method") and _name_of(node.target) in _VALUE_FREE
        if found.get(node) in ("size", "assert") or value_free:
            continue
        if _is_weight(node, module) or any(source in touching for source in node.all_input_nodes):
            touching.add(node)
    return touching


def _is_weight(node: torch.fx.Node, module: torch.nn.Module | None) -> bool:
    if role_of(node) in (Role.WEIGHT, Role.MASK, Role.MASKED, Role.FOLDED, Role.PARAM):
        return True
    if node.op == "get_attr":
        if module is None:
            return True
        try:
            module.get_parameter(str(node.target))
        except AttributeError:
            return False
        return True
    if node.op == "call_module" or tag_of(node) is not None:  # a module call or a call fxsparse opened
        if module is None:
            return True
        try:
            return any(True for _ in module.get_submodule(str(node.target)).parameters())
        except AttributeError:
            return True
    return False


def _takes_as_side_input(
    user: torch.fx.Node,
    source: torch.fx.Node,
    weighed: set[torch.fx.Node],
    side: Mapping[torch.fx.Node, bool],
    found: Mapping[torch.fx.Node, PlumbingKind],
) -> bool:
    """Whether ``user`` reads ``source`` beside the activation it computes on (or is plumbing itself)."""
    if found.get(user) in ("size", "assert") or side.get(user, False):
        return True
    if user not in weighed:
        return False
    return any(other is not source and other in weighed and _is_activation(other) for other in user.all_input_nodes)


def _is_activation(node: torch.fx.Node) -> bool:
    """Whether a node reading weights is a computed value, not a weight fetched (or masked)."""
    return node.op != "get_attr" and role_of(node) not in (Role.WEIGHT, Role.MASK, Role.MASKED, Role.FOLDED, Role.PARAM)


def _name_of(target: Any) -> str:
    """The last part of a call's name: ``"sym_size"`` for ``aten.sym_size.int``, ``"size"`` for a method."""
    if isinstance(target, str):
        return target
    name = str(getattr(target, "__name__", target))
    return name.split(".")[0] if isinstance(target, OpOverload) else name  # "sym_size.int": op and overload
