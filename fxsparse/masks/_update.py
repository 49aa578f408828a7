"""Update the masks of a transformed model in place, without tracing again.

A pruning schedule changes masks every few hundred steps; the graph stays the same,
only the values in its mask buffers change. The buffers are the same tensors before and
after (an optimizer, a DDP bucket or a compiled graph that holds them keeps working).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
import torch.export
import torch.fx
from torch import nn

from .._errors import MaskError
from .._fold import refuse_soft_masks
from .._plan import normalize_mask
from .._runtime.folded import zero_pruned
from .._tags import is_folded
from ._importers import mask_buffers, require_module

__all__ = ["update_masks"]


def update_masks(
    model: nn.Module, masks: Mapping[str, torch.Tensor], *, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Write ``masks`` into the mask buffers of ``model``, in place.

    ``model`` is fxsparse's output (``emit="graph"``) or a module with ``FakeSparsity``
    parametrizations (``emit="parametrize"``). Keys are parameter names, any alias of a
    tied parameter, or module names (meaning their ``weight``), as for ``transform``;
    each must name a parameter that is already masked. A mask must have the parameter's
    shape; it is moved to the buffer's device and cast to its dtype, and a ``bool`` buffer
    takes binary masks only. Every mask is checked before any is written: on a
    ``MaskError`` nothing has changed.

    A folded model (``fxsparse.fold``, ``transform(fold=True)``) takes binary masks only, and
    its weights are folded again: an entry the new mask prunes is set to zero, and an entry
    it unprunes starts from zero (the value FakeSparsity would bring back is not kept), as
    dynamic sparse training (RigL) does. An optimizer's state would move a newly pruned
    entry off zero on its next step (momentum, Adam's running mean): pass ``optimizer`` and
    its state tensors of each weight's shape are zeroed there too. Without it, a folded
    model whose masks prune new entries gets a ``UserWarning`` naming them (there is nothing
    to zero where no optimizer has state yet). The masked graph's optimizer state needs no
    such care (its pruned entries are masked on every forward) and is left alone.

    Example:
        >>> import torch, fxsparse
        >>> out = fxsparse.transform(torch.nn.Linear(2, 2), {"weight": torch.ones(2, 2, dtype=torch.bool)})
        >>> fxsparse.update_masks(out, {"weight": torch.eye(2, dtype=torch.bool)})
        >>> fxsparse.viz.masks_of(out)["weight"]
        tensor([[ True, False],
                [False,  True]])
    """
    if not isinstance(masks, Mapping):
        raise MaskError(f"masks must be a mapping from parameter names to tensors, got {type(masks).__name__}")
    if isinstance(model, torch.export.ExportedProgram):
        raise MaskError(
            "an exported program's masks are constants of the program; update the masks of the "
            "emit='graph' output (fxsparse.update_masks) and export it again"
        )
    require_module(model, "update_masks")
    buffers = mask_buffers(model)
    if not buffers:
        raise MaskError(f"{type(model).__name__} has no masks to update: pass fxsparse.transform's output")
    by_parameter = {id(parameter): (name, buffer) for name, (parameter, buffer) in buffers.items()}
    parameters = dict(model.named_parameters(remove_duplicate=False))
    writes: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    # By buffer: the aliases of a tied parameter share one (emit="parametrize" registers
    # FakeSparsity on each alias with the same mask tensor), so one mask serves every use.
    keys: dict[int, tuple[str, object]] = {}
    for key, mask in masks.items():
        name, buffer = _find(key, buffers, by_parameter, parameters)
        if id(buffer) in keys:
            first_name, first_key = keys[id(buffer)]
            tied = "" if first_name == name else f" (tied to {name!r}: one mask serves both)"
            raise MaskError(
                f"mask keys {first_key!r} and {key!r} name the same parameter {first_name!r}{tied}; give one"
            )
        keys[id(buffer)] = (name, key)
        checked = normalize_mask(str(key), mask, name, buffers[name][0])  # transform's own rules
        if (
            buffer.dtype == torch.bool
            and checked.dtype != torch.bool
            and not bool(((checked == 0) | (checked == 1)).all())
        ):
            raise MaskError(
                f"mask for {name!r} has values other than 0 and 1, but this model's mask is bool; "
                "transform again with a floating mask to use soft masks"
            )
        writes.append((name, buffer, checked.to(device=buffer.device, dtype=buffer.dtype)))
    folded = isinstance(model, torch.fx.GraphModule) and is_folded(model.graph)
    if folded:
        refuse_soft_masks((name, mask) for name, _, mask in writes)
        newly_pruned = [name for name, buffer, mask in writes if bool(((buffer != 0) & (mask == 0)).any())]
        if newly_pruned and optimizer is None:
            warnings.warn(
                f"update_masks prunes new entries of the folded weights {', '.join(newly_pruned)}: they are set to "
                "zero, but an optimizer's state there (momentum, Adam's running mean) would move them off zero "
                "on its next step. Pass optimizer= to zero its state there too",
                UserWarning,
                stacklevel=2,
            )
    with torch.no_grad():
        for name, buffer, mask in writes:
            buffer.copy_(mask)
            if folded:
                parameter = buffers[name][0]
                zero_pruned(parameter, mask)
                state = {} if optimizer is None else optimizer.state.get(parameter, {})
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
                        zero_pruned(value, mask)


def _find(
    key: object,
    buffers: dict[str, tuple[nn.Parameter, torch.Tensor]],
    by_parameter: dict[int, tuple[str, torch.Tensor]],
    parameters: dict[str, nn.Parameter],
) -> tuple[str, torch.Tensor]:
    if not isinstance(key, str):
        raise MaskError(f"mask keys must be parameter or module names (str), got {key!r}")
    for candidate in (key, f"{key}.weight" if key else "weight"):
        if candidate in buffers:
            return candidate, buffers[candidate][1]
    for candidate in (key, f"{key}.weight" if key else "weight"):
        parameter = parameters.get(candidate)  # not get_parameter: ScriptModules do not have it
        if parameter is None:
            continue
        if id(parameter) in by_parameter:
            return by_parameter[id(parameter)]
        raise MaskError(
            f"{candidate!r} is not masked in this model, so it has no mask to update; "
            f"masked: {', '.join(sorted(buffers))}. Transform again to add masks"
        )
    raise MaskError(f"mask key {key!r} names no parameter or module; masked: {', '.join(sorted(buffers))}")
