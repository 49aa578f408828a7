"""The weight swap: a module called with some of its parameters replaced for one call."""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any

import torch
import torch.fx
from torch import nn

from .._compat import reparametrize_module
from .._plan import KEPT_ROOT

__all__ = ["call_with_parameters", "root_view", "swap_lock"]


def call_with_parameters(module: nn.Module, parameters: dict[str, torch.Tensor], /, *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)`` with some of its parameters replaced for the call.

    The rewrite calls a module whose ``forward`` cannot be traced this way, with the
    ``mask * weight`` products in place of its masked parameters (what
    ``torch.func.functional_call`` does, minus its refusal to run under ``torch.jit.trace``).
    """
    proxy = next((a for a in (*parameters.values(), *args, *kwargs.values()) if isinstance(a, torch.fx.Proxy)), None)
    if proxy is not None:  # a GraphModule's code being traced again (unpickling): stay one call
        target: Any = module
        if type(module) in _VIEW_CLASSES:  # the model's root, read from the output being traced
            target = proxy.tracer.create_proxy("get_attr", KEPT_ROOT, (), {})
        return proxy.tracer.create_proxy("call_function", call_with_parameters, (target, parameters, *args), kwargs)
    with reparametrize_module(module, dict(parameters)):
        return module(*args, **kwargs)


def root_view(root_class: type[nn.Module], state: dict[str, Any]) -> nn.Module:
    """A module of ``root_class`` whose state *is* ``state`` (the same dict): the model's root,
    seen through the output that holds its state, for a root whose ``forward`` cannot be traced.

    Calling it runs ``forward`` alone: its hooks are the output's, which its own call runs once.
    """
    view = object.__new__(_forward_only(root_class))  # type: ignore[arg-type]
    object.__setattr__(view, "__dict__", state)
    return view


_VIEW_CLASSES: set[type[nn.Module]] = set()


@functools.cache
def _forward_only(root_class: type[nn.Module]) -> type[nn.Module]:
    def call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    view_class = type(root_class.__name__, (root_class,), {"__call__": call, "__module__": root_class.__module__})
    _VIEW_CLASSES.add(view_class)
    return view_class


# Kept beside the modules, not on them: a lock would stop a module from being copied or pickled.
_SWAP_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_SWAP_LOCKS_GUARD = threading.Lock()


def swap_lock(module: nn.Module) -> threading.RLock:
    """The lock one call of ``module`` holds while it swaps masked weights in (re-entrant: a call may nest).

    The swap sets attributes on modules every caller shares, and the graph reads the weights
    before the swap: a call overlapping another would read, or restore, the other's product.
    """
    with _SWAP_LOCKS_GUARD:
        lock = _SWAP_LOCKS.get(module)
        if lock is None:
            lock = _SWAP_LOCKS[module] = threading.RLock()
        return lock
