"""Dependency groups: which parameter slices must be removed together, found on the captured graph.

The model is captured with ``torch.export`` (fxsparse's own capture, on a copy), whose ATen
graph records every op with the shapes it saw. Every position of every dimension of every
tensor in that graph is an element; each op joins the elements its semantics ties together
(a linear layer joins its input's last dimension with its weight's columns, an add joins its
operands position by position, a reshape that splits a dimension into heads joins each head
with its block of positions, ...). A connected set of elements is one unit of removal: the
positions it holds in each parameter are what must go together. Units that touch the same
parameter dimensions make one :class:`Group`.

Nothing is guessed: a dimension an op handles in a way this module does not know (an
unknown op, a slice at fixed offsets, the positions inside a head, the model's own inputs and
outputs) is *fixed*, and a group holding a fixed element is blocked, with the reason.
Reductions across a dimension (LayerNorm/RMSNorm statistics, a softmax, a mean) mark it
*inexact*: a masked channel still counts there, a removed one does not.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from .. import _capture
from .._compat import ATEN_PRIVATE_OPS as _PRIVATE
from .._errors import TraceError

__all__ = ["Analysis", "Group", "Groups", "Member", "analyse", "groups"]


@dataclasses.dataclass(frozen=True)
class Member:
    """One dimension of one parameter (or buffer) in a group, and its indices unit by unit.

    ``indices[u]`` are the positions along ``dim`` that unit ``u`` of the group owns.
    ``role`` says how the graph uses the dimension: ``"rows"`` (a layer's outputs: weight
    rows, bias entries), ``"columns"`` (a layer's inputs), ``"embedding"`` (an embedding's
    vectors), ``"scale"`` (norm weights and biases, other element-wise parameters) or
    ``"buffer"`` (running statistics and other buffers: removed with the group, never masked).
    """

    tensor: str
    dim: int
    role: str
    indices: tuple[tuple[int, ...], ...]

    @property
    def is_parameter(self) -> bool:
        return self.role != "buffer"

    def __str__(self) -> str:
        return f"{self.tensor}[{self.dim}] ({self.role})"


@dataclasses.dataclass(frozen=True)
class Group:
    """Units (channels, heads, convolution groups) that are removed together across ``members``.

    ``blocked`` is the reason the group cannot be pruned (None: it can). ``inexact`` is the
    reason removing a unit differs from masking it (None: removing equals masking), as for
    a hidden size under LayerNorm/RMSNorm, whose statistics count masked channels.
    """

    members: tuple[Member, ...]
    units: int
    blocked: str | None = None
    inexact: str | None = None

    @property
    def prunable(self) -> bool:
        return self.blocked is None

    @property
    def exact(self) -> bool:
        return self.inexact is None

    @property
    def unit_width(self) -> int:
        """The most positions one unit holds in any member (1: channels; more: heads or blocks)."""
        return max((len(unit) for member in self.members for unit in member.indices), default=0)

    @property
    def name(self) -> str:
        """The group's name: its first member that is a layer's outputs (or its first member)."""
        first = next((m for m in self.members if m.role == "rows"), self.members[0])
        return f"{first.tensor}[{first.dim}]"

    def __str__(self) -> str:
        unit = "channel" if self.unit_width == 1 else f"block of {self.unit_width}"
        state = "prunable" if self.blocked is None else f"blocked: {self.blocked}"
        if self.blocked is None and self.inexact is not None:
            state += f"; inexact: {self.inexact}"
        members = ", ".join(str(member) for member in self.members)
        return f"{self.name}: {self.units} units ({unit}), {state}\n    {members}"


@dataclasses.dataclass(frozen=True)
class Groups:
    """Every group of a model (prunable or not), in the order the graph reaches them."""

    groups: tuple[Group, ...]

    def __iter__(self) -> Iterator[Group]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> Group:
        return self.groups[index]

    @property
    def prunable(self) -> tuple[Group, ...]:
        return tuple(group for group in self.groups if group.prunable)

    def __str__(self) -> str:
        blocked = len(self.groups) - len(self.prunable)
        lines = [f"{len(self.groups)} groups, {len(self.prunable)} prunable, {blocked} blocked"]
        lines += [str(group) for group in self.groups]
        return "\n".join(lines)


def groups(
    model: nn.Module,
    *,
    example_inputs: tuple[Any, ...] | None = None,
    example_kwargs: dict[str, Any] | None = None,
) -> Groups:
    """The dependency groups of ``model``: what must be removed together so that it stays valid.

    The model is captured with ``torch.export`` on a copy (it is not changed), run on
    ``example_inputs``/``example_kwargs`` (only their shapes and dtypes matter). Every
    group lists the parameter dimensions it couples, each unit's indices in them, whether it
    can be pruned (or why not) and whether removing a unit equals masking it.

    Raises:
        TraceError: no example inputs were given, or the model cannot be exported.

    Example:
        >>> import torch, fxsparse
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> found = fxsparse.groups(model, example_inputs=(torch.randn(1, 4),))
        >>> print(found[0])
        0.weight[0]: 8 units (channel), prunable
            0.weight[0] (rows), 0.bias[0] (rows), 2.weight[1] (columns)
        >>> found[1].blocked
        'a model input'
    """
    return analyse(model, example_inputs, example_kwargs).groups


@dataclasses.dataclass(frozen=True)
class Analysis:
    """The groups, and the inputs they were found with."""

    groups: Groups
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def analyse(model: nn.Module, args: tuple[Any, ...] | None, kwargs: dict[str, Any] | None) -> Analysis:
    if args is None and not kwargs:
        raise TraceError(
            "structured pruning finds its groups on the graph torch.export captures, which runs the model: pass "
            "example_inputs (a tuple of positional inputs) and/or example_kwargs; only their shapes and dtypes matter"
        )
    if args is not None and not isinstance(args, tuple):
        raise TraceError(f"example_inputs must be a tuple of positional inputs, got {type(args).__name__}")
    args, kwargs = args or (), dict(kwargs or {})
    root = _capture.copy_model(model)
    _capture.lower_fake_sparsity(root)
    # The graph's other attributes (constants export lifted, control-flow subgraphs) are not
    # installed: the finder reads only parameters and buffers, and fixes whatever else it meets.
    found = _Finder(root, _capture.export(root, args, kwargs).graph).run()
    return Analysis(found, args, kwargs)


# ---------------------------------------------------------------------------------------------
# The element graph


_Dim = tuple[int, int]  # (first element, size)
_Space = tuple[_Dim, ...]  # one per dimension of a tensor
_aten = torch.ops.aten


class _Finder:
    def __init__(self, root: nn.Module, graph: torch.fx.Graph) -> None:
        self.root = root
        self.graph = graph
        self.count = 0
        self.edges_a: list[np.ndarray] = []
        self.edges_b: list[np.ndarray] = []
        self.fixed: list[tuple[int, int, str]] = []  # (start, size, reason)
        self.inexact: list[tuple[int, int, str]] = []
        self.values: dict[torch.fx.Node, Any] = {}
        self.tensors: dict[tuple[str, int], tuple[_Dim, str]] = {}  # (name, dim) -> (dim, role)
        self.roles: dict[tuple[str, int], str] = {}
        # Nodes computed from parameters alone by ops that keep a masked zero zero (views, products):
        # a layer whose weight is one of them multiplies a masked input by a masked zero. Any other
        # weight (a buffer, exp(parameter)) still reads a masked input, which is not zero after a
        # sigmoid, so removing that input differs from masking it.
        self.zero_where_masked: set[torch.fx.Node] = set()
        self.view_of: dict[torch.fx.Node, tuple[torch.fx.Node, list[int | None]]] = {}  # transposed weights
        names: dict[int, str] = {}
        for name, parameter in root.named_parameters():
            names.setdefault(id(parameter), name)
        self.parameters = set(names.values())
        for name, buffer in root.named_buffers():
            names.setdefault(id(buffer), name)
        self.names = names

    # -- elements ------------------------------------------------------------------------

    def new(self, shape: Sequence[int]) -> _Space:
        dims = []
        for size in shape:
            dims.append((self.count, int(size)))
            self.count += int(size)
        return tuple(dims)

    def join(self, a: _Dim, b: _Dim) -> None:
        if a[1] != b[1]:  # an op used in a way its handler did not foresee: keep both as they are
            self.fix(a, f"dimensions of sizes {a[1]} and {b[1]} an op relates in a way fxsparse does not know")
            self.fix(b, f"dimensions of sizes {a[1]} and {b[1]} an op relates in a way fxsparse does not know")
            return
        if a[0] != b[0]:
            self.edges_a.append(np.arange(a[0], a[0] + a[1]))
            self.edges_b.append(np.arange(b[0], b[0] + b[1]))

    def join_blocks(self, outer: _Dim, whole: _Dim) -> None:
        """Position j of ``outer`` with block j of ``whole`` (a dimension split into ``outer`` × inner)."""
        inner = whole[1] // outer[1]
        self.edges_a.append(np.repeat(np.arange(outer[0], outer[0] + outer[1]), inner))
        self.edges_b.append(np.arange(whole[0], whole[0] + whole[1]))

    def fix(self, dim: _Dim, reason: str) -> None:
        if dim[1]:
            self.fixed.append((dim[0], dim[1], reason))

    def fix_all(self, value: Any, reason: str) -> None:
        for space in _spaces(value):
            for dim in space:
                self.fix(dim, reason)

    def mark_inexact(self, dim: _Dim, reason: str) -> None:
        if dim[1] > 1:
            self.inexact.append((dim[0], dim[1], reason))

    # -- the walk ------------------------------------------------------------------------

    def run(self) -> Groups:
        for node in self.graph.nodes:
            self.values[node] = self.visit(node)
        return self.collect()

    def visit(self, node: torch.fx.Node) -> Any:
        if node.op == "placeholder":
            value = self.fresh(node)
            self.fix_all(value, "a model input")
            return value
        if node.op == "get_attr":
            return self.attribute(node)
        if node.op == "output":
            for item in _flat(node.args):
                if isinstance(item, torch.fx.Node):
                    self.fix_all(self.values.get(item), "a model output")
            return None
        if node.op == "call_function" and node.target is operator.getitem:
            container, index = node.args
            value = self.values.get(container) if isinstance(container, torch.fx.Node) else None
            if isinstance(value, list) and isinstance(index, int):
                return value[index]
            return self.unknown(node, "indexes something that is not a list of tensors")
        if node.op != "call_function":
            return self.unknown(node, f"a {node.op} node")
        packet = getattr(node.target, "overloadpacket", None)
        handler = _HANDLERS.get(packet) if packet is not None else None
        if handler is None:
            if not _has_tensor(node.meta.get("val")):
                return None  # asserts, symbolic sizes: no tensor comes out
            return self.unknown(node, f"fxsparse does not know how {_op_name(node)} treats channels")
        try:
            value = handler(self, node)
        except (TypeError, ValueError, IndexError, KeyError) as exc:  # arguments of a form the handler did not foresee
            return self.unknown(node, f"{_op_name(node)} with arguments fxsparse does not read ({type(exc).__name__})")
        inputs = node.all_input_nodes
        if inputs and packet in _KEEP_ZERO and all(self.is_zero_where_masked(arg) for arg in inputs):
            self.zero_where_masked.add(node)
        return value

    def is_zero_where_masked(self, node: Any) -> bool:
        return node in self.zero_where_masked

    def fresh(self, node: torch.fx.Node) -> Any:
        return _allocate(self, node.meta.get("val"))

    def unknown(self, node: torch.fx.Node, why: str) -> Any:
        reason = f"{node.name}: {why}"
        for arg in node.all_input_nodes:
            self.fix_all(self.values.get(arg), reason)
        value = self.fresh(node)
        self.fix_all(value, reason)
        return value

    def attribute(self, node: torch.fx.Node) -> Any:
        tensor = _capture.lookup(self.root, str(node.target))
        name = self.names.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        if name is None:
            value = self.fresh(node)
            self.fix_all(value, f"{node.target}: a constant of the graph")
            return value
        if name in self.parameters:
            self.zero_where_masked.add(node)
        space = []
        for dim, size in enumerate(tensor.shape):
            key = (name, dim)
            if key not in self.tensors:
                start = self.count
                self.count += int(size)
                self.tensors[key] = ((start, int(size)), "buffer" if name not in self.parameters else "scale")
            space.append(self.tensors[key][0])
        return tuple(space)

    def role(self, node: Any, dim: int, role: str) -> None:
        """Record how a parameter's dimension is used (``node`` is a get_attr, or a view of one)."""
        view = self.view_of.get(node) if isinstance(node, torch.fx.Node) else None
        if view is not None:  # a transposed weight: the dimension of the weight itself
            node, order = view
            source_dim = order[dim % len(order)]
            if source_dim is None:
                return
            dim = source_dim
        if isinstance(node, torch.fx.Node) and node.op == "get_attr":
            tensor = _capture.lookup(self.root, str(node.target))
            name = self.names.get(id(tensor))
            if name in self.parameters:
                dim = dim % tensor.dim()
                self.roles.setdefault((name, dim), role)

    def space(self, arg: Any) -> _Space | None:
        if isinstance(arg, torch.fx.Node):
            value = self.values.get(arg)
            if isinstance(value, tuple):
                return value
        return None

    # -- groups --------------------------------------------------------------------------

    def collect(self) -> Groups:
        labels = _components(self.count, self.edges_a, self.edges_b)
        fixed_reason = _reasons(labels, self.fixed)
        inexact_reason = _reasons(labels, self.inexact)
        # Every element of a parameter dimension: (component, member key, index).
        by_component: dict[int, dict[tuple[str, int], list[int]]] = {}
        for key, ((start, size), _) in self.tensors.items():
            for index, label in enumerate(labels[start : start + size].tolist()):
                by_component.setdefault(label, {}).setdefault(key, []).append(index)
        grouped: dict[tuple[tuple[str, int], ...], list[int]] = {}
        for label, members in by_component.items():
            keys = tuple(sorted(members, key=lambda k: (self.tensors[k][0][0], k)))
            if any(k[0] in self.parameters for k in keys):
                grouped.setdefault(keys, []).append(label)
        found = []
        for keys, labels_of_group in grouped.items():
            labels_of_group.sort(key=lambda label: min(by_component[label][keys[0]]))
            group_members = tuple(
                Member(
                    tensor=name,
                    dim=dim,
                    role=self.roles.get((name, dim), "scale") if name in self.parameters else "buffer",
                    indices=tuple(tuple(by_component[label][(name, dim)]) for label in labels_of_group),
                )
                for name, dim in keys
            )
            blocked = next((fixed_reason[label] for label in labels_of_group if label in fixed_reason), None)
            inexact = next((inexact_reason[label] for label in labels_of_group if label in inexact_reason), None)
            found.append(
                (
                    min(self.tensors[keys[0]][0][0], *labels_of_group),
                    Group(group_members, len(labels_of_group), blocked, inexact),
                )
            )
        found.sort(key=lambda item: item[0])
        return Groups(tuple(group for _, group in found))


def _components(count: int, edges_a: list[np.ndarray], edges_b: list[np.ndarray]) -> np.ndarray:
    """The smallest element of each element's connected component (vectorised union-find)."""
    parent = np.arange(count, dtype=np.int64)
    if not edges_a:
        return parent
    a, b = np.concatenate(edges_a), np.concatenate(edges_b)
    while True:
        root_a, root_b = parent[a], parent[b]
        low, high = np.minimum(root_a, root_b), np.maximum(root_a, root_b)
        apart = low != high
        if not apart.any():
            return parent
        np.minimum.at(parent, high[apart], low[apart])
        while True:  # point every element at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def _reasons(labels: np.ndarray, marks: list[tuple[int, int, str]]) -> dict[int, str]:
    found: dict[int, str] = {}
    for start, size, reason in marks:
        for label in np.unique(labels[start : start + size]).tolist():
            found.setdefault(label, reason)
    return found


def _flat(value: Any) -> Iterator[Any]:
    if isinstance(value, list | tuple):
        for item in value:
            yield from _flat(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _flat(item)
    else:
        yield value


def _spaces(value: Any) -> Iterator[_Space]:
    if isinstance(value, tuple):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _spaces(item)


def _has_tensor(value: Any) -> bool:
    return any(isinstance(item, torch.Tensor) for item in _flat(value))


def _allocate(finder: _Finder, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return finder.new(value.shape)
    if isinstance(value, list | tuple):
        return [_allocate(finder, item) for item in value]
    return None


def _op_name(node: torch.fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target))


def _int(value: Any) -> int:
    """A graph argument that is a whole number (a dimension, a group count)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected a whole number, got {value!r}")
    return value


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _shape(node: Any) -> tuple[int, ...] | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(int(s) for s in value.shape) if isinstance(value, torch.Tensor) else None


# ---------------------------------------------------------------------------------------------
# Op semantics: each handler returns the node's value (a space, or a list of spaces), and joins
# or fixes every dimension of its inputs and output.

_Handler = Callable[[_Finder, torch.fx.Node], Any]
_HANDLERS: dict[Any, _Handler] = {}


def _handles(*packets: Any) -> Callable[[_Handler], _Handler]:
    def register(handler: _Handler) -> _Handler:
        for packet in packets:
            _HANDLERS[packet] = handler
        return handler

    return register


def _tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [
        arg for arg in _flat((node.args, node.kwargs)) if isinstance(arg, torch.fx.Node) and _shape(arg) is not None
    ]


def _broadcast(finder: _Finder, out: _Space, inputs: Sequence[torch.fx.Node], why: str) -> set[int]:
    """Join each input's dimensions with the output's, aligned from the right; broadcast ones stay apart.

    Returns the offsets from the right of the output dimensions some input was joined with.
    """
    joined = set()
    for arg in inputs:
        space = finder.space(arg)
        if space is None:
            continue
        for offset in range(1, len(space) + 1):
            dim = space[-offset]
            if offset <= len(out) and dim[1] == out[-offset][1]:
                finder.join(dim, out[-offset])
                joined.add(offset)
            else:
                finder.fix(dim, why)  # broadcast (size 1) or more dimensions than the output
    return joined


# Ops whose output is zero wherever their inputs are (views, copies, products): a weight made
# from masked parameters by these is zero where they are masked.
_KEEP_ZERO = {
    _aten.view, _aten.reshape, _PRIVATE["_unsafe_view"], _aten.t, _aten.transpose, _aten.permute, _aten.squeeze,
    _aten.unsqueeze, _aten.flatten, _aten.unflatten, _aten.expand, _aten.slice, _aten.select, _aten.mul, _aten.neg,
    _aten.to, _PRIVATE["_to_copy"], _aten.clone, _aten.contiguous, _aten.alias, _aten.detach, _aten.type_as,
}  # fmt: skip

# Ops for which zero is not "off": a masked (zeroed) channel in these operands becomes inf or
# NaN, and a consumer's masked column times inf is NaN, not the 0 removing it would give.
_SINGULAR_OPERAND: dict[Any, int] = {
    _aten.div: 1, _aten.floor_divide: 1, _aten.remainder: 1, _aten.reciprocal: 0, _aten.rsqrt: 0, _aten.log: 0,
}  # fmt: skip


@_handles(
    _aten.add, _aten.sub, _aten.mul, _aten.div, _aten.neg, _aten.relu, _aten.gelu, _aten.silu, _aten.sigmoid,
    _aten.tanh, _aten.exp, _aten.log, _aten.rsqrt, _aten.sqrt, _aten.pow, _aten.abs, _aten.erf, _aten.sin,
    _aten.cos, _aten.clamp, _aten.clamp_min, _aten.clamp_max, _aten.where, _aten.maximum, _aten.minimum,
    _aten.dropout, _aten.to, _PRIVATE["_to_copy"], _aten.clone, _aten.contiguous, _aten.alias, _aten.detach,
    _aten.type_as, _aten.hardtanh, _aten.leaky_relu, _aten.elu, _aten.softplus, _aten.masked_fill, _aten.rsub,
    _aten.reciprocal, _aten.square, _aten.eq, _aten.ne, _aten.gt, _aten.lt, _aten.ge, _aten.le,
    _aten.logical_not, _aten.logical_and, _aten.logical_or, _aten.bitwise_not, _aten.hardswish,
    _aten.hardsigmoid, _aten.mish, _aten.relu6, _aten.lift_fresh_copy, _aten.zeros_like, _aten.ones_like,
    _aten.full_like, _aten.gelu_, _aten.relu_, _aten.silu_, _aten.add_, _aten.mul_, _aten.tanh_, _aten.sigmoid_,
    _aten.expand_as, _aten.floor_divide, _aten.remainder, _aten.log1p, _aten.expm1, _aten.addcmul,
)  # fmt: skip
def _elementwise(finder: _Finder, node: torch.fx.Node) -> Any:
    out = finder.fresh(node)
    if not isinstance(out, tuple):
        return finder.unknown(node, f"{_op_name(node)} returns more than one tensor")
    joined = _broadcast(finder, out, _tensor_args(node), f"{node.name}: broadcast by {_op_name(node)}")
    for offset in range(1, len(out) + 1):
        if offset not in joined:  # copies of one value (expand): no layer produces them, none can be removed
            finder.fix(out[-offset], f"{node.name}: a dimension {_op_name(node)} broadcasts to")
    singular = _singular_operand(node)
    if singular is not None:
        finder.fix_all(
            finder.values.get(singular), f"{node.name}: a masked channel would be a zero operand of {_op_name(node)}"
        )
    return out


def _singular_operand(node: torch.fx.Node) -> torch.fx.Node | None:
    """The operand of ``node`` where a zero gives inf or NaN (a divisor, a logarithm's argument), if any."""
    packet = getattr(node.target, "overloadpacket", None)
    if packet is _aten.pow:  # 0 ** a negative exponent; a tensor exponent's sign is not known
        base, exponent = node.args[0], node.args[1]
        unsafe = not isinstance(exponent, int | float) or exponent < 0
        return base if unsafe and isinstance(base, torch.fx.Node) else None
    index = _SINGULAR_OPERAND.get(packet)
    arg = node.args[index] if index is not None and len(node.args) > index else None
    return arg if isinstance(arg, torch.fx.Node) else None


@_handles(_aten.expand)
def _expand(finder: _Finder, node: torch.fx.Node) -> Any:
    return _elementwise(finder, node)


@_handles(_aten.linear)
def _linear(finder: _Finder, node: torch.fx.Node) -> Any:
    x, weight = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    out, xs, ws = finder.fresh(node), finder.space(x), finder.space(weight)
    if xs is None or ws is None or len(ws) != 2:
        return finder.unknown(node, "a linear layer without a 2-D weight")
    for a, b in zip(xs[:-1], out[:-1], strict=True):
        finder.join(a, b)
    finder.join(xs[-1], ws[1])
    finder.join(out[-1], ws[0])
    finder.role(weight, 0, "rows")
    finder.role(weight, 1, "columns")
    bs = finder.space(bias)
    if bs is not None:
        finder.join(bs[0], ws[0])
        finder.role(bias, 0, "rows")
    if not finder.is_zero_where_masked(weight):
        finder.mark_inexact(
            xs[-1], f"{node.name}: a linear layer whose weight is not a masked parameter (an activation, a buffer)"
        )
    return out


def _matmul_like(finder: _Finder, node: torch.fx.Node, a: Any, b: Any, out: _Space) -> None:
    sa, sb = finder.space(a), finder.space(b)
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        finder.unknown(node, "a matrix product of vectors")
        return
    finder.join(sa[-1], sb[-2])
    finder.join(out[-2], sa[-2])
    finder.join(out[-1], sb[-1])
    for space in (sa, sb):
        batch = space[:-2]
        for offset in range(1, len(batch) + 1):
            if batch[-offset][1] == out[-2 - offset][1]:
                finder.join(batch[-offset], out[-2 - offset])
            else:
                finder.fix(batch[-offset], f"{node.name}: broadcast by {_op_name(node)}")
    if finder.is_zero_where_masked(b):
        finder.role(b, -2, "columns")
        finder.role(b, -1, "rows")
    elif not finder.is_zero_where_masked(a):
        # Neither factor is zero where masked (activations, buffers): a masked channel adds their product.
        finder.mark_inexact(
            sa[-1], f"{node.name}: a product over this dimension of factors that are not masked parameters"
        )


@_handles(_aten.mm, _aten.bmm, _aten.matmul)
def _matmul(finder: _Finder, node: torch.fx.Node) -> Any:
    out = finder.fresh(node)
    _matmul_like(finder, node, node.args[0], node.args[1], out)
    return out


@_handles(_aten.addmm)
def _addmm(finder: _Finder, node: torch.fx.Node) -> Any:
    bias, a, b = node.args[0], node.args[1], node.args[2]
    out = finder.fresh(node)
    _matmul_like(finder, node, a, b, out)
    _broadcast(finder, out, [bias] if isinstance(bias, torch.fx.Node) else [], f"{node.name}: broadcast by addmm")
    if finder.is_zero_where_masked(b):
        finder.role(bias, -1, "rows")
    return out


@_handles(_aten.embedding)
def _embedding(finder: _Finder, node: torch.fx.Node) -> Any:
    weight, indices = node.args[0], node.args[1]
    out, ws, xs = finder.fresh(node), finder.space(weight), finder.space(indices)
    if ws is None or xs is None or len(ws) != 2:
        return finder.unknown(node, "an embedding without a 2-D weight")
    for a, b in zip(xs, out[:-1], strict=True):
        finder.join(a, b)
    finder.join(ws[1], out[-1])
    finder.fix(ws[0], f"{node.name}: embedding rows, chosen by input values")
    finder.role(weight, 1, "embedding")
    return out


def _normalized(finder: _Finder, node: torch.fx.Node, x: Any, count: int, params: Sequence[Any], what: str) -> Any:
    value = finder.fresh(node)
    out = value[0] if isinstance(value, list) else value
    xs = finder.space(x)
    if xs is None:
        return finder.unknown(node, f"{what} of something that is not a tensor")
    for a, b in zip(xs, out, strict=True):
        finder.join(a, b)
    for param in params:
        ps = finder.space(param)
        if ps is not None:
            for offset in range(1, len(ps) + 1):
                finder.join(ps[-offset], xs[-offset])
                finder.role(param, -offset, "scale")
    for dim in xs[len(xs) - count :]:
        finder.mark_inexact(dim, f"{node.name}: {what} statistics over this dimension count masked channels")
    if isinstance(value, list):
        for extra in value[1:]:
            finder.fix_all(extra, f"{node.name}: {what} statistics")
    return value


@_handles(_aten.layer_norm, _aten.native_layer_norm)
def _layer_norm(finder: _Finder, node: torch.fx.Node) -> Any:
    shape = node.args[1]
    count = len(shape) if isinstance(shape, list | tuple) else 1
    return _normalized(finder, node, node.args[0], count, node.args[2:4], "layer_norm")


@_handles(_aten.rms_norm)
def _rms_norm(finder: _Finder, node: torch.fx.Node) -> Any:
    shape = node.args[1]
    count = len(shape) if isinstance(shape, list | tuple) else 1
    return _normalized(finder, node, node.args[0], count, node.args[2:3], "rms_norm")


@_handles(
    _aten.batch_norm, _PRIVATE["_native_batch_norm_legit_no_training"], _PRIVATE["_native_batch_norm_legit_functional"],
    _aten.native_batch_norm, _PRIVATE["_native_batch_norm_legit"],
)  # fmt: skip
def _batch_norm(finder: _Finder, node: torch.fx.Node) -> Any:
    value = finder.fresh(node)
    out = value[0] if isinstance(value, list) else value
    xs = finder.space(node.args[0])
    if xs is None or len(xs) < 2:
        return finder.unknown(node, "batch_norm of something without a channel dimension")
    for a, b in zip(xs, out, strict=True):
        finder.join(a, b)
    channel = xs[1]
    for index, arg in enumerate(node.args[1:5]):
        ps = finder.space(arg)
        if ps is not None and len(ps) == 1:
            finder.join(ps[0], channel)
            finder.role(arg, 0, "scale" if index < 2 else "buffer")
    for extra in value[1:] if isinstance(value, list) else []:
        for space in _spaces(extra):
            for dim in space:
                if dim[1] == channel[1] and len(space) == 1:
                    finder.join(dim, channel)  # saved or updated per-channel statistics
                else:
                    finder.fix(dim, f"{node.name}: batch_norm statistics")
    for dim in (xs[0], *xs[2:]):
        finder.mark_inexact(dim, f"{node.name}: batch statistics over this dimension")
    return value


@_handles(_aten.conv1d, _aten.conv2d, _aten.conv3d, _aten.convolution, _PRIVATE["_convolution"])
def _convolution(finder: _Finder, node: torch.fx.Node) -> Any:
    x, weight = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if node.target in (_aten.convolution.default, _PRIVATE["_convolution"].default):
        transposed, groups = bool(node.args[6]), _int(node.args[8])
    else:
        transposed, groups = False, _int(node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1))
    out, xs, ws = finder.fresh(node), finder.space(x), finder.space(weight)
    if transposed or xs is None or ws is None or len(xs) != len(ws) or len(out) != len(xs):
        return finder.unknown(node, "a transposed or unbatched convolution")
    finder.join(xs[0], out[0])
    why = f"{node.name}: a spatial dimension of a convolution"
    for dim in (*xs[2:], *out[2:], *ws[2:]):
        finder.fix(dim, why)
    bs = finder.space(bias)
    if groups == 1:
        finder.join(xs[1], ws[1])
        if not finder.is_zero_where_masked(weight):
            finder.mark_inexact(xs[1], f"{node.name}: a convolution whose filters are not masked parameters")
    else:
        # A unit is one whole convolution group: its input channels, output channels and filters.
        whole_groups = finder.new((groups,))[0]
        finder.join_blocks(whole_groups, xs[1])
        finder.join_blocks(whole_groups, ws[0])
        finder.fix(ws[1], f"{node.name}: input channels inside a convolution group of {groups}")
    finder.join(out[1], ws[0])
    if bs is not None:
        finder.join(bs[0], ws[0])
        finder.role(bias, 0, "rows")
    finder.role(weight, 0, "rows")
    finder.role(weight, 1, "columns")
    return out


def _positions(finder: _Finder, node: torch.fx.Node, mapping: Sequence[int | None]) -> Any:
    """Output dimension ``i`` is input dimension ``mapping[i]`` (None: a new one, fixed); the unmapped are fixed."""
    out, xs = finder.fresh(node), finder.space(node.args[0])
    if xs is None or not isinstance(out, tuple):
        return finder.unknown(node, "a view of something that is not a tensor")
    used = set()
    for index, source in enumerate(mapping):
        if source is None:
            finder.fix(out[index], f"{node.name}: a dimension {_op_name(node)} creates")
        else:
            finder.join(out[index], xs[source])
            used.add(source)
    for index, dim in enumerate(xs):
        if index not in used:
            finder.fix(dim, f"{node.name}: a dimension {_op_name(node)} removes")
    return out


@_handles(_aten.permute)
def _permute(finder: _Finder, node: torch.fx.Node) -> Any:
    rank = len(_shape(node.args[0]) or ())
    order = [_int(d) % rank for d in _list(node.args[1])]
    return _positions(finder, node, order)


@_handles(_aten.transpose, _aten.t)
def _transpose(finder: _Finder, node: torch.fx.Node) -> Any:
    rank = len(_shape(node.args[0]) or ())
    order = list(range(rank))
    if rank >= 2:
        a, b = (_int(node.args[1]) % rank, _int(node.args[2]) % rank) if len(node.args) > 2 else (0, 1)
        order[a], order[b] = order[b], order[a]
    out = _positions(finder, node, order)
    _follow_roles(finder, node, order)
    return out


def _follow_roles(finder: _Finder, node: torch.fx.Node, order: Sequence[int | None]) -> None:
    """A transposed weight (``x @ w.t()``): its users record roles on the weight itself."""
    source = node.args[0]
    if isinstance(source, torch.fx.Node) and source.op == "get_attr":
        finder.view_of[node] = (source, list(order))


@_handles(
    _aten.view, _aten.reshape, _PRIVATE["_unsafe_view"], _aten.squeeze, _aten.unsqueeze, _aten.flatten, _aten.unflatten
)
def _reshape(finder: _Finder, node: torch.fx.Node) -> Any:
    out, xs = finder.fresh(node), finder.space(node.args[0])
    if xs is None or not isinstance(out, tuple):
        return finder.unknown(node, "a reshape of something that is not a tensor")
    why = f"{node.name}: {_op_name(node)}"
    ins = [d for d in xs if d[1] != 1]
    outs = [d for d in out if d[1] != 1]
    for dim in (*xs, *out):
        if dim[1] == 1:
            finder.fix(dim, why)
    i = j = 0
    while i < len(ins) or j < len(outs):
        if i >= len(ins) or j >= len(outs):
            for dim in (*ins[i:], *outs[j:]):
                finder.fix(dim, f"{why} with sizes fxsparse cannot match")
            break
        block_in, block_out = [ins[i]], [outs[j]]
        i, j = i + 1, j + 1
        while math.prod(d[1] for d in block_in) != math.prod(d[1] for d in block_out):
            if math.prod(d[1] for d in block_in) < math.prod(d[1] for d in block_out) and i < len(ins):
                block_in.append(ins[i])
                i += 1
            elif j < len(outs):
                block_out.append(outs[j])
                j += 1
            else:
                block_in.extend(ins[i:])
                i = len(ins)
                break
        if len(block_in) == 1 and len(block_out) == 1:
            finder.join(block_in[0], block_out[0])
        elif len(block_in) == 1:  # a split: the outer part (heads) takes whole blocks
            finder.join_blocks(block_out[0], block_in[0])
            for dim in block_out[1:]:
                finder.fix(dim, f"{why}: positions inside the blocks (heads) a dimension is split into")
        elif len(block_out) == 1:  # a merge: each block is one position of the outer part
            finder.join_blocks(block_in[0], block_out[0])
            for dim in block_in[1:]:
                finder.fix(dim, f"{why}: positions inside the blocks (heads) merged into one dimension")
        else:
            for dim in (*block_in, *block_out):
                finder.fix(dim, f"{why} regroups dimensions")
    return out


@_handles(_aten.slice)
def _slice(finder: _Finder, node: torch.fx.Node) -> Any:
    shape = _shape(node.args[0]) or ()
    rank = len(shape)
    dim = _int(node.args[1]) % rank if len(node.args) > 1 else 0
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    whole = start in (0, None) and (end is None or _int(end) >= shape[dim]) and step == 1
    if whole:
        return _positions(finder, node, list(range(rank)))
    mapping: list[int | None] = [d if d != dim else None for d in range(rank)]
    return _positions(finder, node, mapping)  # the sliced dimension: fixed on both sides


@_handles(_aten.select)
def _select(finder: _Finder, node: torch.fx.Node) -> Any:
    rank = len(_shape(node.args[0]) or ())
    dim = _int(node.args[1]) % rank
    return _positions(finder, node, [d for d in range(rank) if d != dim])


@_handles(_aten.split, _aten.split_with_sizes, _aten.chunk, _aten.tensor_split, _aten.unsafe_split)
def _split(finder: _Finder, node: torch.fx.Node) -> Any:
    value, xs = finder.fresh(node), finder.space(node.args[0])
    if not isinstance(value, list) or xs is None:
        return finder.unknown(node, "a split of something that is not a tensor")
    rank = len(xs)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = _int(dim) % rank
    offset = 0
    for piece in value:
        for index, (a, b) in enumerate(zip(piece, xs, strict=True)):
            if index == dim:
                finder.join(a, (b[0] + offset, a[1]))
            else:
                finder.join(a, b)
        offset += piece[dim][1]
    return value


@_handles(_aten.cat, _aten.concat)
def _cat(finder: _Finder, node: torch.fx.Node) -> Any:
    out = finder.fresh(node)
    pieces = [arg for arg in _list(node.args[0]) if isinstance(arg, torch.fx.Node)]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    dim = _int(dim) % len(out)
    offset = 0
    for piece in pieces:
        ps = finder.space(piece)
        if ps is None or len(ps) != len(out):
            return finder.unknown(node, "a cat of tensors of different ranks")
        for index, (a, b) in enumerate(zip(ps, out, strict=True)):
            finder.join(a, (b[0] + offset, a[1]) if index == dim else b)
        offset += ps[dim][1]
    return out


def _reduce(finder: _Finder, node: torch.fx.Node, dims: Sequence[int], keepdim: bool, what: str) -> Any:
    xs = finder.space(node.args[0])
    rank = len(xs or ())
    reduced = {d % rank for d in dims} if dims else set(range(rank))
    value = finder.fresh(node)
    out = value[0] if isinstance(value, list) else value
    if xs is None or not isinstance(out, tuple):
        return finder.unknown(node, f"{what} of something that is not a tensor")
    kept = [d for d in range(rank) if d not in reduced]
    outs = [d for i, d in enumerate(out) if not (keepdim and i in reduced)]
    for source, dim in zip(kept, outs, strict=True):
        finder.join(xs[source], dim)
    for index in reduced:
        finder.mark_inexact(xs[index], f"{node.name}: {what} over this dimension counts masked channels")
        if keepdim:
            finder.fix(out[index], f"{node.name}: what {what} leaves of a dimension")
    for extra in value[1:] if isinstance(value, list) else []:
        for space in _spaces(extra):
            for a, b in zip(space, out, strict=False):
                finder.join(a, b)
    return value


@_handles(_aten.mean, _aten.sum, _aten.amax, _aten.amin, _aten.var, _aten.std, _aten.max, _aten.min, _aten.prod)
def _reduction(finder: _Finder, node: torch.fx.Node) -> Any:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, list | tuple | type(None)):
        return finder.unknown(node, f"{_op_name(node)} over something that is not a dimension")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if isinstance(keepdim, bool | None):
        return _reduce(finder, node, [int(d) for d in dims or []], bool(keepdim), _op_name(node))
    return finder.unknown(node, f"{_op_name(node)} with arguments fxsparse does not know")


@_handles(_aten.softmax, _PRIVATE["_softmax"], _aten.log_softmax, _PRIVATE["_log_softmax"], _aten.cumsum)
def _softmax(finder: _Finder, node: torch.fx.Node) -> Any:
    out = _elementwise(finder, node)
    xs = finder.space(node.args[0])
    if xs is not None:
        finder.mark_inexact(xs[_int(node.args[1]) % len(xs)], f"{node.name}: {_op_name(node)} over this dimension")
    return out


@_handles(
    _aten.adaptive_avg_pool1d, _aten.adaptive_avg_pool2d, _aten.adaptive_avg_pool3d, _aten.avg_pool1d,
    _aten.avg_pool2d, _aten.avg_pool3d, _aten.max_pool1d, _aten.max_pool2d, _aten.max_pool3d,
    _aten.max_pool2d_with_indices, _PRIVATE["_adaptive_avg_pool2d"],
)  # fmt: skip
def _pool(finder: _Finder, node: torch.fx.Node) -> Any:
    value = finder.fresh(node)
    xs = finder.space(node.args[0])
    if xs is None:
        return finder.unknown(node, "pooling of something that is not a tensor")
    name = _op_name(node)
    spatial = 1 if "1d" in name else 3 if "3d" in name else 2
    leading = len(xs) - spatial
    for out in _spaces(value):
        for index, dim in enumerate(out):
            if index < leading and len(out) == len(xs):
                finder.join(dim, xs[index])
            else:
                finder.fix(dim, f"{node.name}: a spatial dimension of pooling")
    for dim in xs[max(leading, 0) :]:
        finder.fix(dim, f"{node.name}: a spatial dimension of pooling")
    return value


@_handles(_aten.scaled_dot_product_attention)
def _attention(finder: _Finder, node: torch.fx.Node) -> Any:
    q, k, v = node.args[0], node.args[1], node.args[2]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    gqa = node.kwargs.get("enable_gqa", node.args[7] if len(node.args) > 7 else False)
    out, qs, ks, vs = finder.fresh(node), finder.space(q), finder.space(k), finder.space(v)
    if qs is None or ks is None or vs is None or len(qs) < 3 or not isinstance(out, tuple):
        return finder.unknown(node, "attention over tensors of fewer than 3 dimensions")
    for a, b in zip(qs[:-3], out[:-3], strict=True):
        finder.join(a, b)
    for space in (ks, vs):
        for offset in range(4, len(space) + 1):
            finder.join(space[-offset], out[-offset])
    finder.join(qs[-2], out[-2])
    finder.join(qs[-1], ks[-1])
    finder.join(ks[-2], vs[-2])
    finder.join(vs[-1], out[-1])
    finder.join(qs[-3], out[-3])
    heads, kv_heads = qs[-3][1], ks[-3][1]
    finder.join(ks[-3], vs[-3])
    if heads == kv_heads:
        finder.join(qs[-3], ks[-3])
    elif gqa and heads % kv_heads == 0:
        finder.join_blocks(ks[-3], qs[-3])  # a removed key/value head removes its group of query heads
    else:
        return finder.unknown(node, f"attention with {heads} query heads and {kv_heads} key/value heads")
    finder.mark_inexact(qs[-1], f"{node.name}: attention scores sum over this dimension")
    finder.mark_inexact(ks[-2], f"{node.name}: softmax over this dimension")
    if isinstance(mask, torch.fx.Node):
        scores = (*out[:-1], ks[-2])
        _broadcast(finder, scores, [mask], f"{node.name}: an attention mask broadcast over this dimension")
    return out
