"""The weight swap: a module called with some of its parameters replaced for one call."""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
import torch.fx
from torch import nn

from .._compat import reparametrize_module

__all__ = ["call_with_parameters", "swap_lock"]


def call_with_parameters(module: nn.Module, parameters: dict[str, torch.Tensor], /, *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)`` with some of its parameters replaced for the call.

    The rewrite calls a module whose ``forward`` cannot be traced this way, with the
    ``mask * weight`` products in place of its masked parameters (what
    ``torch.func.functional_call`` does, minus its refusal to run under ``torch.jit.trace``).
    """
    proxy = next((a for a in (*parameters.values(), *args, *kwargs.values()) if isinstance(a, torch.fx.Proxy)), None)
    if proxy is not None:  # a GraphModule's code being traced again (unpickling): stay one call
        return proxy.tracer.create_proxy("call_function", call_with_parameters, (module, parameters, *args), kwargs)
    with reparametrize_module(module, dict(parameters)):
        return module(*args, **kwargs)


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
