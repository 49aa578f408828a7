"""References that fxsparse is compared against: FakeSparsity and plain eager torch."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.ao.pruning import FakeSparsity
from torch.nn.utils import parametrize

from zoo import parameter_name


def fake_sparsity(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with ``FakeSparsity(mask)`` on each masked parameter, as torch.ao.pruning does it."""
    reference = copy.deepcopy(model)
    for key, mask in masks.items():
        owner, _, attribute = parameter_name(model, key).rpartition(".")
        parametrize.register_parametrization(reference.get_submodule(owner), attribute, FakeSparsity(mask.clone()))
    return reference


def fake_sparsity_on_every_name(
    model: nn.Module, masks: dict[str, torch.Tensor], *, in_place: bool = False
) -> nn.Module:
    """``model`` (a copy, or itself ``in_place``) with FakeSparsity(mask) on every name of each masked
    parameter: on one name only, a tied parameter's other uses would go unmasked. In place where a
    copy would not do: deepcopy shares functions, so a closure over submodules (minGPT's
    Block.mlpf) would still call the unmasked original's."""
    reference = model if in_place else copy.deepcopy(model)
    names = dict(reference.named_parameters(remove_duplicate=False))
    keys = {key: parameter_name(reference, key) for key in masks}  # before any parametrization renames them
    for key, mask in masks.items():
        for alias, parameter in names.items():
            if parameter is names[keys[key]]:
                owner, _, attribute = alias.rpartition(".")
                parametrize.register_parametrization(
                    reference.get_submodule(owner), attribute, FakeSparsity(mask.clone())
                )
    return reference


def eager(model: nn.Module, masks: dict[str, torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """``model(*args)`` with every name of every masked parameter replaced by ``mask * weight``."""
    aliases: dict[int, list[str]] = {}
    slots = set()  # (module, attribute) pairs: a module registered twice must be swapped once
    named = dict(model.named_parameters(remove_duplicate=False))
    for name, parameter in named.items():
        owner, _, attribute = name.rpartition(".")
        slot = (id(model.get_submodule(owner)), attribute)
        if slot not in slots:
            slots.add(slot)
            aliases.setdefault(id(parameter), []).append(name)
    replaced = {}
    for key, mask in masks.items():
        parameter = named[parameter_name(model, key)]
        masked = mask * parameter
        for alias in aliases[id(parameter)]:
            replaced[alias] = masked
    return torch.func.functional_call(model, replaced, args, tie_weights=False)  # type: ignore[no-any-return]


def masked_copy(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose masked parameters hold ``mask * weight`` (the product FakeSparsity
    computes), every alias of a tied parameter the same new one: the plain model TorchScript of
    fxsparse's output is compared against, so TorchScript's own numerics are on both sides."""
    reference = copy.deepcopy(model)
    named = dict(reference.named_parameters(remove_duplicate=False))
    for key, mask in masks.items():
        original = named[parameter_name(model, key)]
        masked = nn.Parameter(mask * original.detach(), requires_grad=original.requires_grad)
        for name, parameter in named.items():
            if parameter is original:
                owner, _, attribute = name.rpartition(".")
                setattr(reference.get_submodule(owner), attribute, masked)
    return reference


def torchscript(model: nn.Module, masks: dict[str, torch.Tensor], emit: str, *args: torch.Tensor) -> nn.Module:
    """``torch.jit.script`` (``emit="script"``) or ``torch.jit.trace`` of :func:`masked_copy`."""
    reference = masked_copy(model, masks)
    if emit == "script":
        return torch.jit.script(reference)  # type: ignore[no-any-return]
    return torch.jit.trace(reference, args)  # type: ignore[no-any-return]
