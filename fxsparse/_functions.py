"""Custom ``torch.autograd.Function``s during capture: kept as calls where FX can, never dropped silently.

A trace runs a Function's ``forward`` on proxies (FX) or fake tensors (torch.export)
and records its operations: the graph computes the same values, but autograd then
differentiates those operations, not the Function's own ``backward`` (BLOOM's
``GeLUFunction``: gradients off by 1e-8; a ``backward`` that scales the gradient: wrong
gradients). While :func:`autograd_functions` is active in a thread, ``Function.apply``
on FX proxies becomes one graph node calling the Function, so its ``backward`` runs;
every Function that could not be kept is reported, for a warning that names it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx

from ._compat import tree_leaves

__all__ = ["FunctionCall", "autograd_functions"]

_ORIGINAL_APPLY: Any = torch.autograd.Function.__dict__["apply"]  # the classmethod itself
_LOCK = threading.Lock()
_users = 0
_active = threading.local()  # .capture: (Functions traced through, in order; whether to keep calls)


class FunctionCall:
    """A graph target calling ``function.apply``: picklable (by the Function's class) and named after it."""

    def __init__(self, function: type[torch.autograd.Function]) -> None:
        self.function = function
        self.__name__ = f"{function.__name__}_apply"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function.apply(*args, **kwargs)  # type: ignore[no-untyped-call]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FunctionCall) and other.function is self.function

    def __hash__(self) -> int:
        return hash(self.function)

    def __repr__(self) -> str:
        return f"{self.function.__qualname__}.apply"


def _representable(value: Any) -> bool:
    """Whether generated code can spell ``value`` as an argument (a node, a constant, a container of them)."""
    if isinstance(value, torch.fx.Proxy | torch.fx.Node):
        return True
    if isinstance(value, tuple | list):
        return all(_representable(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _representable(item) for key, item in value.items())
    return value is None or isinstance(value, bool | int | float | str | torch.dtype | torch.device)


def _apply(cls: type[torch.autograd.Function], *args: Any, **kwargs: Any) -> Any:
    capture: tuple[list[type[torch.autograd.Function]], bool] | None = getattr(_active, "capture", None)
    # torch's own Functions (torch.cond's, checkpointing's) are torch's to capture: they are left alone.
    if capture is not None and not cls.__module__.startswith("torch."):
        inlined, keep = capture
        proxies = [value for value in tree_leaves((args, kwargs)) if isinstance(value, torch.fx.Proxy)]
        if keep and proxies and _representable((args, kwargs)):
            return proxies[0].tracer.create_proxy("call_function", FunctionCall(cls), args, kwargs)
        if (proxies or not keep) and cls not in inlined:  # traced through: its backward is lost
            inlined.append(cls)
    return _ORIGINAL_APPLY.__func__(cls, *args, **kwargs)


@contextmanager
def autograd_functions(keep: bool) -> Iterator[list[type[torch.autograd.Function]]]:
    """While active in this thread, report the Functions the capture traces through (their ``backward`` is lost).

    ``keep=True`` (FX): a Function applied to proxies becomes one call node instead, where
    generated code can spell its other arguments. ``keep=False`` (torch.export, which
    inlines every Function): every Function applied is reported. ``Function.apply`` is
    replaced for the whole process while any thread uses this (as FX patches functions
    while it traces); other threads get the original behaviour.
    """
    global _users
    inlined: list[type[torch.autograd.Function]] = []
    with _LOCK:
        if _users == 0:
            torch.autograd.Function.apply = classmethod(_apply)  # type: ignore[method-assign,assignment]
        _users += 1
    outer = getattr(_active, "capture", None)
    _active.capture = (inlined, keep)
    try:
        yield inlined
    finally:
        _active.capture = outer
        with _LOCK:
            _users -= 1
            if _users == 0:
                torch.autograd.Function.apply = _ORIGINAL_APPLY  # type: ignore[method-assign]
