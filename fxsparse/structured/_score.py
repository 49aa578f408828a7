"""``masks.channels``: masks that remove whole units (channels, heads) of dependency groups."""

from __future__ import annotations

import fnmatch
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._capture import copy_model, lookup
from .._errors import MaskError, percent_hint
from .._sparsity import is_transformers_conv1d
from ._groups import Analysis, Group, analyse

__all__ = ["SCOPES", "SCORES", "channels", "unit_masks"]

SCOPES = ("layer", "global")
SCORES = ("l2", "activation")


def channels(
    model: nn.Module,
    sparsity: float,
    *,
    example_inputs: tuple[Any, ...] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    round_to: int = 1,
    scope: str = "layer",
    score: str = "l2",
    exact: bool = True,
) -> dict[str, torch.Tensor]:
    """Bool masks that remove ``sparsity`` of the units of every prunable group (see :func:`fxsparse.groups`).

    A unit (a channel; a head, or a key/value head with its query heads, in attention; a
    whole convolution group) is masked in every parameter its group couples: a producer's
    weight rows and bias entries, a consumer's weight columns, the matching norm weights.
    So ``fxsparse.transform(model, masks)`` already computes what :func:`fxsparse.shrink`
    makes of it, and trains bitwise like ``FakeSparsity`` with these masks.

    Args:
        sparsity: the fraction of units to remove, in ``[0, 1)``; every group keeps at least one.
        example_inputs: positional inputs to capture the model with (only shapes and dtypes
            matter for ``score="l2"``; ``"activation"`` runs the model on them).
        example_kwargs: keyword inputs, the same.
        include: ``fnmatch`` globs over parameter names: a group is pruned when one of its
            parameters matches (default: every group) and none matches ``exclude``.
        exclude: globs over parameter names: a group one of whose parameters matches is left out.
        round_to: the number of units each group keeps is a multiple of it (``8``: widths
            that suit matrix kernels), at least ``round_to``.
        scope: ``"layer"``: each group loses ``sparsity`` of its units; ``"global"``: the
            units with the lowest score across all groups (scores per weight, so groups of
            different widths compare) go, ``sparsity`` of all units.
        score: ``"l2"``: the L2 norm of the unit's coupled weights; ``"activation"``: each
            consumer column's ``|W|`` summed and scaled by the L2 norm of its input over the
            example inputs (Wanda's score, summed over the unit), plus the producer rows' L2 norm;
            inputs are measured for ``nn.Linear`` and transformers ``Conv1D`` consumers (a
            convolution's columns count by their L2 norm).
        exact: leave out groups where removing a unit differs from masking it (a hidden size
            under LayerNorm/RMSNorm, whose statistics count masked channels); ``False`` prunes
            them too, and the shrunk model then differs from the masked one there.

    Raises:
        MaskError: an argument is out of range, or nothing matches ``include``.
        TraceError: the model cannot be captured with the example inputs.

    Example:
        >>> import torch, fxsparse
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> masks = fxsparse.masks.channels(model, 0.5, example_inputs=(torch.randn(1, 4),))
        >>> sorted(masks), masks["0.weight"].all(dim=1).sum().item(), masks["2.weight"].all(dim=0).sum().item()
        (['0.bias', '0.weight', '2.weight'], 4, 4)
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or not 0 <= sparsity < 1:
        raise MaskError(f"sparsity must be a number in [0, 1), got {sparsity!r}" + percent_hint(sparsity))
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise MaskError(f"round_to must be a whole number >= 1, got {round_to!r}")
    if scope not in SCOPES:
        raise MaskError(f"scope must be one of {', '.join(map(repr, SCOPES))}, got {scope!r}")
    if score not in SCORES:
        raise MaskError(f"score must be one of {', '.join(map(repr, SCORES))}, got {score!r}")
    includes, excludes = _globs(include, "include"), _globs(exclude, "exclude")
    analysis = analyse(model, example_inputs, example_kwargs)
    chosen = [
        group
        for group in analysis.groups.prunable
        if (exact is False or group.exact)
        and (includes is None or any(_matches(m.tensor, includes) for m in group.members))
        and not any(_matches(m.tensor, excludes) for m in group.members)
    ]
    if includes is not None and not chosen:
        raise MaskError(f"include {include!r} matches the parameters of no prunable group")
    # By name, not from named_parameters(): under a FakeSparsity parametrization "0.weight" is
    # the masked weight the model computes with (its parameter is "0.parametrizations.weight.original").
    parameters = {m.tensor: _tensor(model, m.tensor) for group in chosen for m in group.members if m.is_parameter}
    norms = _input_norms(model, analysis) if score == "activation" else {}
    scores = [_scores(group, parameters, norms) for group in chosen]
    removed = _removed(chosen, scores, float(sparsity), scope, round_to)
    return unit_masks(chosen, removed, parameters)


def unit_masks(
    chosen: Sequence[Group], removed: Sequence[Sequence[int]], parameters: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The masks that remove units ``removed[i]`` of group ``chosen[i]`` (parameters only, buffers are not masked)."""
    masks: dict[str, torch.Tensor] = {}
    for group, units in zip(chosen, removed, strict=True):
        if not units:
            continue
        for member in group.members:
            if not member.is_parameter:
                continue
            parameter = parameters[member.tensor]
            mask = masks.setdefault(member.tensor, torch.ones(parameter.shape, dtype=torch.bool))
            index = torch.tensor([i for unit in units for i in member.indices[unit]], dtype=torch.long)
            mask.index_fill_(member.dim, index, False)
    return masks


def _scores(group: Group, parameters: Mapping[str, torch.Tensor], norms: dict[str, torch.Tensor]) -> torch.Tensor:
    """One score per unit, and per weight (divided by the square root of the unit's number of weights)."""
    total = torch.zeros(group.units, dtype=torch.float64)
    count = torch.zeros(group.units, dtype=torch.float64)
    for member in group.members:
        if not member.is_parameter:
            continue
        weight = parameters[member.tensor].detach()
        for unit, indices in enumerate(member.indices):
            block = weight.index_select(member.dim, torch.tensor(indices)).double()
            if member.tensor in norms and member.role == "columns":
                activation = norms[member.tensor].double()[list(indices)]
                shape = [1] * weight.dim()
                shape[member.dim] = len(indices)
                total[unit] += (block.abs() * activation.reshape(shape)).sum() ** 2
            else:
                total[unit] += block.pow(2).sum()
            count[unit] += block.numel()
    return total.sqrt() / count.clamp(min=1).sqrt()


def _removed(
    chosen: Sequence[Group], scores: Sequence[torch.Tensor], sparsity: float, scope: str, round_to: int
) -> list[list[int]]:
    def rounded_keep(units: int, keep: int) -> int:
        if round_to > 1:
            keep = max(round_to, round(keep / round_to) * round_to)
        return max(1, min(units, keep))

    if scope == "layer":
        keeps = [rounded_keep(g.units, g.units - math.floor(sparsity * g.units)) for g in chosen]
    else:
        everything = torch.cat(list(scores)) if scores else torch.zeros(0)
        count = math.floor(sparsity * everything.numel())
        threshold = everything.sort().values[count - 1] if count else -math.inf
        keeps = [rounded_keep(g.units, int((s > threshold).sum())) for g, s in zip(chosen, scores, strict=True)]
    removed = []
    for group, score, keep in zip(chosen, scores, keeps, strict=True):
        order = torch.argsort(score, stable=True)  # lowest first; ties go in index order
        removed.append(sorted(order[: group.units - keep].tolist()))
    return removed


def _input_norms(model: nn.Module, analysis: Analysis) -> dict[str, torch.Tensor]:
    """For each ``nn.Linear`` (and transformers ``Conv1D``) weight: the L2 norm of each input feature
    over the example inputs.

    Recorded by hooks on a copy of the model (the model given is left as it was).
    """
    copied = copy_model(model)
    names = {id(t): n for n, t in copied.named_parameters()}
    squares: dict[str, torch.Tensor] = {}

    def record(name: str, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        # A parametrized weight (FakeSparsity) is made anew on each read, so it is named as the
        # groups name it: by its module ("0.weight"); a shared one by its first name.
        name = names.get(id(module.weight), name)
        if inputs and isinstance(inputs[0], torch.Tensor):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            squares[name] = squares.get(name, 0) + x.pow(2).sum(0)

    for module_name, module in copied.named_modules():
        if isinstance(module, nn.Linear) or is_transformers_conv1d(type(module)):  # GPT-2's Conv1D: [in, out]
            weight = f"{module_name}.weight" if module_name else "weight"
            module.register_forward_pre_hook(functools.partial(record, weight))
    with torch.no_grad():
        copied(*analysis.args, **analysis.kwargs)
    return {name: total.sqrt() for name, total in squares.items()}


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    tensor = lookup(model, name)
    if not isinstance(tensor, torch.Tensor):  # groups are found on a copy of this model: its names are these
        raise MaskError(f"channels found parameter {name!r} in the captured graph but not in {type(model).__name__}")
    return tensor.detach()


def _globs(value: str | Sequence[str] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    globs = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(glob, str) for glob in globs):
        raise MaskError(f"{what} takes a glob or a list of globs over parameter names, got {value!r}")
    return globs


def _matches(name: str, globs: list[str] | None) -> bool:
    return bool(globs) and any(fnmatch.fnmatchcase(name, glob) for glob in globs or ())
