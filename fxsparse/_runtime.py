"""Functions and modules that rewritten graphs call at run time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

__all__ = ["InputGuards", "call_with_parameters"]


def call_with_parameters(module: nn.Module, parameters: dict[str, torch.Tensor], /, *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)`` with some of its parameters replaced for the call.

    The rewrite calls a module whose ``forward`` cannot be traced this way, with the
    ``mask * weight`` products in place of its masked parameters (what
    ``torch.func.functional_call`` does, minus its refusal to run under ``torch.jit.trace``).
    """
    proxy = next((a for a in (*parameters.values(), *args, *kwargs.values()) if isinstance(a, torch.fx.Proxy)), None)
    if proxy is not None:  # a GraphModule's code being traced again (unpickling): stay one call
        return proxy.tracer.create_proxy("call_function", call_with_parameters, (module, parameters, *args), kwargs)
    with _reparametrize_module(module, dict(parameters)):
        return module(*args, **kwargs)


class InputGuards(nn.Module):
    """Checks the shapes of the inputs of a graph captured by ``torch.export``.

    An exported graph is only valid for the shapes it was exported for: every dimension
    not made dynamic is fixed at its example size (a graph that reshapes to
    ``[-1, 8]`` would silently compute garbage on other sizes). ``torch.export``
    checks them with generated code that cannot be pickled; this module keeps the
    same checks as plain data: a size per static dimension, a symbol with its allowed
    range per dynamic one (one symbol shared by several dimensions means equal sizes).
    """

    def __init__(
        self,
        inputs: Sequence[tuple[str, tuple[int | str | None, ...] | None]],
        ranges: Mapping[str, tuple[int, int | None]],
    ) -> None:
        super().__init__()
        self.inputs = list(inputs)
        self.ranges = dict(ranges)

    def forward(self, *args: Any) -> None:
        if torch.jit.is_tracing():  # type: ignore[attr-defined,no-untyped-call]
            return  # sizes are constants of a TorchScript trace anyway
        seen: dict[str, tuple[str, int, Any]] = {}
        for (name, dims), value in zip(self.inputs, args, strict=True):
            if dims is None:
                continue
            if not isinstance(value, torch.Tensor) or value.dim() != len(dims):
                got = f"{value.dim()} dimensions" if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"input {name!r} must be a tensor with {len(dims)} dimensions, got {got}")
            for axis, (expected, size) in enumerate(zip(dims, value.shape, strict=True)):
                if isinstance(expected, int) and size != expected:
                    raise ValueError(
                        f"input {name!r} has size {size} in dimension {axis}, but the model was exported with that "
                        f"dimension fixed at {expected}; pass dynamic_shapes to fxsparse.transform to make it dynamic"
                    )
                if isinstance(expected, str):
                    low, high = self.ranges.get(expected, (0, None))
                    if size < low or (high is not None and size > high):
                        allowed = f"[{low}, {'inf' if high is None else high}]"
                        raise ValueError(
                            f"input {name!r} has size {size} in dimension {axis}, outside the range {allowed} "
                            "it was exported for"
                        )
                    first = seen.setdefault(expected, (name, axis, size))
                    if first[2] != size:
                        raise ValueError(
                            f"input {name!r} has size {size} in dimension {axis}, but it must equal dimension "
                            f"{first[1]} of input {first[0]!r} (size {first[2]}), as when it was exported"
                        )

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: {dims}" for name, dims in self.inputs)
