"""Mask makers: magnitude, N:M, blocks and ``WeightNormSparsifier``'s rule, and :func:`select`.

Pure functions: they read a model's weights and return ``{parameter name: bool mask}``
(``True`` keeps a weight), the mapping :func:`fxsparse.transform` takes. Nothing here
changes the model it is given.

Which weights: :func:`select` picks, by default, the weight of every ``nn.Linear`` and
Hugging Face ``Conv1D``; ``include``/``exclude`` take ``fnmatch`` globs over module names
(``"encoder.*.attn.*"``) and ``filter_fn(module, name)`` any test. A weight tied between
modules is selected once, under its first name.

Ties: where weights of equal magnitude straddle the cut, the one earlier in the weight
(row-major order, layer order for ``scope="global"``) is pruned first, so masks are
deterministic. A NaN weight counts as the largest.
"""

from __future__ import annotations

import fnmatch
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .._errors import MaskError, percent_hint
from .._sparsity import input_axis_of, is_transformers_conv1d
from ._check import check

__all__ = [
    "block",
    "from_zeros",
    "is_linear_like",
    "magnitude",
    "n_m",
    "select",
    "sparsity_levels",
    "weight_norm",
]

Sparsity = float | Mapping[str, float]
FilterFn = Callable[[nn.Module, str], bool]


def select(
    model: nn.Module,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    filter_fn: FilterFn | None = None,
) -> list[str]:
    """The weights to mask, as parameter names (``"blocks.0.fc.weight"``), in module order.

    Without ``include`` or ``filter_fn``: the weight of every ``nn.Linear`` and Hugging Face
    ``Conv1D``. ``include`` (globs over module names) and ``filter_fn(module, name)`` pick
    any module that has a ``weight`` parameter instead; given both, a module must pass both.
    ``exclude`` globs remove modules from the result.

    Example:
        >>> import torch, fxsparse
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Conv1d(4, 4, 1))
        >>> fxsparse.masks.select(model), fxsparse.masks.select(model, include="*")
        (['0.weight'], ['0.weight', '2.weight'])
    """
    includes, excludes = _globs(include, "include"), _globs(exclude, "exclude")
    if isinstance(model, torch.jit.ScriptModule):
        raise MaskError("make masks from the model before scripting it (a ScriptModule's weights are not selectable)")
    seen: set[int] = set()
    names = []
    for name, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList) or ".parametrizations." in f".{name}.":
            continue
        weight = _stored_weight(module)
        if weight is None or id(weight) in seen:
            continue
        if includes is None and filter_fn is None:
            chosen = is_linear_like(module)
        else:
            chosen = (includes is None or any(fnmatch.fnmatchcase(name, glob) for glob in includes)) and (
                filter_fn is None or bool(filter_fn(module, name))
            )
        if chosen and not (excludes and any(fnmatch.fnmatchcase(name, glob) for glob in excludes)):
            seen.add(id(weight))
            names.append(f"{name}.weight" if name else "weight")
    if not names and (includes is not None or filter_fn is not None):
        # A glob with a typo, or a filter_fn written as (name, module), would otherwise give no
        # masks at all, and the "pruned" model would be the dense one.
        _refuse_empty_selection(model, include, filter_fn)
    return names


def _refuse_empty_selection(model: nn.Module, include: str | Sequence[str] | None, filter_fn: FilterFn | None) -> None:
    candidates = [repr(name) for name, module in model.named_modules() if _stored_weight(module) is not None]
    shown = ", ".join(candidates[:4]) + (", ..." if len(candidates) > 4 else "")
    asked = " and ".join(
        ([f"include={include!r}"] if include is not None else []) + (["filter_fn"] if filter_fn is not None else [])
    )
    how = ["include globs match module names like these"] if include is not None else []
    if filter_fn is not None:
        how.append("filter_fn is called as filter_fn(module, name) and returns True for the modules to mask")
    raise MaskError(
        f"no weight selected: {asked} picks none of the modules with a weight "
        + (f"({shown}); {'; '.join(how)}" if candidates else "(the model has none)")
    )


def from_zeros(
    model: nn.Module,
    *,
    pattern: str | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    filter_fn: FilterFn | None = None,
) -> dict[str, torch.Tensor]:
    """The masks of a model pruned into its weights: ``weight != 0`` for each selected weight.

    For a checkpoint that is dense weights with zeros and no mask (what llm-compressor and
    compressed-tensors write since they dropped sparse storage). ``-0.0`` is zero (pruned);
    ``NaN`` is not (kept). A weight that was kept but is exactly zero cannot be told from a
    pruned one, so it is pruned too: the masked model computes the same, and fine-tuning
    keeps it at zero. ``pattern`` (``"2:4"``, ``"block 4x4"``, as :func:`fxsparse.check`
    reads them) checks every mask follows it, read along the weight's input dimension (an
    N:M group may hold more than M - N zeros), and raises a ``MaskError`` naming every
    weight that does not.

    Example:
        >>> import torch, fxsparse
        >>> model = torch.nn.Linear(4, 2)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[0.5, 0.0, -0.0, 2.0], [0.0, 1.0, 3.0, 0.0]]))
        >>> fxsparse.masks.from_zeros(model, pattern="2:4")["weight"].int()
        tensor([[1, 0, 0, 1],
                [0, 1, 1, 0]], dtype=torch.int32)
    """
    selected = select(model, include=include, exclude=exclude, filter_fn=filter_fn)
    masks = {name: _weight(model, name) != 0 for name in selected}
    if pattern is not None:
        problems = check(model, masks, pattern=pattern).problems
        if problems:
            raise MaskError(f"the zeros of {len(problems)} weight(s) do not follow {pattern}: " + "; ".join(problems))
    return masks


def magnitude(
    model: nn.Module,
    sparsity: Sparsity,
    *,
    scope: str = "layer",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    filter_fn: FilterFn | None = None,
) -> dict[str, torch.Tensor]:
    """Unstructured masks that prune the smallest-magnitude weights.

    ``sparsity`` is the fraction to prune: one number for every selected weight, or a
    mapping from module-name globs to numbers (the first glob that matches a module
    decides; modules no glob matches are left out). Each weight of ``n`` elements at
    sparsity ``s`` loses exactly ``floor(s * n)`` of them: never more than asked.
    ``scope="global"`` ranks all selected weights together instead (one ``sparsity``
    number) and prunes ``floor(s * total)``; it holds every selected magnitude in memory.

    Example:
        >>> import torch, fxsparse
        >>> model = torch.nn.Linear(4, 2)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, -5, 3, 0.5], [2, 2, -7, 4]]))
        >>> fxsparse.masks.magnitude(model, 0.5, include="*")["weight"].int()
        tensor([[0, 1, 1, 0],
                [0, 0, 1, 1]], dtype=torch.int32)
    """
    if scope not in ("layer", "global"):
        raise MaskError(f"scope must be 'layer' or 'global', got {scope!r}")
    levels = sparsity_levels(model, sparsity, include, exclude, filter_fn)
    if scope == "layer":
        return {name: _prune_smallest(_scores(model, name), level) for name, level in levels.items()}
    if isinstance(sparsity, Mapping):
        raise MaskError("scope='global' takes one sparsity for all selected weights, got a mapping")
    if not levels:
        return {}
    scores = [_scores(model, name) for name in levels]
    dtype = functools.reduce(torch.promote_types, (score.dtype for score in scores))
    flat = _prune_smallest(torch.cat([score.flatten().to(dtype) for score in scores]), float(sparsity))
    masks, start = {}, 0
    for name, score in zip(levels, scores, strict=True):
        masks[name] = flat[start : start + score.numel()].view(score.shape)
        start += score.numel()
    return masks


def n_m(
    model: nn.Module,
    n: int = 2,
    m: int = 4,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    filter_fn: FilterFn | None = None,
) -> dict[str, torch.Tensor]:
    """N:M masks: keep the ``n`` largest-magnitude of every ``m`` consecutive weights along the
    input dimension (2:4 by default, the pattern NVIDIA's sparse tensor cores run).

    The input dimension is dimension 1 of a ``Linear`` or convolution weight (groups run
    along the input channels at each kernel position) and dimension 0 of a Hugging Face
    ``Conv1D``. It must be a multiple of ``m``: a ``MaskError`` names a weight that is not.

    Example:
        >>> import torch, fxsparse
        >>> model = torch.nn.Linear(8, 1)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, -5, 3, 0.5, 2, 2, -7, 4]]))
        >>> fxsparse.masks.n_m(model, include="*")["weight"].int()
        tensor([[0, 1, 1, 0, 0, 0, 1, 1]], dtype=torch.int32)
    """
    if not (isinstance(n, int) and isinstance(m, int) and 0 <= n <= m and m > 0):
        raise MaskError(f"n:m must be whole numbers with 0 <= n <= m and m > 0, got {n}:{m}")
    masks = {}
    for name in select(model, include=include, exclude=exclude, filter_fn=filter_fn):
        scores = _scores(model, name)
        if scores.dim() < 2:
            raise MaskError(f"{name}: N:M masks need a weight of 2 or more dimensions, got shape {tuple(scores.shape)}")
        axis = input_axis_of([type(model.get_submodule(name.rpartition(".")[0]))])
        moved = scores.movedim(axis, -1)
        if moved.shape[-1] % m:
            raise MaskError(
                f"{name}: its input dimension ({moved.shape[-1]}, dimension {axis} of {tuple(scores.shape)}) "
                f"is not a multiple of m={m}; leave it out (exclude=) or pick another m"
            )
        groups = moved.reshape(-1, m)
        # Largest first; stable, so that of equal weights the earlier one is kept.
        order = torch.sort(groups, dim=1, descending=True, stable=True).indices
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order[:, :n], True)
        masks[name] = keep.reshape(moved.shape).movedim(-1, axis).contiguous()
    return masks


def weight_norm(
    model: nn.Module,
    sparsity_level: Sparsity = 0.5,
    sparse_block_shape: tuple[int, int] = (1, 4),
    zeros_per_block: int | None = None,
    norm: int = 2,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    filter_fn: FilterFn | None = None,
) -> dict[str, torch.Tensor]:
    """The masks ``torch.ao.pruning.WeightNormSparsifier`` computes, for the same configuration.

    Blocks of ``sparse_block_shape`` (rows, columns of the weight, from index 0; blocks at
    the edges are cut short) are ranked by the mean of ``|w|**norm`` (``norm`` 1 or 2);
    the ``round(sparsity_level * blocks)`` lowest (at most all but one) lose their
    ``zeros_per_block`` smallest weights (default: the whole block). ``sparsity_level``
    takes any number the sparsifier takes: at or below 0 nothing is pruned, at or above 1
    every block. Equal to the
    sparsifier's masks (its first step) bit for bit wherever the sparsifier runs; for 2-D
    weights only, as the sparsifier. (Where blocks are cut by the edges and
    ``zeros_per_block`` is less than a block, the sparsifier itself fails; this crops.)

    Example:
        >>> import torch, fxsparse
        >>> model = torch.nn.Linear(8, 2)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.arange(16.0).reshape(2, 8))
        >>> fxsparse.masks.weight_norm(model, 0.5, (1, 4), include="*")["weight"].int()
        tensor([[0, 0, 0, 0, 0, 0, 0, 0],
                [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.int32)
    """
    block_h, block_w = _block_shape(sparse_block_shape)
    per_block = block_h * block_w
    zeros = per_block if zeros_per_block is None else zeros_per_block
    if not 0 <= zeros <= per_block:
        raise MaskError(
            f"zeros_per_block must be between 0 and {per_block} for blocks {sparse_block_shape}, got {zeros}"
        )
    if norm not in (1, 2):
        raise MaskError(f"norm must be 1 or 2, got {norm}")
    masks = {}
    for name, level in sparsity_levels(model, sparsity_level, include, exclude, filter_fn, _sparsifier_level).items():
        weight = _weight(model, name)
        if weight.dim() != 2:
            raise MaskError(f"{name}: WeightNormSparsifier's rule is for 2-D weights, got shape {tuple(weight.shape)}")
        if weight.numel() == 0:
            masks[name] = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
            continue
        masks[name] = _weight_norm_mask(weight, level, (block_h, block_w), zeros, norm)
    return masks


def block(
    model: nn.Module,
    sparsity: Sparsity,
    block_shape: tuple[int, int] = (4, 4),
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    filter_fn: FilterFn | None = None,
) -> dict[str, torch.Tensor]:
    """Block masks: prune whole ``block_shape`` blocks, those of smallest mean square, until
    ``round(sparsity * blocks)`` are gone (``WeightNormSparsifier``'s rule with whole blocks
    zeroed; blocks at the edges are cut short). A weight of more than two dimensions
    (a convolution's) is blocked as the matrix ``[out, in * kernel]``."""
    block_shape = _block_shape(block_shape)
    masks = {}
    for name, level in sparsity_levels(model, sparsity, include, exclude, filter_fn).items():
        weight = _weight(model, name)
        if weight.numel() == 0:
            masks[name] = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
            continue
        matrix = weight.reshape(weight.shape[0], -1) if weight.dim() > 1 else weight.reshape(1, -1)
        whole = block_shape[0] * block_shape[1]
        masks[name] = _weight_norm_mask(matrix, level, block_shape, whole, 2).reshape(weight.shape)
    return masks


def _block_shape(shape: Any) -> tuple[int, int]:
    if not (
        isinstance(shape, (tuple, list))
        and len(shape) == 2
        and all(isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in shape)
    ):
        raise MaskError(f"a block shape is two whole numbers above 0 (rows, columns), got {shape!r}")
    return int(shape[0]), int(shape[1])


def _stored_weight(module: nn.Module) -> torch.Tensor | None:
    """The tensor a module's ``weight`` is stored as: the parameter, or a parametrization's original."""
    if parametrize.is_parametrized(module, "weight"):
        original = module.parametrizations.weight.original  # type: ignore[union-attr]
        return original if isinstance(original, torch.Tensor) else None
    weight = module._parameters.get("weight")
    return weight if isinstance(weight, nn.Parameter) else None


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight ``name`` as the model computes with it (through any parametrization), checked."""
    owner, _, tensor_name = name.rpartition(".")
    value = getattr(model.get_submodule(owner), tensor_name)
    if isinstance(value, nn.parameter.UninitializedParameter):
        raise MaskError(f"{name}: the weight is not initialised yet (a lazy module): run a forward pass first")
    if not isinstance(value, torch.Tensor):
        raise MaskError(f"{name} is not a tensor of the model, but a {type(value).__name__}")
    weight = value.detach()
    if hasattr(weight, "full_tensor"):  # a DTensor (FSDP2's fully_shard): every rank gathers the whole weight
        weight = weight.full_tensor()
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise MaskError(f"{name}: the weight is not initialised yet (a lazy module): run a forward pass first")
    if weight.is_meta:
        raise MaskError(f"{name}: the weight is on the meta device: it has no values to rank")
    return weight


def _globs(value: str | Sequence[str] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, (str, Sequence)):
        raise MaskError(f"{what} takes module-name globs (str, or a list of them), got {value!r}")
    globs = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(glob, str) for glob in globs):
        raise MaskError(f"{what} takes module-name globs (str), got {value!r}")
    return globs


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear``, or Hugging Face's ``Conv1D`` (GPT-2's projections, ``[in, out]``)."""
    return isinstance(module, nn.Linear) or is_transformers_conv1d(type(module))


def sparsity_levels(
    model: nn.Module,
    sparsity: Sparsity,
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    filter_fn: FilterFn | None,
    level_of: Callable[[Any, str], float] | None = None,
) -> dict[str, float]:
    """Each selected weight's sparsity level (a mapping picks by the first matching glob), read
    by ``level_of`` (default: a fraction between 0 and 1)."""
    read_level = _fraction if level_of is None else level_of
    names = select(model, include=include, exclude=exclude, filter_fn=filter_fn)
    if not isinstance(sparsity, Mapping):
        return {name: read_level(sparsity, name) for name in names}
    levels = {}
    for name in names:
        module = name.rpartition(".")[0]
        glob = next((g for g in sparsity if fnmatch.fnmatchcase(module, g) or fnmatch.fnmatchcase(name, g)), None)
        if glob is not None:
            levels[name] = read_level(sparsity[glob], name)
    return levels


def _fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise MaskError(f"sparsity for {name!r} must be a number between 0 and 1, got {value!r}" + percent_hint(value))
    return float(value)


def _sparsifier_level(value: Any, name: str) -> float:
    """A level as ``WeightNormSparsifier`` takes it: any number, at or below 0 pruning nothing
    and at or above 1 everything (it never clamps; its ``<= 0`` and ``>= 1`` tests do). NaN
    it cannot rank by (``round`` raises), so neither can this."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise MaskError(f"sparsity_level for {name!r} must be a number (not NaN), got {value!r}")
    return float(value)


def _scores(model: nn.Module, name: str) -> torch.Tensor:
    """``|w|`` with NaN as the largest, so a NaN weight is never pruned for being small."""
    weight = _weight(model, name)
    if not (weight.is_floating_point() or weight.is_complex()):
        raise MaskError(f"{name}: magnitude masks need a floating-point weight, got {weight.dtype}")
    return weight.abs().nan_to_num_(nan=math.inf)


def _prune_smallest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``False`` at the ``floor(sparsity * n)`` smallest scores (earlier first among equals)."""
    flat = scores.flatten()
    count = math.floor(sparsity * flat.numel() + 1e-9)  # 0.3 * 10 is 2.9999999999999996
    if count >= flat.numel() or count <= 0:
        return torch.full(scores.shape, count <= 0, dtype=torch.bool, device=flat.device)
    cut = _kth_smallest(flat, count)
    keep = flat > cut
    ties = (flat == cut).nonzero().flatten()
    below = flat.numel() - int(keep.sum()) - ties.numel()
    keep[ties[count - below :]] = True  # of the equal ones, the earliest are pruned
    return keep.view(scores.shape)


_SAMPLE = 1 << 20  # values sampled to bracket a quantile
_BRACKET = 0.005  # ranks either side of the estimate: 10 standard errors at that sample size


def _kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest value (1-based) of ``flat``, exactly.

    ``kthvalue`` over 45 million weights takes a second. A sample brackets the answer
    between two values instead; one pass counts what lies below the bracket and keeps
    what lies in it (about 1 %), and ``kthvalue`` runs on that. If the bracket missed
    (the sample is fixed, the odds tiny) the full ``kthvalue`` runs.
    """
    n = flat.numel()
    if n <= 4 * _SAMPLE:
        return flat.kthvalue(k).values
    generator = torch.Generator(device=flat.device).manual_seed(n)
    sample = flat[torch.randint(n, (_SAMPLE,), generator=generator, device=flat.device)]
    quantile = k / n
    low_rank, high_rank = math.floor((quantile - _BRACKET) * _SAMPLE), math.ceil((quantile + _BRACKET) * _SAMPLE)
    low = sample.kthvalue(low_rank).values if low_rank >= 1 else flat.new_tensor(-math.inf)
    high = sample.kthvalue(high_rank).values if high_rank <= _SAMPLE else flat.new_tensor(math.inf)
    below = int((flat < low).sum())
    band = flat[(flat >= low) & (flat <= high)]
    if below < k <= below + band.numel():
        return band.kthvalue(k - below).values
    return flat.kthvalue(k).values


def _weight_norm_mask(
    weight: torch.Tensor, level: float, shape: tuple[int, int], zeros: int, norm: int
) -> torch.Tensor:
    """``WeightNormSparsifier.update_mask``'s arithmetic, for one 2-D weight (``True`` keeps)."""
    per_block = shape[0] * shape[1]
    if level <= 0 or zeros == 0:
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    if level >= 1.0 and zeros == per_block:
        return torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    data = weight.abs() if norm == 1 else weight * weight
    kept = _tensor_mask(data, level, shape)
    if zeros != per_block:
        kept = torch.logical_or(kept, _block_mask(data, shape, zeros))
    return kept.to(torch.bool)


def _tensor_mask(data: torch.Tensor, level: float, shape: tuple[int, int]) -> torch.Tensor:
    h, w = data.shape
    dh, dw = (shape[0] - h % shape[0]) % shape[0], (shape[1] - w % shape[1]) % shape[1]
    mask = torch.ones(h + dh, w + dw, device=data.device)
    if level >= 1.0:
        return torch.zeros_like(mask)[:h, :w]
    per_block = shape[0] * shape[1]
    if per_block > 1:
        data = F.avg_pool2d(data[None, None, :], kernel_size=shape, stride=shape, ceil_mode=True)
    data = data.flatten()
    blocks = len(data)
    data = data.repeat(1, per_block, 1)
    threshold = max(0, min(blocks - 1, round(level * blocks)))
    _, lowest = torch.topk(data, k=threshold, dim=2, largest=False)
    reshaped = mask.reshape(data.shape)
    reshaped.scatter_(dim=2, index=lowest, value=0)
    folded = F.fold(reshaped, output_size=(h + dh, w + dw), kernel_size=shape, stride=shape)
    return folded.squeeze().reshape(mask.shape)[:h, :w].contiguous()


def _block_mask(data: torch.Tensor, shape: tuple[int, int], zeros: int) -> torch.Tensor:
    h, w = data.shape
    dh, dw = (shape[0] - h % shape[0]) % shape[0], (shape[1] - w % shape[1]) % shape[1]
    mask = torch.ones((h + dh, w + dw), device=data.device)
    padded = torch.full((h + dh, w + dw), torch.nan, dtype=data.dtype, device=data.device)
    padded[:h, :w] = data
    unfolded = F.unfold(padded[None, None, :], kernel_size=shape, stride=shape)
    reshaped = mask.reshape(unfolded.shape)
    _, lowest = torch.topk(unfolded, k=zeros, dim=1, largest=False)
    reshaped.scatter_(dim=1, index=lowest, value=0)
    folded = F.fold(reshaped, output_size=padded.shape, kernel_size=shape, stride=shape)
    return folded.squeeze().reshape(mask.shape)[:h, :w].contiguous()
