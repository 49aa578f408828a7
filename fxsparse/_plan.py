"""The plan: which parameters get masked, with which masks, and which modules get opened.

A :class:`Plan` is pure data computed from a model and a mapping of masks, before any
graph exists. Capture reads it to decide what to trace into, the rewrite reads it to
decide what to edit, and tests, diffs and pictures read it to know what was asked for.

Mask rules (the "documented rule" for dtypes and devices):

* a mask is keyed by a parameter's fully qualified name (``"seq.0.weight"``), by any
  alias of a tied parameter, or by a module's name (meaning its ``weight``);
* its shape must equal the parameter's shape exactly (no broadcasting);
* a ``bool`` mask stays ``bool`` (1 byte an element); an integer or floating mask is
  cast to the parameter's dtype, so the weight is never promoted to another dtype;
* a mask on another device is moved to its parameter's device;
* the mask is copied: later changes to the caller's tensor do not reach the result.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ._compat import global_module_hooks, overrides_call_impl
from ._errors import MaskError

__all__ = [
    "ADDED_ATTRIBUTES",
    "MODEL_CLASS",
    "OPENINGS",
    "ROOT_HOOKS_TRACED",
    "MaskedParameter",
    "NameIndex",
    "OpenedModule",
    "Opening",
    "Plan",
    "build_plan",
    "check_buffer_names",
    "must_be_called",
    "normalize_mask",
    "resolve_key",
]

MASK_SUFFIX = "_mask"
# Where a root module whose forward cannot be traced (a bare nn.LSTM) is called from its own graph:
# an attribute of the output giving the model's root, with the output's state (see MaskedGraphModule).
KEPT_ROOT = "_fxsparse_root"
# What an output records of the model it came from, for ``fxsparse.to_model`` and ``freeze`` to build
# the model again over the output's state: the root's class; the dotted names of the attributes
# fxsparse added to the module tree (besides masks, which the graph's tags name); and whether
# the root's own forward hooks were run into the graph (torch.export) and removed from it.
MODEL_CLASS = "_fxsparse_model_class"
ADDED_ATTRIBUTES = "_fxsparse_added"
ROOT_HOOKS_TRACED = "_fxsparse_root_hooks_traced"
# What a mask may hold: torch converts each of these to any parameter dtype (not the complex,
# quantized, bit and sub-byte dtypes, which it cannot convert or which hold no plain values).
MASK_DTYPES = frozenset(
    getattr(torch, name)
    for name in (
        "bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
        "float16", "bfloat16", "float32", "float64",
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    )
    if hasattr(torch, name)  # the float8 kinds came one torch release at a time
)  # fmt: skip
_PARAMETRIZED = re.compile(r"(.*?)parametrizations\.(\w+)\.original")


@dataclass(frozen=True)
class Opening:
    """How to replace a call of a leaf module by the functional call its ``forward`` makes.

    The call becomes ``function(input, *parameters, **attributes)`` with the module's
    parameters (``None`` where unset) and the current values of its attributes.
    """

    function: Callable[..., Any]
    parameters: tuple[str, ...]
    attributes: tuple[str, ...] = ()
    zero_padding_only: bool = False  # convolutions: other padding modes pad in forward, before the call

    def applies(self, module: nn.Module) -> bool:
        """Whether ``module``'s forward is exactly this call."""
        return not self.zero_padding_only or getattr(module, "padding_mode", None) == "zeros"


_CONV_ATTRIBUTES = ("stride", "padding", "dilation", "groups")


# Exact types only: a subclass may override forward, so it is traced into instead.
OPENINGS: dict[type[nn.Module], Opening] = {
    nn.Linear: Opening(F.linear, ("weight", "bias")),
    nn.Conv1d: Opening(F.conv1d, ("weight", "bias"), _CONV_ATTRIBUTES, zero_padding_only=True),
    nn.Conv2d: Opening(F.conv2d, ("weight", "bias"), _CONV_ATTRIBUTES, zero_padding_only=True),
    nn.Conv3d: Opening(F.conv3d, ("weight", "bias"), _CONV_ATTRIBUTES, zero_padding_only=True),
    nn.Embedding: Opening(
        F.embedding,
        ("weight",),
        ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
    ),
}


@dataclass(frozen=True)
class MaskedParameter:
    """One parameter to mask.

    ``name`` is the name the mask was given under; ``aliases`` are all the names of
    the same ``Parameter`` object (more than one when it is tied between modules).
    """

    name: str
    aliases: tuple[str, ...]
    mask: torch.Tensor

    @property
    def owner(self) -> str:
        """The module that gets the mask buffer: the one named by ``name``."""
        return self.name.rpartition(".")[0]

    @property
    def mask_attribute(self) -> str:
        """Name of the mask buffer on its module, e.g. ``"weight_mask"``."""
        return self.name.rpartition(".")[2] + MASK_SUFFIX

    @property
    def mask_name(self) -> str:
        """Fully qualified name of the mask buffer, e.g. ``"seq.0.weight_mask"``."""
        return self.name + MASK_SUFFIX

    @property
    def density(self) -> float:
        """Fraction of the weight the mask keeps (mean of the mask)."""
        return float(self.mask.float().mean()) if self.mask.numel() else 1.0


@dataclass(frozen=True)
class OpenedModule:
    """A leaf module whose calls become a functional call on masked parameters."""

    name: str
    opening: Opening
    parameters: tuple[str | None, ...]  # FQN of each parameter slot, None where unset
    constants: tuple[Any, ...]


@dataclass(frozen=True)
class Plan:
    """Everything the rewrite needs to know: decided before tracing, except ``kept``.

    ``opened``: leaf modules whose calls become functional calls. ``traced_into``:
    modules whose ``forward`` is traced so that their parameter uses show in the graph.
    ``kept``: modules of ``traced_into`` that stay calls, run with the masked parameters
    swapped in, with the reason: torch.nn modules with hooks (decided here) or whose
    ``forward`` turned out untraceable (found by capture, which returns the updated plan).
    """

    parameters: tuple[MaskedParameter, ...]
    opened: Mapping[str, OpenedModule]
    traced_into: frozenset[str]
    kept: Mapping[str, str] = field(default_factory=dict)

    def by_alias(self) -> dict[str, MaskedParameter]:
        """Every alias of every masked parameter, mapped to its entry."""
        return {alias: p for p in self.parameters for alias in p.aliases}

    def __repr__(self) -> str:
        lines = [f"Plan({len(self.parameters)} masked parameters)"]
        for p in self.parameters:
            tied = f" tied to {', '.join(a for a in p.aliases if a != p.name)}" if len(p.aliases) > 1 else ""
            lines.append(
                f"  {p.name} {tuple(p.mask.shape)} {str(p.mask.dtype).removeprefix('torch.')} "
                f"density {p.density:.3f}{tied}"
            )
        lines.extend(f"  kept as a leaf call: {name} ({why})" for name, why in self.kept.items())
        return "\n".join(lines)


def build_plan(
    model: nn.Module,
    masks: Mapping[str, Any],
    inherited: Mapping[str, torch.Tensor] | None = None,
    *,
    copy_masks: bool = True,
) -> Plan:
    """Resolve ``masks`` against ``model`` and decide which modules to open or trace into.

    ``inherited`` holds masks already carried by the model (lowered ``FakeSparsity``
    parametrizations, keyed by parameter name); an explicit mask for the same
    parameter replaces the inherited one. ``copy_masks=False``: ``masks`` are the caller's
    to give away (fxsparse's own), and the plan takes those already in the right dtype,
    device and layout as they are instead of copying them.
    """
    if not isinstance(masks, Mapping):
        raise MaskError(
            f"masks must be a mapping from parameter or module names to tensors, got {type(masks).__name__}"
        )
    aliases_of: dict[int, list[str]] = {}
    parameter_by_name: dict[str, nn.Parameter] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        parameter_by_name[name] = parameter
        aliases_of.setdefault(id(parameter), []).append(name)
    modules = dict(model.named_modules(remove_duplicate=False))

    chosen: dict[int, MaskedParameter] = {}
    key_of: dict[int, str] = {}
    taken: set[int] = set()  # copy_masks=False: memory a mask already holds, which a second one must not share
    for key, value in masks.items():
        name = resolve_key(key, parameter_by_name, modules, model)
        parameter = parameter_by_name[name]
        if id(parameter) in chosen:
            raise MaskError(
                f"mask keys {key_of[id(parameter)]!r} and {key!r} name the same parameter "
                f"{aliases_of[id(parameter)][0]!r}; give one mask per parameter"
            )
        mask = normalize_mask(key, value, name, parameter, copy=copy_masks)
        if not copy_masks and mask.numel():
            if mask.data_ptr() in taken:  # one tensor given for two parameters: each gets its own
                mask = mask.clone()
            taken.add(mask.data_ptr())
        chosen[id(parameter)] = MaskedParameter(name, tuple(aliases_of[id(parameter)]), mask)
        key_of[id(parameter)] = key
    for name, value in (inherited or {}).items():
        parameter = parameter_by_name[name]
        if id(parameter) not in chosen:
            chosen[id(parameter)] = MaskedParameter(
                name, tuple(aliases_of[id(parameter)]), normalize_mask(name, value, name, parameter)
            )
    parameters = tuple(chosen.values())
    check_buffer_names(parameters, modules)
    opened, traced_into, kept = _choose_openings(model, parameters, modules)
    return Plan(parameters, opened, traced_into, kept)


_OWN_NAMES_SEARCHED = 64  # a module's own names, searched for every key: a bound keeps that a lookup


class NameIndex:
    """A model's names, indexed once for many mask keys: a key naming nothing costs a lookup,
    not a walk of the model and a fuzzy search of every name (42 ms a key at 1,500 layers).

    Closest names come from a search of every name for the first ``full_searches`` such keys,
    then from the key's own module only (``"3.wieght"``: ``"3"``'s parameters).
    """

    def __init__(
        self, parameter_by_name: Mapping[str, nn.Parameter], modules: Mapping[str, nn.Module], model: nn.Module,
        *, full_searches: int = 10,
    ) -> None:  # fmt: skip
        self.buffers = frozenset(name for name, _ in model.named_buffers(remove_duplicate=False))
        self.candidates = list(parameter_by_name) + [m for m in modules if m and f"{m}.weight" in parameter_by_name]
        self.by_owner: dict[str, list[str]] = {}
        for candidate in self.candidates:
            self.by_owner.setdefault(candidate.rpartition(".")[0], []).append(candidate)
        self.full_searches = full_searches
        self.searched = 0

    def hint(self, key: str) -> str:
        """The closest valid names to ``key``, as the end of a sentence."""
        if self.searched < self.full_searches:
            self.searched += 1
            close = difflib.get_close_matches(key, self.candidates, n=5, cutoff=0.5)
            return self._closest(close) if close else self._some_names()
        own = self.by_owner.get(key.rpartition(".")[0], [])
        close = difflib.get_close_matches(key, own, n=5, cutoff=0.5) if len(own) <= _OWN_NAMES_SEARCHED else []
        if close:
            return self._closest(close)
        return f"{self._some_names()} (closest names are searched for the first {self.full_searches} such keys only)"

    @staticmethod
    def _closest(close: list[str]) -> str:
        return f"closest valid names: {', '.join(repr(c) for c in close)}"

    def _some_names(self) -> str:
        if not self.candidates:
            return "the model has no parameters"
        return f"valid names include: {', '.join(repr(c) for c in self.candidates[:5])}"


def resolve_key(
    key: object,
    parameter_by_name: Mapping[str, nn.Parameter],
    modules: Mapping[str, nn.Module],
    model: nn.Module,
    index: NameIndex | None = None,
) -> str:
    """The parameter a mask key names (a parameter, a lowered parametrization's name, or a module's
    ``weight``), or a ``MaskError`` that says why none, with the closest valid names (from
    ``index``, given when resolving many keys against one model)."""
    if not isinstance(key, str):
        raise MaskError(f"mask keys must be parameter or module names (str), got {key!r} of type {type(key).__name__}")
    if key in parameter_by_name:
        return key
    lowered = _PARAMETRIZED.fullmatch(key)
    if lowered and f"{lowered[1]}{lowered[2]}" in parameter_by_name:
        return f"{lowered[1]}{lowered[2]}"  # the name of a FakeSparsity-parametrized weight, lowered
    computed = _computed_by_parametrization(key, modules)
    if computed is not None:
        raise MaskError(
            f"mask key {key!r} names a tensor computed by a parametrization ({computed}), not a parameter; "
            "fxsparse masks parameters, and lowers FakeSparsity parametrizations only: remove that "
            "parametrization first (e.g. torch.nn.utils.parametrize.remove_parametrizations)"
        )
    if key in modules:
        weight_name = f"{key}.weight" if key else "weight"
        if weight_name in parameter_by_name:
            return weight_name
        what = "the root module" if not key else f"module {key!r}"
        if type(modules[key]).__module__.startswith("torch.ao.nn.quantized"):
            raise MaskError(
                f"mask key {key!r} names {what} ({type(modules[key]).__name__}), a quantized module whose weight is "
                "packed, not a parameter: mask the float model, then quantize it"
            )
        raise MaskError(
            f"mask key {key!r} names {what} ({type(modules[key]).__name__}), which has no parameter "
            f"'weight'; name one of its parameters instead: {_own_parameters(key, parameter_by_name) or 'it has none'}"
        )
    index = index if index is not None else NameIndex(parameter_by_name, modules, model)
    if key in index.buffers:
        raise MaskError(f"mask key {key!r} names a buffer; masks apply to parameters only")
    raise MaskError(f"mask key {key!r} names no parameter or module of the model; {index.hint(key)}")


def _computed_by_parametrization(key: str, modules: Mapping[str, nn.Module]) -> str | None:
    """The parametrizations computing the tensor ``key`` names (``"0.weight"``, or module ``"0"``'s weight)."""
    owner, tensor = (key, "weight") if key in modules else key.rpartition(".")[::2]
    parametrizations = getattr(modules.get(owner), "parametrizations", None)
    if parametrizations is None or tensor not in parametrizations:
        return None
    return ", ".join(type(p).__name__ for p in parametrizations[tensor])


def _own_parameters(module_name: str, parameter_by_name: Mapping[str, nn.Parameter]) -> str:
    prefix = f"{module_name}." if module_name else ""
    own = [n for n in parameter_by_name if n.startswith(prefix) and "." not in n[len(prefix) :]]
    return ", ".join(repr(n) for n in own)


def normalize_mask(key: str, value: object, name: str, parameter: torch.Tensor, copy: bool = True) -> torch.Tensor:
    """``value`` checked as a mask for ``parameter`` (named ``name``, given under ``key``) and
    made a contiguous copy on its device, ``bool`` or in its dtype (the module's mask rules);
    ``copy=False``: ``value`` itself where it already is all that."""
    what = f"mask for {name!r}" if key == name else f"mask for {name!r} (key {key!r})"
    if not isinstance(value, torch.Tensor):
        raise MaskError(f"{what} must be a torch.Tensor, got {type(value).__name__}")
    if isinstance(parameter, nn.parameter.UninitializedParameter):
        raise MaskError(
            f"{name!r} is not initialised yet (a lazy module such as LazyLinear): run one forward pass first"
        )
    if tuple(value.shape) != tuple(parameter.shape):
        raise MaskError(f"{what} has shape {tuple(value.shape)}, but the parameter has shape {tuple(parameter.shape)}")
    if value.layout != torch.strided:
        raise MaskError(f"{what} must be a dense tensor, got layout {value.layout}; convert it with .to_dense()")
    if value.is_quantized:
        raise MaskError(
            f"{what} is a quantized tensor ({value.dtype}); a mask holds plain values: pass mask.dequantize(), "
            "or a bool mask"
        )
    if value.dtype not in MASK_DTYPES:
        raise MaskError(f"{what} must be bool, integer or floating, got {value.dtype}")
    if value.is_meta and not parameter.is_meta:
        raise MaskError(f"{what} is on the meta device and holds no values")
    dtype = torch.bool if value.dtype == torch.bool else parameter.dtype
    # .to() converts only where needed; the copy is explicit (cheaper than .to(copy=True)).
    mask = value.detach().to(device=parameter.device, dtype=dtype)
    if mask.is_floating_point() and not mask.is_meta and not bool(torch.isfinite(mask).all()):
        # float64 holds every float value (torch has no isfinite for float8)
        if value.is_floating_point() and not bool(torch.isfinite(value.to(torch.float64)).all()):
            raise MaskError(f"{what} holds NaN or infinite values")
        raise MaskError(f"{what} overflows {dtype}, the parameter's dtype it is cast to")
    if copy and mask.data_ptr() == value.data_ptr():
        return mask.clone(memory_format=torch.contiguous_format)
    return mask.contiguous()


def check_buffer_names(parameters: tuple[MaskedParameter, ...], modules: Mapping[str, nn.Module]) -> None:
    """Refuse a mask whose buffer name is taken on its module (an fxsparse output, a pruned model)."""
    for p in parameters:
        owner = modules[p.owner]
        buffer = p.mask_attribute
        if buffer in owner._buffers:
            raise MaskError(
                f"{p.name!r} already has a mask buffer {p.mask_name!r} (is the model an fxsparse output?); "
                f"change the mask in place with fxsparse.update_masks(out, {{{p.name!r}: mask}}), "
                "or transform the original model"
            )
        if hasattr(owner, buffer):
            raise MaskError(
                f"cannot add the mask buffer {p.mask_name!r}: module {p.owner or 'root'!r} already has an "
                f"attribute {buffer!r} (a model pruned with torch.nn.utils.prune? remove its pruning first)"
            )


def _choose_openings(
    model: nn.Module, parameters: tuple[MaskedParameter, ...], modules: Mapping[str, nn.Module]
) -> tuple[dict[str, OpenedModule], frozenset[str], dict[str, str]]:
    """Open exact-type leaf modules that own a masked parameter; trace into everything else that holds one."""
    first_name = {id(m): n for n, m in model.named_modules()}
    opened: dict[str, OpenedModule] = {}
    traced_into: set[str] = set()
    for p in parameters:
        for alias in p.aliases:
            owner_name = alias.rpartition(".")[0]
            parts = owner_name.split(".") if owner_name else []
            for depth in range(len(parts)):
                traced_into.add(first_name[id(modules[".".join(parts[:depth])])])
            owner = modules[owner_name]
            name = first_name[id(owner)]
            opening = OPENINGS.get(type(owner))
            if opening is not None and opening.applies(owner) and must_be_called(owner) is None:
                slots = tuple(
                    None if getattr(owner, slot) is None else (f"{name}.{slot}" if name else slot)
                    for slot in opening.parameters
                )
                constants = tuple(getattr(owner, attribute) for attribute in opening.attributes)
                opened[name] = OpenedModule(name, opening, slots, constants)
            else:
                traced_into.add(name)
    traced_into.discard("")
    traced_into -= set(opened)
    # Tracing into a module runs its hooks (and the rest of its __call__) once, at trace time;
    # a call runs them at every call, as with FakeSparsity. Keep such modules as calls: the
    # outermost one, which runs what is inside it eagerly.
    kept: dict[str, str] = {}
    for name in sorted(traced_into, key=lambda n: n.count(".")):
        why = must_be_called(modules[name])
        if why is not None and not any(name.startswith(f"{outer}.") for outer in kept):
            kept[name] = why
    return opened, frozenset(traced_into), kept


def must_be_called(module: nn.Module) -> str | None:
    """Why a call of ``module`` must stay a call (neither opened nor traced into), or None.

    These are what ``nn.Module._call_impl`` runs around ``forward`` (hooks, global ones too),
    a ``forward`` set on the instance, and a class's own ``_call_impl``: a trace would run them
    once, on proxies, or not at all. (A class's own ``__call__`` is traced as any code is.)
    """
    if module._forward_hooks or module._forward_pre_hooks:
        return "has forward hooks, which must run at every call"
    if module._backward_hooks or module._backward_pre_hooks:
        return "has backward hooks, which must run at every call"
    if any(global_module_hooks()):
        return "global module hooks are registered (register_module_forward_hook, ...), which must run at every call"
    if "forward" in vars(module):
        return "has a forward set on the instance, which must be the one called"
    if overrides_call_impl(type(module)):
        return f"its class {type(module).__name__} defines its own _call_impl, which must be the one called"
    return None
