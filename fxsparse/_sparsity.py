"""Sparsity summary: how dense each mask is, what pattern it has, and the multiply-adds it lets a kernel skip.

Pure data from a :class:`~fxsparse.Plan` (or any mapping of names to masks); the
drawing and report layers read it. Patterns are read along the weight's input
dimension: dimension 1 of a ``Linear`` (``[out, in]``) or convolution
(``[out, in, *kernel]``) weight, dimension 0 of a Hugging Face ``Conv1D`` (``[in, out]``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._plan import Plan

__all__ = [
    "ParameterSparsity",
    "density_of",
    "holder_types",
    "input_axis_of",
    "is_transformers_conv1d",
    "pattern_of",
    "summarize",
    "uniform_blocks",
]

_N_OF_M = ((2, 4), (1, 4), (3, 4), (4, 8), (1, 2))  # (N, M), most used first
_BLOCKS = (32, 16, 8, 4, 2)


@dataclass(frozen=True)
class ParameterSparsity:
    """One masked parameter: ``density`` is the kept (nonzero) fraction; ``pattern`` one of

    ``"dense"`` (nothing pruned), ``"empty"`` (everything pruned), ``"rows"`` (whole
    output rows or channels kept or pruned), ``"columns"`` (whole input columns or
    channels), ``"block BxB"`` (square blocks, those cut by the matrix's edge included),
    ``"N:M"`` (at most N kept in every M consecutive weights along the input dimension,
    N on average, e.g. ``"2:4"``), ``"unstructured"``, or ``"soft"`` (values other than 0
    and 1).

    ``macs`` and ``macs_skipped`` count the multiply-adds the weight takes part in per
    output position (per token for a ``Linear``, per output pixel for a convolution) and
    those a kernel that skips pruned weights would save. They are 0 for weights that
    multiply nothing: embedding tables (a lookup) and 1-D weights such as biases.
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


def summarize(masks: Plan | Mapping[str, torch.Tensor], model: nn.Module | None = None) -> list[ParameterSparsity]:
    """A :class:`ParameterSparsity` per masked parameter, in plan (or mapping) order.

    Given the ``model`` the masks are for (or fxsparse's output, which holds its
    modules), patterns are read along each weight's real input dimension and embedding
    tables count no multiply-adds; without it every weight of two or more dimensions is
    taken as ``[out, in, ...]``.

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
    holders = holder_types(model) if model is not None else {}
    summary = []
    for name, mask in items:
        if mask.is_meta:
            raise ValueError(f"the mask of {name!r} is on the meta device: it has a shape but no values to summarize")
        kinds = holders.get(name)
        axis = input_axis_of(kinds) if mask.dim() > 1 else 0
        multiplies = mask.dim() > 1 and not (kinds and all(issubclass(kind, nn.Embedding) for kind in kinds))
        kept = int(torch.count_nonzero(mask))
        total = mask.numel()
        summary.append(
            ParameterSparsity(
                name=name,
                shape=tuple(mask.shape),
                density=density_of(mask),
                pattern=pattern_of(mask, input_axis=axis),
                macs=total if multiplies else 0,
                macs_skipped=total - kept if multiplies else 0,
            )
        )
    return summary


def density_of(mask: torch.Tensor) -> float:
    """The fraction of weights a mask keeps: its nonzero entries (1.0 for an empty tensor)."""
    return int(torch.count_nonzero(mask)) / mask.numel() if mask.numel() else 1.0


def input_axis_of(kinds: Iterable[type[nn.Module]] | None) -> int:
    """The input dimension of a weight held by modules of ``kinds``: 0 for Hugging Face's
    ``Conv1D`` (``[in, out]``) and transposed convolutions (``[in, out, *kernel]``), else 1."""
    transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    return 0 if kinds and any(is_transformers_conv1d(kind) or issubclass(kind, transposed) for kind in kinds) else 1


def is_transformers_conv1d(kind: type) -> bool:
    """Whether ``kind`` is Hugging Face transformers' ``Conv1D`` (or derives from it), whose weight is
    ``[in, out]``. Known by the package that defines it, not by its name: a user's own class
    called ``Conv1D`` may well hold ``[out, in]``. Reading ``__module__`` needs no import of transformers."""
    return any(base.__name__ == "Conv1D" and base.__module__.startswith("transformers.") for base in kind.__mro__)


def pattern_of(mask: torch.Tensor, input_axis: int = 1) -> str:
    """The most structured pattern ``mask`` follows (see :class:`ParameterSparsity`).

    ``input_axis`` is the weight's input dimension (1 for ``[out, in, ...]``, 0 for a
    ``Conv1D``'s ``[in, out]``). A 1-D mask (a bias, a norm's weight) is ``dense``,
    ``empty``, ``soft`` or ``unstructured``: no kernel reads it in groups.
    """
    if mask.dim() > 1 and not 0 <= input_axis < mask.dim():
        raise ValueError(f"input_axis must be a dimension of the {tuple(mask.shape)} mask, got {input_axis}")
    values = mask.detach().to("cpu")
    if values.dtype != torch.bool:
        if not bool(((values == 0) | (values == 1)).all()):
            return "soft"
        values = values != 0
    if values.numel() == 0 or bool(values.all()):
        return "dense"
    if not bool(values.any()):
        return "empty"
    if values.dim() < 2:
        return "unstructured"
    # [out, in] with the kernel positions as more rows: N:M groups run along the input
    # channels at each kernel position, as NVIDIA's sparse convolutions take them.
    moved = values.movedim(input_axis, -1)  # [out, *kernel, in]
    matrix = moved.reshape(-1, moved.shape[-1])
    outputs = moved.reshape(moved.shape[0], -1)
    if outputs.shape[0] > 1 and _whole_lines(outputs):
        return "rows"
    if matrix.shape[0] > 1 and _whole_lines(matrix.T):
        return "columns"
    # Blocks of 4 and more say more than the N:M any such block mask also satisfies; a
    # 2:4 mask, what sparse tensor cores run, says more than 2x2 blocks.
    for size in _BLOCKS:
        if size >= 4 and _is_blocked(matrix, size):
            return f"block {size}x{size}"
    n_m = _n_of_m(matrix)
    if n_m is not None:
        return n_m
    return "block 2x2" if _is_blocked(matrix, 2) else "unstructured"


def _whole_lines(matrix: torch.Tensor) -> bool:
    """Whether each row of ``matrix`` is all kept or all pruned."""
    return bool((matrix.all(dim=1) | ~matrix.any(dim=1)).all())


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
    """Whether ``matrix`` is made of ``size`` x ``size`` blocks (:func:`uniform_blocks`), at least
    two of them whole, or any mask of a small matrix would qualify."""
    rows, columns = matrix.shape
    return (rows // size) * (columns // size) >= 2 and uniform_blocks(matrix, size, size)


def uniform_blocks(matrix: torch.Tensor, rows: int, columns: int) -> bool:
    """Whether every ``rows`` x ``columns`` block of a bool ``matrix`` (from index 0, cut short at
    the edges) is all kept or all pruned."""
    height, width = matrix.shape
    pad = (0, -width % columns, 0, -height % rows)
    shape = ((height + pad[3]) // rows, rows, (width + pad[1]) // columns, columns)
    kept_anywhere = F.pad(matrix, pad, value=False).reshape(shape).any(dim=(1, 3))
    kept_everywhere = F.pad(matrix, pad, value=True).reshape(shape).all(dim=(1, 3))
    return bool((kept_everywhere | ~kept_anywhere).all())


def holder_types(model: nn.Module) -> dict[str, list[type[nn.Module]]]:
    """Each parameter name of ``model`` (every alias) -> the types of all modules holding that parameter."""
    names: dict[int, list[str]] = {}
    kinds: dict[int, list[type[nn.Module]]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for local, parameter in module._parameters.items():
            if parameter is not None:
                names.setdefault(id(parameter), []).append(f"{prefix}.{local}" if prefix else local)
                kinds.setdefault(id(parameter), []).append(type(module))
    return {name: kinds[key] for key, aliases in names.items() for name in aliases}
