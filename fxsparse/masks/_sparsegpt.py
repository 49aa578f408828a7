"""The SparseGPT solver (Frantar & Alistarh, arXiv 2301.00774) on one weight, as pure functions.

:func:`hessian_update` accumulates a layer's input statistics ``H = (2/n) Σ x xᵀ`` one
calibration batch at a time; :func:`prune` chooses a mask from ``H`` and reconstructs the
kept weights so that the layer's outputs on the calibration inputs change as little as
possible. The algorithm is the reference implementation's (IST-DASLab/sparsegpt,
``sparsegpt.py``, ``SparseGPT.fasterprune``): dead inputs zeroed, damping
``percdamp · mean(diag H)``, the upper Cholesky factor of ``H⁻¹``, columns in blocks of
``blocksize`` with per-column error compensation inside a block and one lazy update of the
later columns per block. Where it differs on purpose:

- an unstructured block prunes exactly ``int(sparsity · block size)`` weights, so a weight
  ends at the sparsity asked for; the reference's ``scores <= sorted[k]`` prunes one more
  per block (one even at ``sparsity=0``), and every tied score besides;
- ties are broken by position (the earlier weight, in row-major order within the block or
  group, is pruned first), where the reference's ``topk`` leaves the order to the kernel;
- ``N:M`` groups are ``M`` consecutive inputs counted from input 0, so ``in_features`` and
  ``blocksize`` must be multiples of ``M`` (the reference silently shortens a group that
  straddles a block's end).

The scale of ``H`` does not matter (masks and weights are the same for ``c·H``, up to
round-off), so counting calibration rows, as here, or sequences, as the reference does,
gives the same result when every sequence has the same length.

Which layer a weight belongs to, and transposing a transformers ``Conv1D`` weight to
``[out, in]``, is the caller's business: both functions see one ``[out, in]`` weight.
"""

from __future__ import annotations

import math

import torch

from .._errors import MaskError

__all__ = ["hessian_update", "prune"]


def hessian_update(hessian: torch.Tensor | None, inputs: torch.Tensor, seen: int) -> tuple[torch.Tensor, int]:
    """Fold one calibration batch into the running ``H = (2/n) Σ x xᵀ`` of a layer's inputs.

    ``inputs`` is ``[..., in_features]``: every leading dimension is flattened, so each row
    (token) counts once. ``H`` is accumulated in ``float32`` on ``inputs``' device whatever
    ``inputs``' dtype. ``hessian=None`` (with ``seen=0``) starts a new one. Returns the new
    ``H`` and the new row count; the ``hessian`` given is not changed (the caller drops it).

    Example:
        >>> import torch
        >>> from fxsparse.masks._sparsegpt import hessian_update
        >>> h, n = hessian_update(None, torch.tensor([[1.0, 0.0], [1.0, 2.0]]), 0)
        >>> h, n = hessian_update(h, torch.tensor([[[0.0, 2.0], [2.0, 0.0]]], dtype=torch.bfloat16), n)
        >>> h.tolist(), h.dtype, n  # (2/4) · Σ x xᵀ over the four rows
        ([[3.0, 1.0], [1.0, 4.0]], torch.float32, 4)
    """
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1 or not inputs.is_floating_point():
        got = (
            f"a {inputs.dtype} tensor of shape {tuple(inputs.shape)}"
            if isinstance(inputs, torch.Tensor)
            else repr(inputs)
        )
        raise MaskError(f"calibration inputs must be a floating-point tensor [..., in_features], got {got}")
    if isinstance(seen, bool) or not isinstance(seen, int) or seen < 0:
        raise MaskError(f"seen (rows already in the Hessian) must be a whole number >= 0, got {seen!r}")
    features = inputs.shape[-1]
    if hessian is None:
        if seen != 0:
            raise MaskError(f"a new Hessian (hessian=None) starts from seen=0, got seen={seen}")
        hessian = torch.zeros(features, features, dtype=torch.float32, device=inputs.device)
    elif hessian.shape != (features, features) or hessian.dtype != torch.float32:
        raise MaskError(
            f"the running Hessian must be float32 of shape ({features}, {features}) for inputs with "
            f"{features} features, got {hessian.dtype} of shape {tuple(hessian.shape)}"
        )
    rows = inputs.detach().reshape(-1, features).to(device=hessian.device, dtype=torch.float32)
    total = seen + rows.shape[0]
    if rows.shape[0] == 0:
        return hessian.clone(), seen
    # H_new = (seen/total)·H + (2/total)·XᵀX: the mean over every row so far, never a running sum
    # that could overflow float32 over many batches.
    return torch.addmm(hessian, rows.T, rows, beta=seen / total, alpha=2 / total), total


def prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float = 0.5,
    *,
    pattern: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one ``[out, in]`` weight: the mask, and the weight reconstructed around it.

    Args:
        weight: ``[out_features, in_features]``, any floating dtype.
        hessian: ``[in_features, in_features]``, from :func:`hessian_update`.
        sparsity: the fraction pruned, in ``[0, 1)``: ``int(sparsity · rows · cols)`` of each
            block of ``blocksize`` columns, chosen by the lowest ``w² / [H⁻¹]_jj²``
            (ignored when ``pattern`` is given).
        pattern: ``(n, m)`` keeps ``n`` of every ``m`` consecutive inputs in each row
            (``(2, 4)`` for 2:4); ``in_features`` and ``blocksize`` must be multiples of ``m``.
        blocksize: columns solved together before the lazy update of the rest.
        percdamp: ``percdamp · mean(diag H)`` is added to ``H``'s diagonal.

    Returns:
        ``(mask, reconstructed)``: a bool mask (``True`` keeps) and the new weight in
        ``weight``'s dtype and device, zero wherever the mask is ``False`` and on inputs that
        never fired (``H_jj = 0``). The work is done in ``float32``; ``weight`` and
        ``hessian`` are not changed.

    Raises:
        MaskError: a bad argument, a non-finite weight or Hessian, or a Hessian that is
            not positive definite even after damping.

    Example:
        >>> import torch
        >>> from fxsparse.masks._sparsegpt import hessian_update, prune
        >>> torch.manual_seed(0) and None
        >>> hessian, _ = hessian_update(None, torch.randn(64, 8), 0)
        >>> mask, weight = prune(torch.randn(4, 8), hessian, pattern=(2, 4))
        >>> mask.sum(dim=1).tolist(), bool((weight[~mask] == 0).all())
        ([4, 4, 4, 4], True)
    """
    _check_arguments(weight, hessian, sparsity, pattern, blocksize, percdamp)
    rows, columns = weight.shape
    device = weight.device
    # Solved transposed, one input per row: the per-column update then writes contiguous memory
    # (about 20 times faster on CPU than updating a column slice of an [out, in] block).
    by_input = torch.empty(columns, rows, dtype=torch.float32, device=device)
    by_input.copy_(weight.detach().T)
    h = hessian.detach().to(device=device, dtype=torch.float32, copy=True)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    by_input[dead] = 0
    diagonal = torch.diagonal(h)  # a view: damping writes through to h
    diagonal += percdamp * diagonal.mean()
    hinv = _upper_cholesky_of_inverse(h)

    keep = torch.ones(rows, columns, dtype=torch.bool, device=device)
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        block = by_input[start:end]  # a view: the block is solved in place
        block_hinv = hinv[start:end, start:end]
        block_diagonal = torch.diagonal(block_hinv)
        errors = torch.empty_like(block)
        block_keep = keep[:, start:end]  # a view: masks chosen here land in keep
        if pattern is None:
            block_keep.copy_(_keep_all_but_lowest(_scores(block.T, block_diagonal), sparsity))
        for column in range(end - start):
            if pattern is not None and column % pattern[1] == 0:
                group = slice(column, column + pattern[1])
                scores = _scores(block[group].T, block_diagonal[group])
                block_keep[:, group] = _keep_highest_per_row(scores, pattern[0])
            pruned = block[column] * block_keep[:, column]
            errors[column] = (block[column] - pruned) / block_diagonal[column]
            block[column] = pruned
            # Spread the pruned weights' error over the inputs not yet solved in this block.
            block[column + 1 :].addr_(block_hinv[column, column + 1 :], errors[column], alpha=-1)
        # The lazy update: the block's accumulated error reaches every later input at once.
        by_input[end:].addmm_(hinv[start:end, end:].T, errors, alpha=-1)
    return keep, by_input.T.to(weight.dtype).contiguous()


def _scores(weights: torch.Tensor, hinv_diagonal: torch.Tensor) -> torch.Tensor:
    """SparseGPT's saliency: the output error of pruning each weight alone, ``w² / [H⁻¹]_jj²``."""
    return weights.square() / hinv_diagonal.square()


def _keep_all_but_lowest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    count = int(scores.numel() * sparsity)
    flat = scores.flatten()
    if count == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    # A selection, not a sort (several times faster on a block of a wide layer); scores tied at
    # the cut prune the earlier weight.
    cut = flat.kthvalue(count).values
    pruned = flat < cut
    tied = torch.nonzero(flat == cut).flatten()
    pruned[tied[: count - int(pruned.sum())]] = True
    return ~pruned.view_as(scores)


def _keep_highest_per_row(scores: torch.Tensor, kept: int) -> torch.Tensor:
    order = torch.argsort(scores, dim=1, stable=True)
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, order[:, : scores.shape[1] - kept], False)
    return keep


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """``U`` upper triangular with ``Uᵀ U = H⁻¹``, or a ``MaskError`` if ``H`` is not positive definite."""
    lower = torch.linalg.cholesky_ex(h)
    if lower.info.item() == 0:
        inverse: torch.Tensor = torch.cholesky_inverse(lower.L)
        upper = torch.linalg.cholesky_ex(inverse, upper=True)
        if upper.info.item() == 0:
            factor: torch.Tensor = upper.L  # named L by torch whichever triangle was asked for
            return factor
    raise MaskError(
        f"the Hessian of this weight's inputs ({h.shape[0]}×{h.shape[0]}) is not positive definite even "
        "after damping: calibrate on more tokens (at least as many as the layer has inputs) or use a "
        "larger percdamp"
    )


def _check_arguments(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: tuple[int, int] | None,
    blocksize: int,
    percdamp: float,
) -> None:
    if (
        not isinstance(weight, torch.Tensor)
        or weight.dim() != 2
        or not weight.is_floating_point()
        or weight.numel() == 0
    ):
        got = (
            f"a {weight.dtype} tensor of shape {tuple(weight.shape)}"
            if isinstance(weight, torch.Tensor)
            else repr(weight)
        )
        raise MaskError(f"SparseGPT prunes a non-empty floating-point [out_features, in_features] weight, got {got}")
    columns = weight.shape[1]
    if not isinstance(hessian, torch.Tensor) or hessian.shape != (columns, columns):
        got = f"shape {tuple(hessian.shape)}" if isinstance(hessian, torch.Tensor) else repr(hessian)
        raise MaskError(
            f"the Hessian of a weight with {columns} inputs must have shape ({columns}, {columns}), got {got}"
        )
    if not hessian.is_floating_point():
        raise MaskError(f"the Hessian must be a floating-point tensor, got {hessian.dtype}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise MaskError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if pattern is not None:
        if (
            not isinstance(pattern, tuple)
            or len(pattern) != 2
            or not all(isinstance(part, int) and not isinstance(part, bool) for part in pattern)
            or not 0 <= pattern[0] < pattern[1]
        ):
            raise MaskError(f"pattern must be (n, m), whole numbers with 0 <= n < m (2:4 is (2, 4)), got {pattern!r}")
        if columns % pattern[1]:
            raise MaskError(
                f"an {pattern[0]}:{pattern[1]} pattern needs in_features to be a multiple of {pattern[1]}, "
                f"got a weight of shape {tuple(weight.shape)}"
            )
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise MaskError(f"blocksize must be a whole number >= 1, got {blocksize!r}")
    if pattern is not None and blocksize % pattern[1]:
        raise MaskError(
            f"an {pattern[0]}:{pattern[1]} pattern needs blocksize to be a multiple of {pattern[1]}, got {blocksize}"
        )
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not 0 <= percdamp < math.inf:
        raise MaskError(f"percdamp must be a finite number >= 0, got {percdamp!r}")
    if not torch.isfinite(weight).all():
        raise MaskError("the weight to prune has NaN or infinite values")
    if not torch.isfinite(hessian).all():
        raise MaskError("the Hessian has NaN or infinite values: a calibration input was NaN or infinite")
