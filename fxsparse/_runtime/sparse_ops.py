"""Sparse kernels for frozen linear layers: the ``fxsparse::sparse_linear`` operator and its callers.

A frozen weight in a sparse layout is kept as three plain tensors (row pointers, column
indices, values) and wrapped into a sparse tensor per call; ``csr_linear``/``bsr_linear``
are what the graph calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from .._compat import sparse_compressed_tensor_unsafe

__all__ = ["bsr_linear", "csr_linear", "sparse_linear_op"]

_is_tracing: Callable[[], bool] = torch.jit.is_tracing  # type: ignore[attr-defined]
_is_scripting: Callable[[], bool] = torch.jit.is_scripting  # type: ignore[attr-defined]


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
    weight = sparse_compressed_tensor_unsafe(crow_indices, col_indices, values, [out_features, rows.shape[1]], blocked)
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
    weight = sparse_compressed_tensor_unsafe(crow_indices, col_indices, values, [grad.shape[1], in_features], blocked)
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
