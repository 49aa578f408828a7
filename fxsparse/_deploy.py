"""``to_model``: the fine-tuned weights back in the model's own class; and the eval-mode capture ``freeze`` needs.

An output keeps the model's whole module tree and state (see ``_emit.MaskedGraphModule``),
and records the model's class: an instance of that class over a copy of the output's state,
less what fxsparse added (mask buffers, input guards, constants torch.export lifted), is the
model with the weights the output was trained to.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize

from . import _capture, _emit, _rewrite
from ._errors import EmitError
from ._plan import ADDED_ATTRIBUTES, MODEL_CLASS, ROOT_HOOKS_TRACED, build_plan
from ._runtime.guards import InputGuards, check_input_structure
from ._tags import META_KEY, Role, mask_registry, tagged

__all__ = ["MASKS_KEPT_AS", "captured_in_train_mode", "recaptured", "to_model"]

MASKS_KEPT_AS = ("fold", "parametrize")


def to_model(out: torch.fx.GraphModule, *, masks: str = "fold") -> nn.Module:
    """The model ``out`` was made from, as an instance of its own class, with ``out``'s current weights.

    For the end of fine-tuning: the weights ``out`` was trained to go back into the model's
    own class (a Hugging Face ``PreTrainedModel`` stays one, so ``save_pretrained`` and
    ``generate`` work), with every module, buffer and attribute the model had. The result
    is a copy: it shares no parameter, buffer or module with ``out``, and the model given
    to ``transform`` is not involved (it was never changed).

    Args:
        out: ``fxsparse.transform``'s output (``emit="graph"``), trained or not.
        masks: what becomes of the masks:

            * ``"fold"`` (default): each masked weight holds ``mask * weight`` (computed as
              the graph computes it, so outputs equal ``fxsparse.freeze(out)``'s, and the
              eager model's, bit for bit); no mask is left.
            * ``"parametrize"``: each masked weight gets ``torch.ao.pruning``'s
              ``FakeSparsity(mask)`` parametrization, on every name of a tied weight, as
              ``torch.ao.pruning`` sparsifiers leave them (``squash_mask`` folds them later;
              ``fxsparse.transform(model)`` takes them back as masks).

    The result is in the mode ``out`` is in: call ``.eval()`` for inference. Forward hooks
    of the model's root that ``torch.export`` ran into the graph cannot be given back, and
    ``to_model`` refuses such an output.

    Raises:
        EmitError: ``masks`` is not one of the above, or ``out`` does not record its model
            (a ``torch.fx.GraphModule`` given to ``transform``, or an output pickled with a
            model class defined inside a function).

    Example:
        >>> import torch, fxsparse
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> out = fxsparse.transform(model, {"0.weight": torch.eye(2)})
        >>> back = fxsparse.to_model(out)
        >>> type(back).__name__, back[0].weight[0, 1].item() == 0, sorted(back.state_dict())
        ('Sequential', True, ['0.bias', '0.weight'])
    """
    if masks not in MASKS_KEPT_AS:
        raise EmitError(f"masks must be one of {', '.join(repr(m) for m in MASKS_KEPT_AS)}, got {masks!r}")
    model, by_parameter = _model_without_masks(out, "to_model")
    if masks == "fold":
        _fold(model, by_parameter)
    else:
        _parametrize(model, by_parameter)
    return model


def captured_in_train_mode(out: torch.fx.GraphModule) -> bool:
    """Whether ``out``'s graph was captured by torch.export in train mode, which it keeps (its input guards say)."""
    for node, tag in tagged(out.graph, Role.GUARDS):
        guards = out.get_submodule(str(tag.module or node.target))
        if isinstance(guards, InputGuards) and guards.exported_training:
            return True
    return False


def recaptured(
    out: torch.fx.GraphModule,
    args: tuple[Any, ...] | None,
    kwargs: dict[str, Any] | None,
    dynamic_shapes: Any,
    inplace: bool = False,
) -> _emit.MaskedGraphModule:
    """``out`` captured again by torch.export, in eval mode: the same weights and masks, a copy of them.

    What ``transform(model, masks, capture="export")`` makes from the model in eval mode,
    built from ``out``'s own state (one copy of the weights, no second). ``inplace``: over
    ``out``'s own parameters and buffers instead of copies, and ``out`` gives up its masks
    (it is consumed: a call of it then fails, rather than compute with weights that are
    being folded).
    """
    if args is None and kwargs is None:
        raise EmitError(
            "freeze makes an eval-mode model, and this output was captured by torch.export in train mode, which "
            "its graph keeps: freeze captures it again in eval mode, which runs the model. Pass example_inputs "
            "and/or example_kwargs (those you transformed it with; dynamic_shapes too, if you gave any)"
        )
    root, by_parameter = _model_without_masks(out, "freeze", share=inplace)
    root.eval()
    plan = build_plan(root, by_parameter, {}, copy_masks=False)  # copies already, or `out`'s, which it gives up
    exported = _capture.export(root, args or (), kwargs, dynamic_shapes)
    if inplace:  # only now: a capture that failed leaves `out` whole
        for name in mask_registry(out.graph):
            owner, _, buffer = name.rpartition(".")
            del out.get_submodule(owner)._buffers[buffer]
        del by_parameter
    _rewrite.rewrite(root, exported.graph, plan, exported, masks="adopt")  # copies made above, or out's own
    return _emit.graph_module(root, exported.graph, "export")


def _model_without_masks(
    out: torch.fx.GraphModule, caller: str, share: bool = False
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of the model ``out`` holds, without fxsparse's additions; and its masks, by parameter name.

    ``share``: the copy holds ``out``'s own parameters and buffers, and the masks are ``out``'s (not copies).
    """
    if not isinstance(out, torch.fx.GraphModule):
        raise TypeError(f"{caller} takes fxsparse.transform's output (emit='graph'), got {type(out).__name__}")
    state = _emit.model_state(out)
    model_class = state.get(MODEL_CLASS)
    if model_class is None:
        raise EmitError(
            f"{caller} needs the model's own class, and {type(out).__name__} does not record it: it was transformed "
            "from a torch.fx.GraphModule, by an older fxsparse, or pickled with a model class defined inside a "
            "function. Transform the model itself again, with fxsparse.masks.of(out) as its masks"
        )
    if state.get(ROOT_HOOKS_TRACED):
        raise EmitError(
            f"{caller} cannot rebuild {model_class.__name__}: its root module had forward hooks, which torch.export "
            "ran into the graph and which the output no longer holds; transform the model with capture='fx', or "
            "register the hooks on a submodule"
        )
    registry = mask_registry(out.graph)  # mask buffer -> parameter
    masks = {name: out.get_buffer(name) for name in registry}
    model = object.__new__(model_class)
    # Masks are not copied (the memo maps them to nothing): the copy leaves them out, and they go
    # with the parameters below.
    memo: dict[int, Any] = {id(out): model, **{id(mask): None for mask in masks.values()}}
    if share:
        tensors = (*out.named_parameters(remove_duplicate=False), *out.named_buffers(remove_duplicate=False))
        memo.update((id(tensor), tensor) for _, tensor in tensors if id(tensor) not in memo)
    model.__dict__.update(copy.deepcopy(state, memo))
    for key in [key for key in model.__dict__ if key.startswith("_fxsparse_")]:
        del model.__dict__[key]
    meta = model.__dict__.get("meta")
    if isinstance(meta, dict):  # GraphModule's, unless the model had a meta of its own
        meta.pop(META_KEY, None)
        if not meta:
            del model.__dict__["meta"]
    for name in registry:
        owner, _, buffer = name.rpartition(".")
        model.get_submodule(owner)._buffers.pop(buffer, None)
    for dotted in state.get(ADDED_ATTRIBUTES, ()):
        owner_name, _, attribute = dotted.rpartition(".")
        holder = _existing(model, owner_name)
        if holder is not None:
            holder._modules.pop(attribute, None)
            holder.__dict__.pop(attribute, None)
    for key in [key for key, hook in model._forward_pre_hooks.items() if hook is check_input_structure]:
        del model._forward_pre_hooks[key]
        model._forward_pre_hooks_with_kwargs.pop(key, None)
    return model, {parameter: masks[name] if share else masks[name].clone() for name, parameter in registry.items()}


def _existing(model: nn.Module, dotted: str) -> nn.Module | None:
    try:
        return model.get_submodule(dotted)
    except AttributeError:
        return None  # removed since (an output captured again drops the input guards of the first)


def _fold(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    done: set[int] = set()
    with torch.no_grad():
        for name, mask in masks.items():
            parameter = model.get_parameter(name)
            if id(parameter) not in done:  # a tied weight, masked under two names: one product
                done.add(id(parameter))
                parameter.copy_(torch.mul(mask, parameter))  # what the graph's product node computes


def _parametrize(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    from torch.ao.pruning.sparsifier.utils import FakeSparsity

    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    for name, mask in masks.items():
        for alias in names.pop(id(model.get_parameter(name)), ()):  # popped: a tied weight's aliases once
            owner, _, attribute = alias.rpartition(".")
            parametrize.register_parametrization(
                model.get_submodule(owner),
                attribute,
                FakeSparsity(mask),  # type: ignore[no-untyped-call]
            )
