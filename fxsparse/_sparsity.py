"""Sparsity summary: how dense each mask is, what pattern it has, and the multiply-adds it lets a kernel skip.

Pure data from a :class:`~fxsparse.Plan` (or any mapping of names to masks); the
drawing and report layers read it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ._plan import Plan

__all__ = ["ParameterSparsity", "density_of", "pattern_of", "summarize"]

_N_OF_M = ((2, 4), (1, 4), (3, 4), (4, 8), (1, 2))  # (N, M), most used first
_BLOCKS = (32, 16, 8, 4, 2)


@dataclass(frozen=True)
class ParameterSparsity:
    """One masked parameter: ``density`` is the kept fraction; ``pattern`` one of

    ``"dense"`` (nothing pruned), ``"empty"`` (everything pruned), ``"N:M"`` (at most N
    kept in every M consecutive weights along the input dimension, e.g. ``"2:4"``),
    ``"rows"`` (whole output rows kept or pruned), ``"block BxB"``, ``"unstructured"``,
    or ``"soft"`` (values other than 0 and 1).

    ``macs`` and ``macs_skipped`` count multiply-adds per output position (per token for
    a Linear, per output pixel for a convolution): what a kernel that skips the pruned
    weights saves.
    """

    name: str
    shape: tuple[int, ...]
    density: float
    pattern: str
    macs: int
    macs_skipped: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density


def summarize(masks: Plan | Mapping[str, torch.Tensor]) -> list[ParameterSparsity]:
    """A :class:`ParameterSparsity` per masked parameter, in plan order.

    Example:
        >>> import torch, fxsparse
        >>> mask = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1]], dtype=torch.bool)
        >>> (entry,) = fxsparse.viz.summarize({"fc.weight": mask})
        >>> entry.pattern, entry.density, entry.macs_skipped
        ('2:4', 0.5, 4)
    """
    items: Iterable[tuple[str, torch.Tensor]] = (
        ((p.name, p.mask) for p in masks.parameters) if isinstance(masks, Plan) else masks.items()
    )
    summary = []
    for name, mask in items:
        kept = int(torch.count_nonzero(mask))
        total = mask.numel()
        summary.append(
            ParameterSparsity(
                name=name,
                shape=tuple(mask.shape),
                density=density_of(mask),
                pattern=pattern_of(mask),
                macs=total,
                macs_skipped=total - kept,
            )
        )
    return summary


def density_of(mask: torch.Tensor) -> float:
    """The fraction of weights a mask keeps: its nonzero entries (1.0 for an empty tensor)."""
    return int(torch.count_nonzero(mask)) / mask.numel() if mask.numel() else 1.0


def pattern_of(mask: torch.Tensor) -> str:
    """The most structured pattern ``mask`` follows (see :class:`ParameterSparsity`)."""
    values = mask.detach().to("cpu")
    if values.dtype != torch.bool:
        if not bool(((values == 0) | (values == 1)).all()):
            return "soft"
        values = values != 0
    if values.numel() == 0 or bool(values.all()):
        return "dense"
    if not bool(values.any()):
        return "empty"
    matrix = values.reshape(values.shape[0], -1) if values.dim() > 1 else values.reshape(1, -1)
    rows = matrix.any(dim=1)
    if bool((matrix.all(dim=1) | ~rows).all()):
        return "rows"
    # Blocks of 4 and more say more than the N:M any such block mask also satisfies; a
    # 2:4 mask, what sparse tensor cores run, says more than 2x2 blocks.
    for size in _BLOCKS:
        if size >= 4 and _is_blocked(matrix, size):
            return f"block {size}x{size}"
    n_m = _n_of_m(matrix)
    if n_m is not None:
        return n_m
    return "block 2x2" if _is_blocked(matrix, 2) else "unstructured"


def _n_of_m(matrix: torch.Tensor) -> str | None:
    """``"N:M"`` when every group of M consecutive weights keeps at most N, and N on average
    (to within half a weight), trying 2:4 first; else None.

    At most N is what an N:M kernel needs; the average rules out masks that merely are
    sparse (a random 10 % mask keeps at most 2 of every 4 too, which says nothing).
    """
    for kept, group in _N_OF_M:
        if matrix.shape[1] % group == 0:
            counts = matrix.reshape(matrix.shape[0], -1, group).sum(dim=2)
            if bool((counts <= kept).all()) and float(counts.float().mean()) >= kept - 0.5:
                return f"{kept}:{group}"
    return None


def _is_blocked(matrix: torch.Tensor, size: int) -> bool:
    rows, columns = matrix.shape
    if rows % size or columns % size or (rows == size and columns == size):
        return False
    blocks = matrix.reshape(rows // size, size, columns // size, size)
    return bool((blocks.all(dim=(1, 3)) | ~blocks.any(dim=(1, 3))).all())
