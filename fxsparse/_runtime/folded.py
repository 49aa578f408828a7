"""The folded mode at run time: a weight that holds ``mask * weight`` itself, read as it is,
whose gradient is masked on its way back.

``masked_gradient(mask, weight)`` is the identity in the forward (it returns ``weight``
itself, as a view: no copy, no product) and multiplies the gradient by the mask in the
backward, before autograd accumulates it into ``weight.grad``: before any hook of the
weight's (a DDP all-reduce, an FSDP reduce-scatter) or an optimizer sees it. The product
is the one ``torch.mul(mask, weight)``'s backward computes, so the gradient is FakeSparsity's,
bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["masked_gradient", "zero_pruned"]


# Rows of a gradient multiplied at a time: torch converts a bool mask to the gradient's dtype in a
# temporary as large as its input, a whole weight's worth at once; a slice at a time it is small.
_CHUNK_ELEMENTS = 1 << 18


@torch.library.custom_op("fxsparse::mask_gradient", mutates_args=())
def _mask_gradient(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``grad * mask``, as one operator: torch.compile calls it as it is rather than generating a
    kernel of its own for it (inductor's CPU kernel for a float times a bool mask measured 3-4x
    slower than torch's own, single-threaded). Computed a slice of rows at a time (the same
    products, element by element), so that the mask's conversion stays small."""
    dtype = torch.result_type(grad, mask)
    if grad.dim() == 0 or not grad.is_contiguous() or grad.shape != mask.shape or mask.dtype == dtype:
        return torch.mul(grad, mask)
    out = torch.empty_like(grad, dtype=dtype)
    rows = max(1, _CHUNK_ELEMENTS // max(1, grad[0].numel()))
    for start in range(0, grad.shape[0], rows):
        torch.mul(grad[start : start + rows], mask[start : start + rows], out=out[start : start + rows])
    return out


@_mask_gradient.register_fake
def _(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(grad, dtype=torch.result_type(grad, mask))


def _keep_mask(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[1])


def _mask_gradient_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    (mask,) = ctx.saved_tensors
    return _mask_gradient(grad, mask), None  # a gradient of the gradient (create_graph=True): masked the same


_mask_gradient.register_autograd(_mask_gradient_backward, setup_context=_keep_mask)


class _MaskedGradient(torch.autograd.Function):
    @staticmethod
    def forward(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # An input returned as it is becomes a view of it: the forward costs nothing and saves nothing.
        return weight

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])  # the mask buffer itself: nothing is copied

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        (mask,) = ctx.saved_tensors
        return None, _mask_gradient(grad, mask)  # what mul's backward gives the weight of mask * weight


def masked_gradient(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as it is, whose gradient is multiplied by ``mask`` (see the module's docstring)."""
    return _MaskedGradient.apply(mask, weight)  # type: ignore[no-any-return,no-untyped-call]


def zero_pruned(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Set ``weight`` to zero wherever ``mask`` is zero, in place (a NaN or inf there too).

    A weight sharded by FSDP2 (a ``DTensor``) is written shard by shard: each rank its own
    part, the mask cut the same way on every rank, without communication.
    """
    pruned = (mask == 0).to(weight.device)
    with torch.no_grad():
        if torch.distributed.is_available():
            from torch.distributed.tensor import DTensor, distribute_tensor

            if isinstance(weight, DTensor):
                # every rank holds the whole mask: each cuts its own shard of it (src_data_rank=None)
                shards = distribute_tensor(pruned, weight.device_mesh, weight.placements, src_data_rank=None)
                weight.to_local().masked_fill_(shards.to_local(), 0)
                return
        weight.masked_fill_(pruned, 0)
