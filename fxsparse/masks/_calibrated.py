"""Mask makers that read activations: Wanda and SparseGPT, calibrated through fxsparse's own graph.

Both take ``calibration``, an iterable of model inputs (each a tensor, a tuple of positional
inputs, or a dict of keyword inputs such as a Hugging Face batch), run them through the
graph :func:`fxsparse.transform` captures (``torch.fx``, or ``torch.export`` on the first
batch), and rank each selected weight's inputs by what reaches them. Nothing here changes
the model: fxsparse's capture reads the model's own weights (no copy of them) and never
writes them; a weight pruned on the way (``sequential``) is read from a tensor of its own.

Cost. Each batch runs through the graph once. Time grows as the model's forward over the
calibration tokens, plus per weight its statistic (Wanda: ``tokens × in``; SparseGPT: the
Hessian, ``tokens × in²``, and the solver, ``out × in²``-ish); so linearly in layers and
tokens, quadratically in width for SparseGPT. Memory, besides the model's weights: the
masks (and for SparseGPT the reconstructed weights) made so far, the live activations of
every calibration batch at one point of the graph (the residual stream and the current
layer's intermediates: ``tokens × width`` a few times over, not per layer), and the
statistics of the weights being decided (SparseGPT: one ``in × in`` float32 Hessian per
input shared by the weights that read it, q/k/v sharing one).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._errors import MaskError
from ._calibrate import Statistic, batches_of, calibrate
from ._makers import FilterFn, Sparsity, select, sparsity_levels

__all__ = ["SparseGPTResult", "sparsegpt", "wanda"]


def wanda(
    model: nn.Module,
    calibration: Iterable[Any],
    sparsity: Sparsity = 0.5,
    *,
    pattern: str | None = None,
    sequential: bool = True,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    filter_fn: FilterFn | None = None,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Wanda masks (Sun et al., arXiv 2306.11695): prune by ``|W_ij| · ‖X_j‖₂``.

    ``X_j`` is input feature ``j`` of the weight's layer over every calibration token (all
    leading dimensions flattened; a weight used twice sees both uses' inputs). Unstructured:
    each output row loses exactly ``floor(sparsity · in_features)`` of its lowest scores.
    ``pattern="N:M"`` (``"2:4"``): keep the ``N`` highest of every ``M`` consecutive inputs
    in each row; ``sparsity`` is then ignored. Among equal scores the earlier input is
    pruned first; a NaN weight counts as the largest.

    Args:
        model: any model :func:`fxsparse.transform` captures; it is not changed.
        calibration: model inputs: tensors, tuples of positional inputs, or dicts of keyword
            inputs (``[tokenizer(text, return_tensors="pt") for text in texts]``). A model
            captured with ``torch.export`` (Hugging Face) is captured on the first batch,
            and every batch must have its shapes.
        sparsity: the fraction of each row to prune, or a mapping from module-name globs to
            fractions (as :func:`magnitude`).
        pattern: ``"N:M"``, or ``None`` for unstructured.
        sequential: ``True`` (as the paper): weights are pruned in graph order, and each
            sees the inputs of the model with every weight before it already pruned.
            ``False``: every weight sees the unpruned model's inputs.
        include, exclude, filter_fn: which weights, as :func:`select` (default: every
            ``nn.Linear`` and transformers ``Conv1D``). A selected weight used by anything
            but a ``linear``, ``addmm`` or ``matmul`` (a ``Conv2d``) gets a ``MaskError``.
        progress: a progress line on stderr; default: when stderr is a terminal.

    Returns:
        ``{parameter name: bool mask}``, for :func:`fxsparse.transform`.

    Example:
        >>> import torch, fxsparse
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> masks = fxsparse.masks.wanda(model, [torch.randn(16, 8)], pattern="2:4")
        >>> {name: mask.sum().item() for name, mask in masks.items()}
        {'0.weight': 32, '2.weight': 16}
    """
    names, levels, groups = _chosen(model, sparsity, pattern, include, exclude, filter_fn)

    def decide(name: str, weight: torch.Tensor, squares: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = (weight.abs().to(torch.float32) * squares.sqrt()).nan_to_num_(nan=math.inf)
        mask = _keep_per_row(scores, levels[name]) if groups is None else _keep_n_of_m(name, scores, *groups)
        return mask, weight * mask

    results = calibrate(
        model,
        names,
        batches_of(calibration),
        Statistic(_sum_of_squares),
        decide,
        sequential=sequential,
        progress=progress,
        weights=False,  # the masks are the result: no copy of the pruned weights is held
    )
    return {name: mask for name, (mask, _) in results.items()}


@dataclass(frozen=True)
class SparseGPTResult:
    """What :func:`sparsegpt` returns: ``masks`` (``{name: bool mask}``, for :func:`fxsparse.transform`)
    and ``weights`` (``{name: reconstructed weight}``, zero where pruned, in each weight's shape and dtype)."""

    masks: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]


def sparsegpt(
    model: nn.Module,
    calibration: Iterable[Any],
    sparsity: Sparsity = 0.5,
    *,
    pattern: str | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    sequential: bool = True,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    filter_fn: FilterFn | None = None,
    progress: bool | None = None,
) -> SparseGPTResult:
    """SparseGPT (Frantar & Alistarh, arXiv 2301.00774): masks, and the kept weights reconstructed
    so that each layer's outputs on the calibration inputs change as little as possible.

    Per weight, ``H = (2/n) Σ x xᵀ`` over its calibration tokens, then the reference
    ``fasterprune`` (``blocksize`` columns at a time, damping ``percdamp · mean(diag H)``).
    With ``sequential=True`` (default) each weight sees the inputs of the model with every
    weight before it pruned and reconstructed. The model is not changed: load ``.weights``
    into it (or into fxsparse's output) yourself.

    The other arguments are :func:`wanda`'s.

    Returns:
        a :class:`SparseGPTResult` with ``.masks`` and ``.weights``.
    """
    from ._sparsegpt import hessian_update, prune

    names, levels, groups = _chosen(model, sparsity, pattern, include, exclude, filter_fn)

    def update(state: tuple[torch.Tensor, int] | None, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        hessian, seen = (None, 0) if state is None else state
        return hessian_update(hessian, x, seen)

    def decide(name: str, weight: torch.Tensor, state: tuple[torch.Tensor, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return prune(weight, state[0], levels.get(name, 0.0), pattern=groups, blocksize=blocksize, percdamp=percdamp)

    results = calibrate(
        model, names, batches_of(calibration), Statistic(update), decide, sequential=sequential, progress=progress
    )
    return SparseGPTResult(
        masks={name: mask for name, (mask, _) in results.items()},
        weights={name: weight for name, (_, weight) in results.items()},
    )


def _chosen(
    model: nn.Module,
    sparsity: Sparsity,
    pattern: str | None,
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    filter_fn: FilterFn | None,
) -> tuple[list[str], dict[str, float], tuple[int, int] | None]:
    """The selected weights, each one's sparsity (unstructured), and the ``(n, m)`` pattern."""
    if not isinstance(model, nn.Module):
        raise MaskError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if pattern is None:
        levels = sparsity_levels(model, sparsity, include, exclude, filter_fn)
        return list(levels), levels, None
    return select(model, include=include, exclude=exclude, filter_fn=filter_fn), {}, _pattern(pattern)


def _pattern(pattern: Any) -> tuple[int, int]:
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) == 2 and all(part.strip().isdigit() for part in parts):
        n, m = int(parts[0]), int(parts[1])
        if 0 <= n <= m and m > 0:
            return n, m
    raise MaskError(f'pattern must be "N:M" with whole numbers 0 <= N <= M and M > 0 (e.g. "2:4"), got {pattern!r}')


def _sum_of_squares(state: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Per input feature, the sum of squares over the tokens (float32): ``‖X_j‖₂²``."""
    squares = x.to(torch.float32).square().sum(dim=0)
    return squares if state is None else state + squares


def _keep_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``False`` at the ``floor(sparsity · in)`` lowest scores of each row (earlier first among equals)."""
    pruned = math.floor(sparsity * scores.shape[1] + 1e-9)  # 0.3 * 10 is 2.9999999999999996
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if pruned > 0:
        lowest = torch.sort(scores, dim=1, stable=True).indices[:, :pruned]
        keep.scatter_(1, lowest, False)
    return keep


def _keep_n_of_m(name: str, scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``True`` at the ``n`` highest of every ``m`` consecutive scores of each row (earlier first among equals)."""
    rows, inputs = scores.shape
    if inputs % m:
        raise MaskError(
            f"{name}: its input dimension ({inputs}) is not a multiple of m={m}; leave it out (exclude=) "
            "or pick another pattern"
        )
    groups = scores.reshape(rows, inputs // m, m)
    highest = torch.sort(groups, dim=2, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device).scatter_(2, highest, True)
    return keep.reshape(rows, inputs)
