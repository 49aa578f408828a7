"""Capture: copy the model, lower ``FakeSparsity`` parametrizations, trace it into an FX graph.

Nothing here edits a graph; it only produces one. The copy is what the result will own,
so the caller's model is never touched, not even temporarily.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
import os
import re
import threading
import types
import typing
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize

from ._compat import FAKE_TENSOR_LOGGER, FakeTensor, export_input_guards, is_erased, keystr
from ._errors import FxsparseError, MaskError, TraceError, describe
from ._plan import KEPT_ROOT, ROOT_HOOKS_TRACED, Plan, must_be_called
from ._runtime.guards import InputGuards, check_input_structure

__all__ = [
    "EXPORT_LOCK",
    "MISSING",
    "Exported",
    "Tracer",
    "copy_model",
    "export",
    "lookup",
    "lower_fake_sparsity",
    "refuse_reads_of_the_original",
    "trace",
]

_EMPTY_COPYABLE = (dict, OrderedDict, set, list)
_ATOMIC = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def copy_model(model: nn.Module, *, share_parameters: bool = False) -> nn.Module:
    """A copy of ``model`` that shares no parameter, buffer or submodule with it.

    ``share_parameters=True``: the copy holds the model's own ``nn.Parameter`` objects
    (every other thing, buffers included, is still copied), for ``transform(..., share_weights=True)``.

    Equivalent to ``copy.deepcopy`` (ties and shared submodules stay shared within the
    copy), but copies the module registries directly instead of through the generic
    ``__reduce_ex__`` machinery, which is most of deepcopy's cost on models with
    thousands of modules. Modules that define their own ``__deepcopy__`` (GraphModule,
    parametrized modules), or whose class overrides how torch's pickles it
    (``__getstate__``, ``__setstate__``, ``__reduce_ex__``, ``__reduce__``), get ``copy.deepcopy``.

    Unlike ``copy.deepcopy``, a function stored on a module (``self.f = lambda x: fc(x)``,
    minGPT's ``self.mlpf``) is rebuilt to close over the copy's modules, not the original's:
    deepcopy shares functions, so the copy would run the original's weights.
    """
    memo: dict[int, Any] = {}
    if share_parameters:
        # A parameter found in the memo is "already copied" to itself: every copy path (module
        # registries, parametrizations, closures) then keeps the very object, ties included.
        memo.update((id(parameter), parameter) for _, parameter in model.named_parameters(remove_duplicate=False))
    copied = _copy_module(model, memo, path="")
    _rebind_functions(copied, memo)
    return copied


def _copy_module(module: nn.Module, memo: dict[int, Any], path: str) -> nn.Module:
    done = memo.get(id(module))
    if done is not None:
        return done  # type: ignore[no-any-return]
    if _copies_its_own_way(type(module)):  # type: ignore[arg-type]  # a class hashes; mypy reads Module.__hash__
        return _copy_value(module, memo, path, "")  # type: ignore[no-any-return]
    new = object.__new__(type(module))
    memo[id(module)] = new
    state: dict[str, Any] = {}
    for key, value in module.__dict__.items():
        if key == "_modules":
            state[key] = {
                n: None if m is None else _copy_module(m, memo, f"{path}.{n}" if path else n) for n, m in value.items()
            }
        elif key in ("_parameters", "_buffers"):
            state[key] = {n: None if t is None else copy.deepcopy(t, memo) for n, t in value.items()}
        elif isinstance(value, _ATOMIC):
            state[key] = value
        elif type(value) in _EMPTY_COPYABLE and not value:
            state[key] = type(value)()
        elif isinstance(value, torch.Tensor) and not value.is_leaf:
            # deepcopy refuses non-leaf tensors; such an attribute is recomputed state
            # (torch.nn.utils.prune's `weight`), so a detached copy is the faithful one.
            state[key] = memo.setdefault(id(value), value.detach().clone())
        else:
            state[key] = _copy_value(value, memo, path, key)
    new.__dict__.update(state)
    return new


_STATE_HOOKS = ("__getstate__", "__setstate__", "__reduce_ex__", "__reduce__")


@functools.lru_cache(maxsize=256)  # bounded: GraphModules make a class per instance
def _copies_its_own_way(cls: type) -> bool:
    """Whether copying ``cls`` by its ``__dict__`` could differ from ``copy.deepcopy``: it has a
    ``__deepcopy__``, or a pickling hook other than that of the torch class it derives from."""
    if getattr(cls, "__deepcopy__", None) is not None:
        return True
    torch_base = next((c for c in cls.__mro__ if c.__module__.startswith("torch.")), nn.Module)
    return any(getattr(cls, hook) is not getattr(torch_base, hook) for hook in _STATE_HOOKS)


def _copy_value(value: Any, memo: dict[int, Any], path: str, attribute: str) -> Any:
    try:
        return copy.deepcopy(value, memo)
    except Exception as exc:
        where = f"attribute {attribute!r} of module {path or '(root)'!r}" if attribute else f"module {path!r}"
        raise TraceError(
            f"cannot copy the model: {where} ({type(value).__name__}) refuses to be copied: "
            f"{type(exc).__name__}: {exc}; fxsparse works on a copy so that your model is never changed"
        ) from exc


def _rebind_functions(copied: nn.Module, memo: dict[int, Any]) -> None:
    """Point the functions stored on the copy's modules at the copy: see :func:`copy_model`."""
    copies = {id(value) for key, value in memo.items() if key != id(memo)}
    done: dict[int, Any] = {}
    for path, module in copied.named_modules(remove_duplicate=False):
        for key, value in list(vars(module).items()):
            if isinstance(value, types.FunctionType | functools.partial):
                where = f"function {key!r} stored on module {path or '(root)'!r}"
                rebound = _remapped(value, memo, copies, where, done)
                if rebound is not value:
                    module.__dict__[key] = rebound
            elif type(value) in (dict, OrderedDict) and key.endswith("hooks"):
                # A hook registry (the copy's own dict): hooks closing over the model's modules.
                for handle, hook in list(value.items()):
                    where = f"hook {getattr(hook, '__qualname__', type(hook).__name__)} in {key} of module "
                    rebound = _remapped(hook, memo, copies, f"{where}{path or '(root)'!r}", done)
                    if rebound is not hook:
                        value[handle] = rebound


def _rebound(
    function: types.FunctionType, memo: dict[int, Any], copies: set[int], where: str, done: dict[int, Any]
) -> types.FunctionType:
    """``function`` with the originals its closure and defaults hold replaced by their copies."""
    if id(function) in done:
        return done[id(function)]  # type: ignore[no-any-return]
    done[id(function)] = function  # a function that reaches itself: keep the cycle as it is
    cells = function.__closure__ or ()
    old = [_cell_value(cell) for cell in cells]
    new = [
        value if value is _EMPTY_CELL else _remapped(value, memo, copies, f"{where}, closure variable {name!r}", done)
        for name, value in zip(function.__code__.co_freevars, old, strict=True)
    ]
    old_defaults = function.__defaults__ or ()
    new_defaults = tuple(_remapped(d, memo, copies, f"{where}, a default", done) for d in old_defaults)
    old_keywords = function.__kwdefaults__ or {}
    new_keywords = {k: _remapped(d, memo, copies, f"{where}, default of {k!r}", done) for k, d in old_keywords.items()}
    before = [*old, *old_defaults, *old_keywords.values()]
    after = [*new, *new_defaults, *new_keywords.values()]
    if all(x is y for x, y in zip(before, after, strict=True)):
        return function
    rebound = types.FunctionType(
        function.__code__,
        function.__globals__,
        function.__name__,
        new_defaults or None,
        tuple(cell if x is y else types.CellType(y) for cell, x, y in zip(cells, old, new, strict=True)) or None,
    )
    rebound.__kwdefaults__ = new_keywords or None
    rebound.__qualname__ = function.__qualname__
    rebound.__module__ = function.__module__
    rebound.__doc__ = function.__doc__
    rebound.__dict__.update(function.__dict__)
    done[id(function)] = rebound
    return rebound


_EMPTY_CELL = object()


def _cell_value(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a variable not assigned yet
        return _EMPTY_CELL


def _remapped(value: Any, memo: dict[int, Any], copies: set[int], where: str, done: dict[int, Any]) -> Any:
    """``value`` (held by a function of the copy) with every original module or tensor replaced by its copy."""
    if type(value) is functools.partial:  # deepcopy copies a partial (so it may be one of the copies), not its function
        function = _remapped(value.func, memo, copies, where, done)
        args = _remapped(value.args, memo, copies, where, done)
        keywords = _remapped(value.keywords, memo, copies, where, done)
        if function is value.func and args is value.args and keywords is value.keywords:
            return value
        return functools.partial(function, *args, **keywords)
    if id(value) in copies or isinstance(value, _ATOMIC):
        return value
    if id(value) in memo:
        return memo[id(value)]
    if isinstance(value, types.FunctionType):
        return _rebound(value, memo, copies, where, done)
    if isinstance(value, types.MethodType):
        owner = _remapped(value.__self__, memo, copies, where, done)
        function = _remapped(value.__func__, memo, copies, where, done)
        return value if owner is value.__self__ and function is value.__func__ else types.MethodType(function, owner)
    if type(value) in (list, tuple, set, frozenset):
        items = [_remapped(item, memo, copies, where, done) for item in value]
        return value if all(x is y for x, y in zip(value, items, strict=True)) else type(value)(items)
    if type(value) in (dict, OrderedDict):
        items = [(k, _remapped(v, memo, copies, where, done)) for k, v in value.items()]
        return value if all(v is value[k] for k, v in items) else type(value)(items)
    reached = [
        key
        for key, item in getattr(value, "__dict__", {}).items()
        if id(item) in memo and isinstance(item, nn.Module | torch.Tensor)
    ]
    if reached:
        raise TraceError(
            f"cannot copy the model: {where} holds a {type(value).__name__} whose attribute {reached[0]!r} is a "
            "module or tensor of the model; the copy fxsparse works on would run the original's weights, "
            "unmasked. Store the module on the model and reach it through self instead"
        )
    return value


def lower_fake_sparsity(model: nn.Module) -> dict[str, torch.Tensor]:
    """Remove every ``FakeSparsity`` parametrization from ``model`` (a copy we own), returning its masks.

    The weight keeps its unmasked value (``parametrizations.weight.original``); the
    masks come back keyed by the parameter's name, to become graph-level masks.
    """
    from torch.ao.pruning.sparsifier.utils import FakeSparsity

    masks: dict[str, torch.Tensor] = {}
    if not any(parametrize.is_parametrized(module) for module in model.modules()):
        return masks
    # fxsparse masks a tied parameter the same at every use; FakeSparsity masks each alias
    # (each use) with its own mask, so a tie with different masks cannot be lowered.
    names_of = {name: id(tensor) for name, tensor in model.named_parameters(remove_duplicate=False)}
    lowered: dict[int, str] = {}  # the unmasked weight (``original``, shared by tied aliases) -> its name
    for module_name, module in list(model.named_modules()):
        if not parametrize.is_parametrized(module):
            continue
        _own_class(module)
        for tensor_name, chain in list(module.parametrizations.items()):
            kinds = [type(p) for p in chain]
            if FakeSparsity not in kinds:
                continue
            name = f"{module_name}.{tensor_name}" if module_name else tensor_name
            if kinds != [FakeSparsity]:
                raise MaskError(
                    f"cannot lower the parametrizations of {name!r}: fxsparse lowers a FakeSparsity that is the "
                    f"only parametrization of its tensor, found {[k.__name__ for k in kinds]}"
                )
            original, mask = chain.original, chain[0].mask
            first = lowered.setdefault(id(original), name)
            if first == name:
                masks[name] = mask
            elif not (mask.dtype == masks[first].dtype and torch.equal(mask, masks[first])):
                raise MaskError(
                    f"{first!r} and {name!r} are one tied parameter with a different FakeSparsity mask on each; "
                    "fxsparse masks a parameter the same at every use: give both aliases the same mask, "
                    "or untie them"
                )
            parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
    # An alias read bare (before lowering) or through another parametrization (after it) is
    # a use FakeSparsity leaves unmasked.
    unmasked = [(n, t) for n, t in names_of.items() if not _PARAMETRIZED_ORIGINAL.fullmatch(n)]
    unmasked += [(n, id(t)) for n, t in model.named_parameters(remove_duplicate=False) if "parametrizations." in n]
    for alias, tensor_id in unmasked:
        if tensor_id in lowered:
            name = lowered[tensor_id]
            raise MaskError(
                f"{name!r} and {alias!r} are one tied parameter with a FakeSparsity mask on {name!r} only; "
                f"fxsparse masks a parameter the same at every use: give {alias!r} the same FakeSparsity "
                "mask (and no other parametrization), or untie them"
            )
    return masks


_PARAMETRIZED_ORIGINAL = re.compile(r"(.*\.)?parametrizations\.\w+\.original")


def _own_class(module: nn.Module) -> None:
    """Give a copied parametrized module a class of its own.

    parametrize injects a class per module and stores the parametrized properties on
    it; a deepcopy shares that class with the original, so removing a parametrization
    from the copy would delete the property from under the original too.
    """
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


# What proxies raise in torch.nn code that cannot be traced.
_UNTRACEABLE = (torch.fx.proxy.TraceError, RuntimeError, TypeError)


class Tracer(torch.fx.Tracer):
    """``torch.fx.Tracer`` that traces into the modules holding masked parameters, finding names in O(1).

    A module FX keeps as a leaf by default (a ``torch.nn`` module such as
    ``nn.MultiheadAttention`` or ``nn.BatchNorm2d``) is traced into if it can be; if
    its ``forward`` cannot be traced (control flow on input shapes), the attempt is
    rolled back and the module stays a leaf call, ``kept`` with the reason, for the
    rewrite to call with its masked parameters swapped in. Modules the plan already
    keeps (those with hooks) stay leaf calls from the start.
    """

    def __init__(
        self,
        traced_into: frozenset[str] = frozenset(),
        opened: frozenset[str] = frozenset(),
        kept: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self._traced_into = traced_into
        self._opened = opened
        self.kept: dict[str, str] = dict(kept or {})
        self.ran: dict[int, tuple[nn.Module, dict[str, Any]]] = {}
        self._names: dict[int, str] = {}
        self._hints: dict[str, Any] = {}
        self._proxy_cache: dict[str, Any] = {}

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> torch.fx.Graph:
        if isinstance(root, nn.Module):
            # FX finds a parameter's name by scanning named_parameters() at every access,
            # which is quadratic on a model that is traced into (thousands of modules).
            self._names = {id(t): n for n, t in root.named_buffers()}
            self._names.update((id(t), n) for n, t in root.named_parameters())
            self.ran[id(root)] = (root, dict(vars(root)))
        self._hints = _type_hints(root.forward if isinstance(root, nn.Module) else root)
        return super().trace(root, concrete_args)

    def create_node(
        self, kind: str, target: Any, args: Any, kwargs: Any, name: str | None = None, type_expr: Any | None = None
    ) -> torch.fx.Node:
        if isinstance(type_expr, str):
            # A module written with `from __future__ import annotations` gives string
            # annotations, which FX would print as unknown names that TorchScript rejects.
            key = "return" if kind == "output" else str(target).lstrip("*")
            type_expr = self._hints.get(key)
        return super().create_node(kind, target, args, kwargs, name, type_expr)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._opened or module_qualified_name in self.kept:
            return True
        if isinstance(m, InputGuards):  # of a graph fxsparse captured with torch.export
            return True
        if must_be_called(m) is not None:  # hooks or its own forward: a trace would run them once
            return True
        if module_qualified_name in self._traced_into:
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        name = self.path_of_module(m)
        if self.is_leaf_module(m, name):
            return super().call_module(m, forward, args, kwargs)
        # Its forward runs on proxies and may store one on the module (torch.nn.utils.prune's hook does).
        self.ran.setdefault(id(m), (m, dict(vars(m))))
        if name not in self._traced_into or not super().is_leaf_module(m, name):
            return super().call_module(m, forward, args, kwargs)
        last = next(iter(reversed(self.graph.nodes)))
        module_stack, num_calls = self.module_stack.copy(), dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except _UNTRACEABLE as exc:
            if isinstance(exc, FxsparseError) or _raised_by_fxsparse(exc):
                raise
            self._roll_back(last)
            self.module_stack.clear()
            self.module_stack.update(module_stack)
            self.num_calls = num_calls
            for inner in [k for k in self.kept if k.startswith(f"{name}.")]:
                del self.kept[inner]  # kept inside a module that is now kept whole
            self.kept[name] = f"its forward cannot be traced: {type(exc).__name__}: {exc}".splitlines()[0]
            return super().call_module(m, forward, args, kwargs)

    def _roll_back(self, last: torch.fx.Node) -> None:
        """Erase every node created after ``last``, and forget proxies of erased nodes."""
        while (node := next(iter(reversed(self.graph.nodes)))) is not last:
            self.graph.erase_node(node)
        for key, proxy in list(self._proxy_cache.items()):
            if is_erased(proxy.node):
                del self._proxy_cache[key]

    def create_arg(self, a: Any) -> Any:
        # A parameter or buffer used as a plain tensor: FX would scan named_buffers() for its name.
        if isinstance(a, torch.Tensor) and (name := self._names.get(id(a))) is not None:
            return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        self._proxy_cache = parameter_proxy_cache
        if isinstance(attr_val, torch.Tensor):
            name = self._names.get(id(attr_val))
            if name is not None and (isinstance(attr_val, nn.Parameter) or self.proxy_buffer_attributes):
                proxy = parameter_proxy_cache.get(name)
                if proxy is None:
                    proxy = parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return proxy
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def _type_hints(function: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(function)
    except Exception:  # an annotation that does not evaluate: leave it out
        return {}


def trace(
    model: nn.Module,
    plan: Plan,
    concrete_args: dict[str, Any] | None = None,
    modes_read: dict[str, bool] | None = None,
) -> tuple[torch.fx.Graph, Plan]:
    """Trace ``model`` (the copy) with leaves chosen by ``plan``; raise ``TraceError`` on failure.

    Returns the graph and the plan with the modules that had to stay leaves (``kept``).
    ``modes_read``, if given, receives the mode (``training``) of each module whose code the
    trace ran and read its ``training`` flag, by name: the graph holds the branches that code
    took on it. Empty: the graph is the same in either mode.
    """
    tracer = Tracer(plan.traced_into, frozenset(plan.opened), plan.kept)
    read: set[int] = set()
    assumed: set[int] = set()
    try:
        recording = _training_reads_recorded(model, read, assumed) if modes_read is not None else None
        with recording or contextlib.nullcontext():
            graph = tracer.trace(model, concrete_args)
    except Exception as exc:
        if isinstance(exc, FxsparseError) or _raised_by_fxsparse(exc):
            raise  # fxsparse's own: not a model that cannot be traced (capture="auto" would export instead)
        if isinstance(exc, _UNTRACEABLE) and torch.fx.Tracer().is_leaf_module(model, "") and plan.parameters:
            # A torch.nn module given as the model itself (nn.LSTM): kept as a call, as inside a container.
            reason = f"its forward cannot be traced: {type(exc).__name__}: {exc}".splitlines()[0]
            return _root_call(model), dataclasses.replace(plan, kept={**plan.kept, KEPT_ROOT: reason})
        into = ""
        if plan.traced_into:
            shown = ", ".join(sorted(plan.traced_into)[:3]) + (", ..." if len(plan.traced_into) > 3 else "")
            into = f" (fxsparse traces into the modules that hold a masked parameter: {shown})"
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}{into}: {type(exc).__name__}: {exc}. "
            "fxsparse needs a model that torch.fx.symbolic_trace can trace: remove data-dependent "
            "control flow from forward (or fix it with concrete_args), or wrap the untraceable part "
            "in a function marked with torch.fx.wrap (given tensors, not a module holding a masked parameter) "
            "or in a module that holds no masked parameter"
        ) from exc
    finally:
        _restore_traced_attributes(tracer.ran.values())
    if modes_read is not None:
        modes_read.update(_modes_of_traced_code(model, tracer, read | (assumed & set(tracer.ran))))
    return graph, plan if tracer.kept == plan.kept else dataclasses.replace(plan, kept=dict(tracer.kept))


def _modes_of_traced_code(model: nn.Module, tracer: Tracer, read: set[int]) -> dict[str, bool]:
    """The mode of every module whose ``training`` flag the code ``tracer`` ran into the graph read
    (not inside those it kept as calls, which run their own code, reading their own mode, at every call)."""

    def inside_a_kept_module(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:depth]) in tracer.kept for depth in range(1, len(parts) + 1))

    return {
        name: module.training
        for name, module in model.named_modules()
        if id(module) in read and not inside_a_kept_module(name)
    }


class _TrainingFlag:
    """``training`` of a module being traced, as a data descriptor that notes each read (thread by thread)."""

    def __get__(self, module: nn.Module | None, owner: type | None = None) -> Any:
        if module is None:
            return self
        reads = getattr(_TRAINING_READS, "reads", None)
        if reads is not None:
            reads.add(id(module))
        return module.__dict__["training"]

    def __set__(self, module: nn.Module, value: bool) -> None:
        module.__dict__["training"] = value


_TRAINING_READS = threading.local()


@functools.cache
def _noting_training_reads(module_class: type[nn.Module]) -> type[nn.Module]:
    namespace = {"training": _TrainingFlag(), "__module__": module_class.__module__}
    namespace["__qualname__"] = module_class.__qualname__
    return type(module_class.__name__, (module_class,), namespace)


@contextlib.contextmanager
def _training_reads_recorded(model: nn.Module, read: set[int], assumed: set[int]) -> Iterator[None]:
    """While inside, every read of a module's ``training`` adds the module's id to ``read``.

    Each module of ``model`` (fxsparse's own copy) gets a subclass of its class for the
    while, whose ``training`` is read through :class:`_TrainingFlag`. A module whose class
    cannot be swapped, or has its own ``train``, goes to ``assumed``: read wherever its code runs.
    """
    swapped: list[tuple[nn.Module, type[nn.Module]]] = []
    outer = getattr(_TRAINING_READS, "reads", None)
    _TRAINING_READS.reads = read
    try:
        for module in model.modules():
            cls = type(module)
            if (
                "training" in vars(cls)
                or cls.train is not nn.Module.train  # its mode may switch more than a flag (a graph per mode)
                or not isinstance(module.__dict__.get("training"), bool)
            ):
                assumed.add(id(module))  # the mode is its own business: taken as read where its code ran
                continue
            try:
                module.__class__ = _noting_training_reads(cls)  # type: ignore[arg-type]
            except TypeError:
                assumed.add(id(module))
                continue
            swapped.append((module, cls))
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls
        _TRAINING_READS.reads = outer


def _root_call(model: nn.Module) -> torch.fx.Graph:
    """A graph that calls the root module (``KEPT_ROOT``) with the inputs of its ``forward``."""
    graph = torch.fx.Graph()
    args: list[torch.fx.Node] = []
    kwargs: dict[str, Any] = {}
    for name, parameter in list(inspect.signature(type(model).forward).parameters.items())[1:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise TraceError(
                f"torch.fx cannot trace {type(model).__name__}, given as the model itself, and fxsparse cannot call "
                f"it from a graph: its forward takes *{name}; put it in a container (nn.Sequential(model))"
            )
        default = parameter.default if parameter.default is not parameter.empty else inspect.Signature.empty
        node = graph.placeholder(name, default_value=default)
        if parameter.kind is parameter.KEYWORD_ONLY:
            kwargs[name] = node
        else:
            args.append(node)
    graph.output(graph.call_module(KEPT_ROOT, tuple(args), kwargs))
    return graph


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def _raised_by_fxsparse(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by fxsparse's own code (or a builtin it called), not by the model or torch."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE + os.sep)


def _restore_traced_attributes(attributes: Iterable[tuple[nn.Module, dict[str, Any]]]) -> None:
    """Undo what code run during tracing set on modules (torch.nn.utils.prune's hook, RNN weight lists).

    New attributes stay unless they are proxies or fake tensors: the FX tracer itself adds
    the tensor constants the graph reads.
    """
    for module, before in attributes:
        for key, value in list(vars(module).items()):
            if key in before:
                if value is not before[key]:
                    object.__setattr__(module, key, before[key])
            elif isinstance(value, torch.fx.Proxy | FakeTensor):
                delattr(module, key)


# torch.export keeps global state while it runs (dispatch modes, the fake tensor mode): two
# exports running at once in one process break each other.
EXPORT_LOCK = threading.Lock()


def _only_critical(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.CRITICAL


@dataclasses.dataclass(frozen=True)
class Exported:
    """A graph captured by ``torch.export``, and what it needs besides the model's own state.

    ``graph`` is the graph of ``ExportedProgram.module()``: ATen operators, in which every
    parameter and buffer is a ``get_attr`` of its name in the model. ``attributes`` are the
    other things it reads (tensor constants export lifted out, subgraphs of control-flow
    operators), by ``get_attr`` target. ``guards`` checks the inputs it was exported for.
    """

    graph: torch.fx.Graph
    attributes: dict[str, Any]
    guards: InputGuards


def export(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None,
    dynamic_shapes: Any = None,
) -> Exported:
    """Capture ``model`` (the copy) with ``torch.export`` (non-strict); raise ``TraceError`` on failure.

    The export runs the model's forward hooks into the graph; the copy's root loses its
    own, which would otherwise run a second time around the graph.
    """
    # Forward runs on fake tensors and may store some on modules (transformers' longrope rotary
    # embedding caches its frequencies): put back what it changed, drop the fakes it added.
    before = [(module, dict(vars(module))) for module in model.modules()]
    # torch logs a full traceback when a fake-tensor kernel fails; the TraceError carries the message.
    # A filter, added and removed under the lock, leaves the logger's level as the user set it.
    fake_tensor_log = logging.getLogger(FAKE_TENSOR_LOGGER)
    try:
        with EXPORT_LOCK:
            fake_tensor_log.addFilter(_only_critical)
            try:
                program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
            finally:
                fake_tensor_log.removeFilter(_only_critical)
    except Exception as exc:  # the whole message: torch.export's often ends with the fix ("Suggested fixes: ...")
        raise TraceError(
            f"torch.export could not capture {type(model).__name__}: {describe(exc)}{_hint_for(exc)}"
        ) from exc
    finally:
        _restore_traced_attributes(before)
    own_hooks = [*model._forward_hooks.values(), *model._forward_pre_hooks.values()]
    if any(hook is not check_input_structure for hook in own_hooks):  # the model's own, now in the graph
        model.__dict__[ROOT_HOOKS_TRACED] = True
    for hooks in (model._forward_hooks, model._forward_pre_hooks):
        hooks.clear()
    for name, child in list(model.named_children()):
        if isinstance(child, InputGuards):  # of an fxsparse output exported again: traced into the graph
            delattr(model, name)
    # Without torch's guards (which it leaves out when called from some projects, and cannot
    # be pickled): InputGuards checks the same inputs, as data.
    unlifted = program.module(check_guards=False)
    graph = unlifted.graph
    state = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    state.update(name for name, _ in model.named_buffers(remove_duplicate=False))
    attributes = {
        str(node.target): lookup(unlifted, str(node.target))
        for node in graph.nodes
        if node.op in ("get_attr", "call_module") and str(node.target) not in state
    }
    guards = _input_guards(graph, program.range_constraints, model.training, _torch_guards(program, unlifted, graph))
    return Exported(graph, attributes, guards)


def _hint_for(failure: Exception) -> str:
    """What to do about an export failure whose torch message does not say it."""
    if re.search(r"Found <class '[\w.]*Cache'> in output", str(failure)):
        # A Hugging Face decoder with use_cache on returns its key/value cache, which export cannot output.
        return (
            "\n(a Hugging Face model returns its key/value cache when use_cache is on: pass use_cache=False in "
            "example_kwargs, or set model.config.use_cache = False, before transforming)"
        )
    return ""


MISSING = object()


def refuse_reads_of_the_original(
    model: nn.Module,
    copied: nn.Module,
    graph: torch.fx.Graph,
    exported: Exported | None,
    shared_parameters: bool = False,
) -> None:
    """Raise ``TraceError`` if ``graph``, captured from ``copied``, reads a tensor of ``model`` itself.

    The copy shares nothing with the model, so such a read came through something the
    copy could not follow (a global, an object outside the module tree): the output
    would read the model's weights, unmasked, and change when the model does.
    ``shared_parameters``: the copy holds the model's parameters by design
    (``copy_model(..., share_parameters=True)``); a read of one of those very objects, as
    a parameter of the copy, is the copy's own. Any other read of the model's memory (a
    buffer, a view or constant made from a parameter) is still refused.
    """
    shared = copied.named_parameters(remove_duplicate=False) if shared_parameters else ()
    own = {id(parameter) for _, parameter in shared}
    originals: dict[int, str] = {}
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        storage = _storage_of(tensor)
        if storage:
            originals.setdefault(storage, name)
    if not originals:
        return
    attributes = exported.attributes if exported is not None else {}
    for node in graph.find_nodes(op="get_attr"):
        target = str(node.target)
        value = attributes[target] if target in attributes else lookup(copied, target)
        if id(value) in own and target not in attributes:
            continue
        original = originals.get(_storage_of(value)) if isinstance(value, torch.Tensor) else None
        if original is not None:
            raise TraceError(
                f"the captured graph reads the model's own tensor {original!r} (as {target!r}), not the copy's: "
                f"fxsparse works on a copy of the model, and the forward reaches the original through "
                "something the copy cannot follow (a global variable, or an object outside the module tree); "
                "the output would read it unmasked. Reach modules and tensors through self instead"
            )


def _storage_of(tensor: torch.Tensor) -> int:
    """Where ``tensor``'s memory starts (0 for a tensor without memory of its own: meta, sparse)."""
    if tensor.layout != torch.strided or tensor.is_meta or isinstance(tensor, FakeTensor):
        return 0
    try:
        return int(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # a tensor subclass without storage
        return 0


def lookup(module: nn.Module, dotted: str) -> Any:
    """The attribute at a dotted path (``"seq.0.weight"``), or ``MISSING``."""
    value: Any = module
    for part in dotted.split("."):
        value = getattr(value, part, MISSING)
        if value is MISSING:
            break
    return value


def _input_guards(
    graph: torch.fx.Graph, range_constraints: Mapping[Any, Any], training: bool, checks: list[tuple[str, str]]
) -> InputGuards:
    """The checks of an exported graph's inputs, as data (see :class:`InputGuards`)."""
    inputs: list[tuple[str, str, Any]] = []
    for placeholder in graph.find_nodes(op="placeholder"):
        value = placeholder.meta.get("val")
        if isinstance(value, torch.Tensor):
            inputs.append((placeholder.name, "tensor", tuple(_dimension(size) for size in value.shape)))
        elif value is None or isinstance(value, bool | int | float | str):
            inputs.append((placeholder.name, "value", value))  # export fixed it at its example value
        else:
            inputs.append((placeholder.name, "any", None))  # a SymInt (dynamic) or an opaque object
    ranges: dict[str, tuple[int, int | None]] = {}
    for symbol, bounds in range_constraints.items():
        upper = bounds.upper
        lower = int(bounds.lower) if bounds.lower.is_Integer else 0
        ranges[str(symbol)] = (lower, int(upper) if upper.is_Integer else None)
    return InputGuards(inputs, ranges, training, checks)


def _torch_guards(
    program: torch.export.ExportedProgram, unlifted: nn.Module, graph: torch.fx.Graph
) -> list[tuple[str, str]]:
    """torch.export's own guards on the inputs, as Python over ``args`` (the flat inputs), each with its text.

    They are what ``ExportedProgram.module()`` checks in generated code that cannot be
    pickled: relations between sizes (derived dimensions, ``x.size()[0] % 2 == 0`` for a
    branch taken on a dynamic size) beyond the ranges and static sizes InputGuards
    checks with clearer messages. Built with torch's private helpers; on a torch without
    them, InputGuards checks only its own.
    """
    try:
        code, paths = export_input_guards(program, unlifted, graph)
    except (ImportError, AttributeError) as exc:  # a torch that renamed or removed a private helper
        warnings.warn(
            f"fxsparse cannot read torch.export's input guards on this torch ({torch.__version__}): {describe(exc)}; "
            "inputs of export-captured models are checked for sizes, values and mode, not for relations "
            "between sizes",
            UserWarning,
            stacklevel=2,
        )
        return []
    guards = []
    for condition in code:
        shown = condition
        for index, path in enumerate(paths):
            source = "L" + keystr(path)
            condition = condition.replace(source, f"args[{index}]")
            shown = shown.replace(source, path[0].key + keystr(path[1:]))
        guards.append((condition, " ".join(shown.split())))
    return guards


def _dimension(size: int | torch.SymInt) -> int | str | None:
    """A static size, the symbol of a dynamic one, or None for a derived one (``s0 + 1``): left unchecked."""
    if isinstance(size, int):
        return size
    expression = size.node.expr
    return str(expression) if expression.is_symbol else None
