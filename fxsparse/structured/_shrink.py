"""``shrink``: remove the units a structured mask zeroes, giving a smaller model in the model's own class."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
from torch import nn

from .._capture import copy_model, lookup
from .._compat import tree_leaves
from .._deploy import to_model
from .._emit import captured_by
from .._errors import MaskError
from .._tags import mask_registry
from ._groups import Group, analyse

__all__ = ["shrink"]

# transformers config fields that hold an MLP's width, by model family.
_INTERMEDIATE_FIELDS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff")


def shrink(
    out: torch.fx.GraphModule,
    *,
    example_inputs: tuple[Any, ...] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    exact: bool = True,
) -> nn.Module:
    """The model ``out`` masks, with every unit its masks zero entirely removed: smaller, and dense.

    ``out`` is :func:`fxsparse.transform`'s output (``emit="graph"``) with masks from
    :func:`fxsparse.masks.channels` (or any masks: a unit of a group (see
    :func:`fxsparse.groups`) goes only when every parameter its group couples is masked
    there entirely; partly masked units stay, their weights holding ``mask * weight``).

    The result is an instance of the model's own class. Its outputs equal the masked
    model's: bit for bit where the removed positions are a layer's outputs (weight rows,
    whose dot products do not change), within float round-off where they are a layer's
    inputs (a sum over fewer zeros may round differently). ``shrink`` checks this on the
    example inputs and refuses a model whose code does not follow its new sizes (a size
    written into ``forward``). A Hugging Face model gets an updated ``config``
    (``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``,
    ``hidden_size`` where changed), so ``save_pretrained`` and ``from_pretrained`` in its
    own class work; every layer must then keep the same width (the config holds one).

    Args:
        example_inputs: positional inputs to find the groups and check the result on; optional
            for an output captured with ``torch.export`` (inputs of its shapes are made: random
            floats, integers of ones, or zeros where ones do not run).
        example_kwargs: keyword inputs, the same.
        exact: leave units of groups where removing differs from masking (a hidden size
            under LayerNorm/RMSNorm) masked but in place; ``False`` removes them too (then the
            outputs differ from the masked model's, and only their shapes are checked; the
            exact removals are checked by value on their own first).

    Raises:
        MaskError: ``out`` is not an output of ``transform``, a group would lose every unit,
            the model's code or config cannot follow the new sizes, no example inputs for an
            output captured with ``torch.fx``.

    Warns:
        UserWarning: the masks zero no whole unit (unstructured masks): nothing is removed.

    Example:
        >>> import torch, fxsparse
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> x = (torch.randn(3, 4),)
        >>> out = fxsparse.transform(model, fxsparse.masks.channels(model, 0.5, example_inputs=x))
        >>> small = fxsparse.shrink(out, example_inputs=x)
        >>> small[0].weight.shape, small[2].weight.shape, torch.allclose(small(*x), out(*x))
        (torch.Size([4, 4]), torch.Size([2, 4]), True)
    """
    if not isinstance(out, torch.fx.GraphModule) or not mask_registry(out.graph):
        raise MaskError(
            f"shrink takes the output of fxsparse.transform (emit='graph') with masks, got {type(out).__name__}"
            + (
                ""
                if not isinstance(out, torch.fx.GraphModule)
                else " that applies no mask (fxsparse.freeze folds the masks away: shrink before freezing, and freeze "
                "the smaller model if you like)"
            )
        )
    masked = to_model(out, masks="fold")
    training = masked.training
    masked.eval()
    if example_inputs is None and not example_kwargs:
        example_inputs, example_kwargs = _inputs_that_run(out, masked)
    analysis = analyse(masked, example_inputs, example_kwargs)
    found, args, kwargs = analysis.groups, analysis.args, analysis.kwargs
    with torch.no_grad():
        expected = list(_tensors(masked(*args, **kwargs)))
    if not expected:
        raise MaskError(
            f"shrink checks the smaller model against the masked one on their outputs, and found no tensor in the "
            f"outputs of {type(masked).__name__}"
        )
    floats = [t for t in expected if t.is_floating_point()]
    if floats and not any((t.isfinite() & (t != 0)).any() for t in floats):
        raise MaskError(
            f"shrink checks the smaller model against the masked one on their outputs, and the outputs of "
            f"{type(masked).__name__} on the example inputs are all zero (or not finite): they cannot tell a wrong "
            "smaller model from a right one; pass example inputs that reach the weights (token ids that are not "
            "padding)"
        )
    masks = _masks_by_first_name(out, masked)
    changed: list[tuple[Group, list[int]]] = []
    left_inexact = 0
    for group in found.prunable:
        units = [u for u in range(group.units) if _fully_masked(group, u, masks)]
        if exact and not group.exact:
            left_inexact += len(units)
            continue
        if not units:
            continue
        if len(units) == group.units:
            raise MaskError(
                f"the masks zero every unit of group {group.name} ({group.units} units): removing them all would "
                "leave a layer of width 0; keep at least one"
            )
        changed.append((group, units))
    if not changed:
        # Unstructured masks (magnitude, n_m, block) zero single weights, never a whole unit: the
        # result would be the masked model at full size, which a user expecting a smaller one
        # would not notice without looking at the shapes.
        warnings.warn(
            "shrink removed nothing: no unit of a prunable group is masked in every parameter the group couples "
            + (
                f"(the masks zero {left_inexact} unit(s) of groups where removing differs from masking, which "
                "exact=False removes); "
                if left_inexact
                else "(fxsparse.masks.channels makes such masks; magnitude, n_m and block masks zero single "
                "weights, which stay as mask * weight); "
            )
            + "the result is the masked model at full size",
            UserWarning,
            stacklevel=2,
        )
    sure = [(group, units) for group, units in changed if group.exact]
    if len(sure) < len(changed) and sure:
        # Once an inexact unit goes only the output shapes can be compared, so the exact removals
        # are checked on their own first (on a copy): a forward that cannot follow them is refused.
        _check(expected, _rebuilt(copy_model(masked), _smaller(masked, sure), sure), args, kwargs, compare_values=True)
    small = _rebuilt(masked, _smaller(masked, changed), changed)  # may be ``masked`` itself, made smaller
    _check(expected, small, args, kwargs, compare_values=len(sure) == len(changed))
    return small.train(training)


def _smaller(model: nn.Module, changed: list[tuple[Group, list[int]]]) -> dict[str, torch.Tensor]:
    """The parameters and buffers of ``model`` that lose positions, without the ``changed`` units."""
    removals: dict[tuple[str, int], set[int]] = {}
    for group, units in changed:
        for member in group.members:
            removals.setdefault((member.tensor, member.dim), set()).update(i for u in units for i in member.indices[u])
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return {name: _without(tensors[name], removals, name) for name in {name for name, _ in removals}}


def _fully_masked(group: Group, unit: int, masks: dict[str, torch.Tensor]) -> bool:
    for member in group.members:
        if not member.is_parameter:
            continue
        mask = masks.get(member.tensor)
        if mask is None:
            return False
        if mask.index_select(member.dim, torch.tensor(member.indices[unit])).any():
            return False
    return True


def _masks_by_first_name(out: torch.fx.GraphModule, model: nn.Module) -> dict[str, torch.Tensor]:
    """The masks ``out`` applies, keyed by the first name of their parameter in ``model`` (a tie has one)."""
    first = _first_names(model)
    by_alias = {name: first[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
    found = {}
    for mask_name, masked_name in mask_registry(out.graph).items():
        mask = lookup(out, mask_name)
        if isinstance(mask, torch.Tensor) and masked_name in by_alias:
            found[by_alias[masked_name]] = mask.detach().bool()
    return found


def _first_names(model: nn.Module) -> dict[int, str]:
    """Each parameter's and buffer's first name in ``model``, by ``id``: the one name a tied tensor is changed under."""
    first: dict[int, str] = {}
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        first.setdefault(id(tensor), name)
    return first


def _without(tensor: torch.Tensor, removals: dict[tuple[str, int], set[int]], name: str) -> torch.Tensor:
    result = tensor.detach()
    for dim in range(tensor.dim()):
        gone = removals.get((name, dim))
        if gone:
            keep = torch.tensor([i for i in range(tensor.shape[dim]) if i not in gone], dtype=torch.long)
            result = result.index_select(dim, keep)
    return result.clone()


def _rebuilt(masked: nn.Module, new: dict[str, torch.Tensor], changed: list[tuple[Group, list[int]]]) -> nn.Module:
    config = getattr(masked, "config", None)
    if config is not None and hasattr(config, "to_dict") and hasattr(type(masked), "from_pretrained"):
        return _rebuilt_from_config(masked, config, new, changed)
    return _rebuilt_in_place(masked, new)


def _rebuilt_in_place(masked: nn.Module, new: dict[str, torch.Tensor]) -> nn.Module:
    """``masked`` (fxsparse's own copy) with the smaller tensors, and the sizes torch.nn layers record updated."""
    first = _first_names(masked)
    replacements: dict[str, torch.Tensor] = {}
    for module in masked.modules():
        held: list[tuple[str, torch.Tensor | None]] = [*module._parameters.items(), *module._buffers.items()]
        for attribute, tensor in held:
            name = first.get(id(tensor)) if tensor is not None else None
            if tensor is None or name is None or name not in new:
                continue
            is_parameter = attribute in module._parameters
            if name not in replacements:
                replacements[name] = nn.Parameter(new[name], tensor.requires_grad) if is_parameter else new[name]
            if is_parameter:
                module._parameters[attribute] = replacements[name]  # type: ignore[assignment]  # an nn.Parameter, made above
            else:
                module._buffers[attribute] = replacements[name]
        _update_sizes(module)
    return masked


def _update_sizes(module: nn.Module) -> None:
    """The sizes ``torch.nn`` layers record besides their tensors' shapes."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        new_out = module.weight.shape[0]
        if module.groups > 1:  # whole convolution groups went (one unit each)
            module.groups = module.groups * new_out // module.out_channels
        module.out_channels = new_out
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d | nn.SyncBatchNorm):
        if module.weight is not None:
            module.num_features = module.weight.shape[0]
        elif module.running_mean is not None:
            module.num_features = module.running_mean.shape[0]
    elif isinstance(module, nn.LayerNorm | nn.RMSNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]


def _rebuilt_from_config(
    masked: nn.Module, config: Any, new: dict[str, torch.Tensor], changed: list[tuple[Group, list[int]]]
) -> nn.Module:
    """An instance of the model's class built from an updated config, holding the smaller tensors."""
    updates: dict[str, int] = {}
    intermediate = next((f for f in _INTERMEDIATE_FIELDS if hasattr(config, f)), None)
    mlp_width = getattr(config, intermediate, None) if intermediate else None
    if intermediate == "n_inner" and mlp_width is None:
        mlp_width = 4 * config.hidden_size  # GPT-2's default
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    widths: dict[str, set[int]] = {}
    for group, units in changed:
        kept = group.units - len(units)
        if any(m.role == "embedding" for m in group.members):
            widths.setdefault("hidden_size", set()).add(kept)
        elif group.unit_width > 1 and kv_heads and group.units == kv_heads and heads:
            widths.setdefault("num_key_value_heads", set()).add(kept)
            widths.setdefault("num_attention_heads", set()).add(kept * (heads // kv_heads))
        elif group.unit_width == 1 and intermediate and group.units == mlp_width:
            widths.setdefault(intermediate, set()).add(kept)
        else:
            raise MaskError(
                f"shrink cannot express the removal from group {group.name} ({group.units} units) in the "
                f"{type(config).__name__} of {type(masked).__name__}: it is neither the hidden size, the MLP width "
                "nor the attention heads"
            )
    for field, values in widths.items():
        if len(values) > 1:
            raise MaskError(
                f"shrink: the layers of {type(masked).__name__} would keep different {field} ({sorted(values)}), which "
                f"its config (one {field} for every layer) cannot express: prune every layer alike (scope='layer')"
            )
        updates[field] = values.pop()
    new_config = copy.deepcopy(config)
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and heads:
        head_dim = config.hidden_size // heads
    if getattr(config, "num_key_value_heads", None) is None:
        updates.pop("num_key_value_heads", None)  # a config without grouped-query attention
    for field, value in updates.items():
        setattr(new_config, field, value)
    if ("num_attention_heads" in updates or "hidden_size" in updates) and head_dim is not None:
        new_config.head_dim = head_dim  # per-head width stays; models that derive it from hidden_size need it set
    state = masked.state_dict(keep_vars=True)
    first = _first_names(masked)
    new_state = {}
    for key, tensor in state.items():
        name = first.get(id(tensor), key)
        new_state[key] = new[name] if name in new else tensor.detach()
    try:
        small: nn.Module = type(masked)(new_config)
        dtype = next(masked.parameters()).dtype
        small.to(dtype)
        small.load_state_dict(new_state, strict=True)
    except Exception as exc:
        raise MaskError(
            f"shrink: {type(masked).__name__} built from the updated config ({updates}) does not take the smaller "
            f"weights: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from exc
    return small


def _check(
    expected: list[torch.Tensor], small: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], compare_values: bool
) -> None:
    """Refuse a shrunk model whose outputs differ from the masked model's (``expected``, beyond round-off)."""
    small.eval()
    with torch.no_grad():
        try:
            got = list(_tensors(small(*args, **kwargs)))
        except Exception as exc:
            raise MaskError(
                f"shrink: {type(small).__name__} no longer runs with its smaller weights: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0]}; its forward uses a size that is not read from its layers "
                "(a number written in the code, or an attribute fxsparse does not know)"
            ) from exc
    if len(expected) != len(got) or any(a.shape != b.shape for a, b in zip(expected, got, strict=False)):
        raise MaskError(
            f"shrink: {type(small).__name__} with its smaller weights returns outputs of other shapes "
            f"({[tuple(t.shape) for t in got]}, expected {[tuple(t.shape) for t in expected]})"
        )
    if not compare_values:
        return
    for a, b in zip(expected, got, strict=True):
        if a.is_floating_point():
            finite = a[a.isfinite()]  # the tolerance's scale; inf and NaN must match exactly
            scale = float(finite.abs().max()) if finite.numel() else 0.0
            same = torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + scale), equal_nan=True)
        else:  # integers and bools (indices, decisions): no round-off to allow
            same = torch.equal(a, b)
        if not same:
            worst = float((a.double() - b.double()).abs().nan_to_num(nan=math.inf).max())
            raise MaskError(
                f"shrink: {type(small).__name__} with its smaller weights computes other outputs than the masked "
                f"model (largest difference {worst:.3g}); its forward uses a size that is not read from its layers"
            )


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    # Every tensor torch.export would see in an output (dataclasses and model outputs registered
    # with pytree included): walking only lists and dicts compared nothing inside a dataclass.
    for leaf in tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            yield leaf


def _inputs_that_run(out: torch.fx.GraphModule, masked: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inputs of the shapes an export-captured ``out`` was captured with, on which ``masked`` runs.

    Floats are random; integers are ones (zeros are often padding: a token whose embedding is
    zero, an attention mask that hides everything, so every output would be zero whatever
    shrink did), or zeros where ones are out of range (an index into a table of one row).
    """
    args, kwargs = _inputs_of(out, 1)
    try:
        with torch.no_grad():
            masked(*args, **kwargs)
    except Exception:
        return _inputs_of(out, 0)
    return args, kwargs


def _inputs_of(out: torch.fx.GraphModule, integers: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inputs of the shapes an export-captured ``out`` was captured with (random floats, ``integers`` elsewhere)."""
    if captured_by(out) != "export":
        raise MaskError(
            "shrink finds the groups on the graph torch.export captures, and checks the result by running it: "
            "this output was captured with torch.fx, which records no input shapes; pass example_inputs and/or "
            "example_kwargs"
        )
    generator = torch.Generator().manual_seed(0)
    kwargs = {}
    for node in out.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise MaskError(f"shrink cannot make an input like {node.name!r}; pass example_inputs/example_kwargs")
        if value.is_floating_point():
            kwargs[node.name] = torch.randn(tuple(value.shape), generator=generator, dtype=value.dtype)
        else:
            kwargs[node.name] = torch.full(tuple(value.shape), integers, dtype=value.dtype)
    return (), kwargs
