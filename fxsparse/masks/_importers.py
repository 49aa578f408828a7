"""Masks in and out of models: ``torch.ao.pruning`` sparsifiers, ``FakeSparsity``-parametrized
models, ``torch.nn.utils.prune``, and the mask buffers of fxsparse's own outputs.

Nothing here changes the model it is given: masks come back as copies.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.export
import torch.fx
from torch import nn

from .._errors import MaskError
from .._tags import Role, mask_registry, recorded_masks, tag_of

__all__ = [
    "from_parametrized",
    "from_prune",
    "from_sparsifier",
    "mask_buffers",
    "of",
    "require_module",
    "to_sparsifier",
]


def of(out: nn.Module | torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """The masks ``out`` applies, by parameter name: the mask tensors themselves, not copies
    (a language model's masks are gigabytes; ``clone()`` one before changing it, or change
    them in place with :func:`fxsparse.update_masks`).

    ``out`` is fxsparse's output in any form a mask stays a tensor in: ``emit="graph"`` and
    ``"export"`` (its tagged ``mask * weight`` nodes, saved and loaded again too),
    ``"script"`` and ``"trace"`` (the record of its masks), ``"parametrize"``, or any module
    with ``FakeSparsity`` parametrizations (``torch.ao.pruning``'s own). A buffer is a mask
    because fxsparse recorded it as one, never by its name. A module that applies none gives
    ``{}``; anything else (an ONNX program, whose masks are constants inside it) a ``MaskError``.

    Example:
        >>> import torch, fxsparse
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> out = fxsparse.transform(model, {"0.weight": torch.eye(4, dtype=torch.bool)})
        >>> fxsparse.masks.of(out)["0.weight"].sum().item()
        4
    """
    if isinstance(out, torch.export.ExportedProgram):
        found = {}
        for mask, param in mask_registry(out.graph).items():
            tensor = out.state_dict.get(mask, out.constants.get(mask))
            if not isinstance(tensor, torch.Tensor):
                raise MaskError(
                    f"the exported program masks {param!r} with {mask!r}, which is neither in its state_dict "
                    "nor in its constants: it was edited after fxsparse made it"
                )
            found[param] = tensor
        return found
    if not isinstance(out, nn.Module):
        raise MaskError(
            "masks.of takes fxsparse's output (emit='graph', 'parametrize', 'script', 'trace' or 'export') or a "
            f"module with FakeSparsity parametrizations, got {type(out).__name__}: the masks of an ONNX program "
            "are constants inside it. Read them from the emit='graph' output (or the model) instead"
        )
    return {name: buffer for name, (_, buffer) in mask_buffers(out).items()}


def from_sparsifier(sparsifier: Any) -> dict[str, torch.Tensor]:
    """The masks of a prepared ``torch.ao.pruning`` sparsifier (one per group), by parameter name.

    A structured pruner's (``BaseStructuredSparsifier``: ``SaliencyPruner`` and others) masks
    are rows, one flag per output: each is expanded to its weight's shape, as
    ``FakeStructuredSparsity`` applies it, and where the pruner also zeroes the bias of
    pruned rows (``prune_bias``, its default) the bias gets that row mask too, under
    ``<module>.bias``. The keys name the parameters of the model as it was before
    ``prepare`` (a pruner moves each bias to ``_bias``): transform that model, or a copy of it.
    A data sparsifier (``DataNormSparsifier``), whose data are named by its user and not
    tied to a model's parameters, is refused: key its ``get_mask(name)`` by parameter yourself.
    """
    if hasattr(sparsifier, "data_groups") and hasattr(sparsifier, "get_mask"):
        names = ", ".join(repr(name) for name in sparsifier.data_groups) or "none yet"
        raise MaskError(
            f"from_sparsifier reads a sparsifier prepared on a model; {type(sparsifier).__name__} is a data "
            f"sparsifier, whose data ({names}) are named by you, not by the model's parameters: key each mask by "
            "the parameter it masks yourself, {'fc.weight': sparsifier.get_mask('your name')}"
        )
    groups = getattr(sparsifier, "groups", None)
    if not groups:
        raise MaskError(
            f"from_sparsifier takes a torch.ao.pruning sparsifier prepared on a model (sparsifier.prepare(model, "
            f"config)); this {type(sparsifier).__name__} has no groups"
        )
    masks, seen = {}, set()
    for group in groups:
        module, tensor_name = group["module"], group.get("tensor_name", "weight")
        fqn = group.get("module_fqn") or ""
        chain = getattr(getattr(module, "parametrizations", None), tensor_name, None)
        if chain is None:
            raise MaskError(f"sparsifier group {fqn!r} has no parametrization on {tensor_name!r}: was it prepared?")
        if id(chain.original) in seen:  # a tied parameter: one mask, under its first name
            continue
        seen.add(id(chain.original))
        name = f"{fqn}.{tensor_name}" if fqn else tensor_name
        mask, shape = chain[0].mask.detach(), tuple(chain.original.shape)
        if tuple(mask.shape) == shape:
            masks[name] = mask.clone()
            continue
        if not (_is_structured_sparsity(type(chain[0])) and mask.dim() == 1 and mask.shape[0] == shape[0]):
            raise MaskError(
                f"sparsifier group {fqn!r}: its {type(chain[0]).__name__} holds a mask of shape {tuple(mask.shape)} "
                f"for {name!r} of shape {shape}, and fxsparse knows no rule to apply it elementwise"
            )
        rows = mask.reshape(-1, *[1] * (len(shape) - 1))
        masks[name] = rows.expand(shape).clone()
        bias = module._parameters.get("_bias")  # where prepare moved the bias; its hook zeroes pruned rows
        if tensor_name == "weight" and bias is not None and getattr(module, "prune_bias", False):
            masks[f"{fqn}.bias" if fqn else "bias"] = mask.clone()
    return masks


def _is_structured_sparsity(kind: type) -> bool:
    """Whether ``kind`` is torch's ``FakeStructuredSparsity`` (or derives from it): a row mask,
    ``mask.reshape(-1, 1, ...) * weight``. Known by its package, without importing torch's
    private pruner module."""
    return any(
        base.__name__ == "FakeStructuredSparsity" and base.__module__.startswith("torch.ao.pruning.")
        for base in kind.__mro__
    )


def require_module(model: object, function: str) -> None:
    """Refuse, naming ``function``, what is not a module (an ONNX program): its masks are no buffers to use."""
    if not isinstance(model, nn.Module):
        raise MaskError(
            f"{function} takes fxsparse's output as a torch.nn.Module (emit='graph' or 'parametrize'), got "
            f"{type(model).__name__}: the masks of an ONNX, exported or compiled form are constants inside it. "
            "Work on the emit='graph' output (or the model), then emit that form again"
        )


def from_parametrized(model: nn.Module) -> dict[str, torch.Tensor]:
    """The masks of every ``FakeSparsity``-like parametrization (one with a ``mask``) in ``model``
    (or of fxsparse's output), copied."""
    require_module(model, "from_parametrized")
    masks, seen = {}, set()
    for name, (parameter, buffer) in mask_buffers(model).items():
        if id(parameter) not in seen:  # a tied parameter: one mask, under its first name
            seen.add(id(parameter))
            masks[name] = buffer.detach().clone()
    return masks


def from_prune(model: nn.Module) -> dict[str, torch.Tensor]:
    """The masks of a model pruned with ``torch.nn.utils.prune`` (``<name>_orig`` with ``<name>_mask``)."""
    masks = {}
    for prefix, module in model.named_modules():
        for buffer_name, buffer in module._buffers.items():
            if buffer is None or not buffer_name.endswith("_mask"):
                continue
            name = buffer_name.removesuffix("_mask")
            if f"{name}_orig" in module._parameters:
                masks[f"{prefix}.{name}" if prefix else name] = buffer.detach().clone()
    return masks


def to_sparsifier(model: nn.Module, masks: Mapping[str, torch.Tensor], sparsifier: Any = None) -> Any:
    """A ``torch.ao.pruning`` sparsifier prepared on a copy of ``model`` and holding ``masks``,
    to go on with (``sparsifier.step()``, ``sparsifier.squash_mask()``); the copy is
    ``sparsifier.model``. ``sparsifier`` defaults to a ``WeightNormSparsifier()``."""
    from torch.ao.pruning.sparsifier.weight_norm_sparsifier import WeightNormSparsifier

    sparsifier = WeightNormSparsifier() if sparsifier is None else sparsifier
    copied = copy.deepcopy(model)
    aliases: dict[int, list[str]] = {}
    for alias, parameter in copied.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(alias)
    parameters = dict(copied.named_parameters(remove_duplicate=False))
    source_of: dict[str, str] = {}  # every alias of a masked parameter -> its key in masks
    for name in masks:
        if name not in parameters:
            raise MaskError(f"mask key {name!r} names no parameter of the model (give parameter names)")
        for alias in aliases[id(parameters[name])]:  # a tied weight is masked at every use
            source_of[alias] = name
    sparsifier.prepare(copied, [{"tensor_fqn": alias} for alias in source_of])
    for group in sparsifier.groups:
        fqn = f"{group['module_fqn']}.{group['tensor_name']}" if group["module_fqn"] else group["tensor_name"]
        target = getattr(group["module"].parametrizations, group["tensor_name"])[0].mask
        source = masks[source_of[fqn]]
        if tuple(source.shape) != tuple(target.shape):
            raise MaskError(f"mask for {fqn!r} has shape {tuple(source.shape)}, expected {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(source.to(device=target.device, dtype=target.dtype))
    return sparsifier


def mask_buffers(model: nn.Module) -> dict[str, tuple[nn.Parameter, torch.Tensor]]:
    """Masked parameter name -> (the parameter, its mask buffer), of fxsparse's output (its tagged
    mask nodes; for TorchScript outputs, which cannot carry tags, the record of its masks) or
    of a module with ``FakeSparsity``-like parametrizations (a ``mask``). A buffer is never
    taken for a mask by its name: a model's own ``gate_mask`` beside ``gate`` stays its own."""
    found: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
    if isinstance(model, torch.fx.GraphModule):
        for node in model.graph.find_nodes(op="get_attr"):
            tag = tag_of(node)
            if tag is not None and tag.role is Role.MASK:
                found[tag["param"]] = (model.get_parameter(tag["param"]), model.get_buffer(tag["mask"]))
    for prefix, module in model.named_modules():
        for tensor_name, chain in getattr(module, "parametrizations", {}).items():
            for parametrization in chain:
                mask = getattr(parametrization, "mask", None)
                if isinstance(mask, torch.Tensor):
                    name = f"{prefix}.{tensor_name}" if prefix else tensor_name
                    found[name] = (chain.original, mask)
    recorded = recorded_masks(model)
    if recorded:
        parameters = dict(model.named_parameters(remove_duplicate=False))
        buffers = dict(model.named_buffers(remove_duplicate=False))
        for mask, param in recorded.items():
            found[param] = (parameters[param], buffers[mask])
    return found
