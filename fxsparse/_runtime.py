"""Functions and modules that rewritten graphs call at run time."""

from __future__ import annotations

import functools
import math
import reprlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

__all__ = ["InputGuards", "bsr_linear", "call_with_parameters", "check_input_structure", "csr_linear"]


def call_with_parameters(module: nn.Module, parameters: dict[str, torch.Tensor], /, *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)`` with some of its parameters replaced for the call.

    The rewrite calls a module whose ``forward`` cannot be traced this way, with the
    ``mask * weight`` products in place of its masked parameters (what
    ``torch.func.functional_call`` does, minus its refusal to run under ``torch.jit.trace``).
    """
    proxy = next((a for a in (*parameters.values(), *args, *kwargs.values()) if isinstance(a, torch.fx.Proxy)), None)
    if proxy is not None:  # a GraphModule's code being traced again (unpickling): stay one call
        return proxy.tracer.create_proxy("call_function", call_with_parameters, (module, parameters, *args), kwargs)
    with _reparametrize_module(module, dict(parameters)):
        return module(*args, **kwargs)


_is_tracing: Callable[[], bool] = torch.jit.is_tracing  # type: ignore[attr-defined]
_is_scripting: Callable[[], bool] = torch.jit.is_scripting  # type: ignore[attr-defined]


def _sparse_weight(
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    values: torch.Tensor,
    size: list[int],
    blocked: bool,
) -> torch.Tensor:
    dtype, device = values.dtype, values.device  # a trace records them as constants (documented)
    if blocked:
        bsr: torch.Tensor = torch.ops.aten._sparse_bsr_tensor_unsafe(
            crow_indices, col_indices, values, size, dtype=dtype, device=device
        )
        return bsr
    csr: torch.Tensor = torch.ops.aten._sparse_csr_tensor_unsafe(
        crow_indices, col_indices, values, size, dtype=dtype, device=device
    )
    return csr


def _sparse_times(
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    blocked: bool,
    one_row_mv: bool,
) -> torch.Tensor:
    """``rows @ weight.T + bias`` with builtin operators only (TorchScript files that use it load in C++).

    The product is computed as ``weight @ rows.T`` (what torch's sparse kernels run fast) and
    returned transposed, without a copy: a ``[rows, out]`` tensor laid out column by column.
    """
    weight = _sparse_weight(crow_indices, col_indices, values, [out_features, rows.shape[1]], blocked)
    if one_row_mv and not blocked and rows.shape[0] == 1:
        if bias is None:
            return torch.mv(weight, rows[0]).unsqueeze(1).t()
        return torch.addmv(bias, weight, rows[0]).unsqueeze(1).t()
    if bias is None:
        return torch.mm(weight, rows.t()).t()
    return torch.addmm(bias.unsqueeze(1), weight, rows.t()).t()


@torch.library.custom_op("fxsparse::sparse_linear", mutates_args=())
def sparse_linear_op(
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    blocked: bool,
) -> torch.Tensor:
    """``rows @ weight.T + bias`` for a 2-D ``rows`` and a CSR (or, ``blocked``, BSR) weight given by its parts.

    An operator of its own (``torch.ops.fxsparse.sparse_linear``) so that ``torch.compile``
    runs it as one opaque call: dynamo cannot trace sparse tensors. ``torch.addmv`` serves a
    single CSR row, ``torch.addmm`` of the transposed input the rest: both several times
    faster than ``F.linear`` on a sparse weight. Differentiable in ``rows`` and ``bias``.
    """
    return _sparse_times(crow_indices, col_indices, values, rows, bias, out_features, blocked, True)


@sparse_linear_op.register_fake
def _(
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    blocked: bool,
) -> torch.Tensor:
    return rows.new_empty(out_features, rows.shape[0]).t()  # laid out as the kernel returns it


@torch.library.custom_op("fxsparse::sparse_linear_backward", mutates_args=())
def sparse_linear_backward(
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    values: torch.Tensor,
    grad: torch.Tensor,
    in_features: int,
    blocked: bool,
) -> torch.Tensor:
    """``grad @ weight``: the gradient of :func:`sparse_linear_op` in its rows (an operator too, for torch.compile)."""
    weight = _sparse_weight(crow_indices, col_indices, values, [grad.shape[1], in_features], blocked)
    # A CSR weight transposes to CSC, which mm takes; torch has no CPU kernel for a transposed BSR.
    return torch.mm(grad, weight.to_dense()) if blocked else torch.mm(weight.t(), grad.t()).t().contiguous()


@sparse_linear_backward.register_fake
def _(
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    values: torch.Tensor,
    grad: torch.Tensor,
    in_features: int,
    blocked: bool,
) -> torch.Tensor:
    return grad.new_empty(grad.shape[0], in_features)


def _keep_for_backward(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    crow_indices, col_indices, values, rows, _, _, blocked = inputs
    ctx.save_for_backward(crow_indices, col_indices, values)
    ctx.in_features, ctx.blocked = rows.shape[1], blocked


def _rows_gradient(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    crow_indices, col_indices, values = ctx.saved_tensors
    grad_rows = None
    if ctx.needs_input_grad[3]:
        grad_rows = sparse_linear_backward(crow_indices, col_indices, values, grad, ctx.in_features, ctx.blocked)
    grad_bias = grad.sum(0) if ctx.needs_input_grad[4] else None
    return None, None, None, grad_rows, grad_bias, None, None


sparse_linear_op.register_autograd(_rows_gradient, setup_context=_keep_for_backward)


def csr_linear(
    x: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a weight stored as compressed sparse rows (``fxsparse.freeze``).

    The weight is kept as its three plain tensors (they copy, pickle and load with
    ``weights_only=True``, which a sparse tensor does not all do) and wrapped per call,
    which costs microseconds.
    """
    return _sparse_linear(x, crow_indices, col_indices, values, bias, out_features, in_features, False)


def bsr_linear(
    x: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a weight stored as blocked sparse rows (``values`` holds the blocks)."""
    return _sparse_linear(x, crow_indices, col_indices, values, bias, out_features, in_features, True)


def _sparse_linear(
    x: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
    blocked: bool,
) -> torch.Tensor:
    # The sparse tensor takes its width from the input and torch checks nothing: a wrong width
    # would read out of bounds, so check it here, as F.linear would.
    if not _is_tracing() and x.shape[-1] != in_features:  # a trace checks its example by running it
        raise RuntimeError(
            "a sparse linear layer of in_features="
            + str(in_features)
            + " got an input whose last dimension is "
            + str(x.shape[-1])
        )
    rows = x.reshape(-1, x.shape[-1])
    # TorchScript compiles only the first branch (torch.jit.is_scripting() is known when compiling),
    # a trace records the second: builtin operators, which C++ loads; torch.compile and eager run
    # the operator. A trace must not bake in the one-row branch: it runs the general kernel.
    if _is_scripting():
        y = _sparse_times(crow_indices, col_indices, values, rows, bias, out_features, blocked, True)
    elif _is_tracing():
        y = _sparse_times(crow_indices, col_indices, values, rows, bias, out_features, blocked, False)
    else:
        y = torch.ops.fxsparse.sparse_linear(crow_indices, col_indices, values, rows, bias, out_features, blocked)
    shape = list(x.shape[:-1])
    shape.append(out_features)
    return y.reshape(shape)


class InputGuards(nn.Module):
    """Checks the inputs of a graph captured by ``torch.export`` against those it was exported for.

    An exported graph is only valid for the inputs it was exported with: every dimension
    not made dynamic is fixed at its example size (a graph that reshapes to ``[-1, 8]``
    would silently compute garbage on other sizes), every non-tensor input at its example
    value, and train or eval mode at the mode the model was in (dropout and batch norm are
    baked into the graph). This module checks them, as plain data: per tensor input a size
    per static dimension and a symbol per dynamic one (its range in ``ranges``; one symbol
    shared by several dimensions means equal sizes), per non-tensor input its value; then
    the conditions torch.export recorded (``checks``: Python source over the flat inputs,
    for relations the above cannot express). Under ``torch.jit.trace`` the size checks are
    recorded into the trace as TorchScript calls.
    """

    def __init__(
        self,
        inputs: Sequence[tuple[str, str, Any]],
        ranges: Mapping[str, tuple[int, int | None]],
        training: bool,
        checks: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__()
        self.inputs = list(inputs)  # (name, "tensor" | "value" | "any", dimensions | example value | None)
        self.ranges = dict(ranges)
        self.exported_training = training
        self.train(training)
        # torch.export's own guards, as (Python over ``args``, text): see _capture._torch_guards.
        self.checks = list(checks)
        self.conditions = tuple(condition for condition, _ in self.checks)  # the key of their compiled function

    def forward(self, *args: Any) -> None:
        if self.training != self.exported_training:
            exported, now = ("train", "eval") if self.exported_training else ("eval", "train")
            raise ValueError(
                f"the model was captured with torch.export in {exported} mode, which its graph keeps (dropout, "
                f"batch norm); it cannot run in {now} mode: transform the model in {now} mode instead"
            )
        tracing = torch.jit.is_tracing()  # type: ignore[attr-defined,no-untyped-call]
        seen: dict[str, tuple[str, int, torch.Tensor]] = {}
        for (name, kind, expected), value in zip(self.inputs, args, strict=True):
            if kind == "value" and not tracing and not _same_value(value, expected):
                raise ValueError(
                    f"input {name!r} is {reprlib.repr(value)}, but the model was exported with {name}={expected!r}, "
                    "which its graph keeps: transform it again with the value you need"
                )
            if kind != "tensor":
                continue
            if not isinstance(value, torch.Tensor) or value.dim() != len(expected):
                got = f"{value.dim()} dimensions" if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"input {name!r} must be a tensor with {len(expected)} dimensions, got {got}")
            for axis, dimension in enumerate(expected):
                if isinstance(dimension, int):
                    self._check_size(name, value, axis, dimension, dimension, tracing)
                elif isinstance(dimension, str):
                    low, high = self.ranges.get(dimension, (0, None))
                    self._check_size(name, value, axis, low, high, tracing)
                    first = seen.setdefault(dimension, (name, axis, value))
                    self._check_same_size(first, name, value, axis, tracing)
        if self.checks and not tracing:
            failed = _compiled_checks(self.conditions)(*args)
            if failed >= 0:
                raise ValueError(
                    f"the inputs fail a condition of the graph torch.export captured: {self.checks[failed][1]}"
                )

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: {expected}" for name, kind, expected in self.inputs if kind != "any")

    @staticmethod
    def _check_size(name: str, value: torch.Tensor, axis: int, low: int, high: int | None, tracing: bool) -> None:
        size = value.shape[axis]
        if not tracing and low <= size and (high is None or size <= high):
            return
        allowed = f"size {low}" if low == high else f"a size in [{low}, {'inf' if high is None else high}]"
        before = f"input {name!r} has size "
        after = f" in dimension {axis}, but must have {allowed}, as when it was exported"
        if low == high:
            after += " (pass dynamic_shapes to fxsparse.transform to make it dynamic)"
        if tracing:
            _scripted_checks()[0](value, axis, low, -1 if high is None else high, before, after)
        else:
            raise ValueError(f"{before}{size}{after}")

    @staticmethod
    def _check_same_size(
        first: tuple[str, int, torch.Tensor], name: str, value: torch.Tensor, axis: int, tracing: bool
    ) -> None:
        first_name, first_axis, first_value = first
        if not tracing and value.shape[axis] == first_value.shape[first_axis]:
            return
        before = f"input {name!r} has size "
        after = (
            f" in dimension {axis}, but must have the size of dimension {first_axis} of input {first_name!r}, "
            "as when it was exported"
        )
        if tracing:
            _scripted_checks()[1](first_value, first_axis, value, axis, before, after)
        else:
            raise ValueError(f"{before}{value.shape[axis]}{after} ({first_value.shape[first_axis]})")


def _same_value(value: Any, expected: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return False
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(value, float) and math.isnan(value)
    return bool(value == expected)


@functools.lru_cache(maxsize=256)
def _compiled_checks(conditions: tuple[str, ...]) -> Any:
    """One function over the flat inputs returning the index of the first condition that fails, or -1."""
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

    lines = ["def checks(*args):"]
    lines += [f"    if not ({condition}):\n        return {index}" for index, condition in enumerate(conditions)]
    lines.append("    return -1")
    namespace: dict[str, Any] = {**SYMPY_INTERP, "math": math, "inf": math.inf, "torch": torch}
    exec(compile("\n".join(lines), "<fxsparse input checks>", "exec"), namespace)
    return namespace["checks"]


def check_input_structure(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Forward pre-hook of a graph captured by ``torch.export`` from inputs that are lists, tuples or dicts.

    The graph reads the leaves of each such input as exported; this refuses one whose
    structure differs (an extra item would otherwise be ignored without a word).
    """
    info: Any = module.graph._codegen.pytree_info  # type: ignore[union-attr]
    positional, keywords = info.in_spec.children()
    expected = dict(zip(info.orig_args, positional.children(), strict=False))
    expected.update(zip(keywords.context, keywords.children(), strict=True))
    given = dict(zip(info.orig_args, args, strict=False))
    given.update(kwargs)
    for name, spec in expected.items():
        if not spec.is_leaf() and name in given:
            structure = torch.utils._pytree.tree_structure(given[name])
            if structure != spec:
                raise ValueError(
                    f"input {name!r} must have the structure the model was exported with, {spec}, got {structure}"
                )


def _size_in(value: torch.Tensor, axis: int, low: int, high: int, before: str, after: str) -> torch.Tensor:
    size = value.size(axis)
    if size < low or (high >= 0 and size > high):
        raise ValueError(before + str(size) + after)
    return value


def _same_size(
    first: torch.Tensor, first_axis: int, value: torch.Tensor, axis: int, before: str, after: str
) -> torch.Tensor:
    if value.size(axis) != first.size(first_axis):
        raise ValueError(before + str(value.size(axis)) + after + " (" + str(first.size(first_axis)) + ")")
    return value


@functools.cache
def _scripted_checks() -> tuple[Any, Any]:
    """The size checks as TorchScript functions: ``torch.jit.trace`` records a call to one (sizes it would bake in)."""
    return torch.jit.script(_size_in), torch.jit.script(_same_size)
