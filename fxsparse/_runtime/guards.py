"""Input checks of graphs captured by ``torch.export``: :class:`InputGuards` and the input-structure hook."""

from __future__ import annotations

import functools
import math
import reprlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from .._compat import codegen_of, sympy_interp, tree_structure

__all__ = ["InputGuards", "check_input_structure"]


class InputGuards(nn.Module):
    """Checks the inputs of a graph captured by ``torch.export`` against those it was exported for.

    An exported graph is only valid for the inputs it was exported with: every dimension
    not made dynamic is fixed at its example size (a graph that reshapes to ``[-1, 8]``
    would silently compute garbage on other sizes), every non-tensor input at its example
    value, and train or eval mode at the mode the model was in (dropout and batch norm are
    baked into the graph). This module checks them, as plain data: per tensor input a size
    per static dimension and a symbol per dynamic one (its range in ``ranges``; one symbol
    shared by several dimensions means equal sizes), per non-tensor input its value; then
    the conditions torch.export recorded (``checks``: Python source over the flat inputs,
    for relations the above cannot express). Under ``torch.jit.trace`` the size checks are
    recorded into the trace as TorchScript calls.
    """

    def __init__(
        self,
        inputs: Sequence[tuple[str, str, Any]],
        ranges: Mapping[str, tuple[int, int | None]],
        training: bool,
        checks: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__()
        self.inputs = list(inputs)  # (name, "tensor" | "value" | "any", dimensions | example value | None)
        self.ranges = dict(ranges)
        self.exported_training = training
        self.train(training)
        # torch.export's own guards, as (Python over ``args``, text): see _capture._torch_guards.
        self.checks = list(checks)
        self.conditions = tuple(condition for condition, _ in self.checks)  # the key of their compiled function

    def forward(self, *args: Any) -> None:
        if self.training != self.exported_training:
            exported, now = ("train", "eval") if self.exported_training else ("eval", "train")
            raise ValueError(
                f"the model was captured with torch.export in {exported} mode, which its graph keeps (dropout, "
                f"batch norm); it cannot run in {now} mode: transform the model in {now} mode instead"
            )
        tracing = torch.jit.is_tracing()  # type: ignore[attr-defined,no-untyped-call]
        seen: dict[str, tuple[str, int, torch.Tensor]] = {}
        for (name, kind, expected), value in zip(self.inputs, args, strict=True):
            if kind == "value" and not tracing and not _same_value(value, expected):
                raise ValueError(
                    f"input {name!r} is {reprlib.repr(value)}, but the model was exported with {name}={expected!r}, "
                    "which its graph keeps: transform it again with the value you need"
                )
            if kind != "tensor":
                continue
            if not isinstance(value, torch.Tensor) or value.dim() != len(expected):
                got = f"{value.dim()} dimensions" if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"input {name!r} must be a tensor with {len(expected)} dimensions, got {got}")
            for axis, dimension in enumerate(expected):
                if isinstance(dimension, int):
                    self._check_size(name, value, axis, dimension, dimension, tracing)
                elif isinstance(dimension, str):
                    low, high = self.ranges.get(dimension, (0, None))
                    self._check_size(name, value, axis, low, high, tracing)
                    first = seen.setdefault(dimension, (name, axis, value))
                    self._check_same_size(first, name, value, axis, tracing)
        if self.checks and not tracing:
            failed = _compiled_checks(self.conditions)(*args)
            if failed >= 0:
                raise ValueError(
                    f"the inputs fail a condition of the graph torch.export captured: {self.checks[failed][1]}"
                )

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: {expected}" for name, kind, expected in self.inputs if kind != "any")

    @staticmethod
    def _check_size(name: str, value: torch.Tensor, axis: int, low: int, high: int | None, tracing: bool) -> None:
        size = value.shape[axis]
        if not tracing and low <= size and (high is None or size <= high):
            return
        allowed = f"size {low}" if low == high else f"a size in [{low}, {'inf' if high is None else high}]"
        before = f"input {name!r} has size "
        after = f" in dimension {axis}, but must have {allowed}, as when it was exported"
        if low == high:
            after += " (pass dynamic_shapes to fxsparse.transform to make it dynamic)"
        if tracing:
            _scripted_checks()[0](value, axis, low, -1 if high is None else high, before, after)
        else:
            raise ValueError(f"{before}{size}{after}")

    @staticmethod
    def _check_same_size(
        first: tuple[str, int, torch.Tensor], name: str, value: torch.Tensor, axis: int, tracing: bool
    ) -> None:
        first_name, first_axis, first_value = first
        if not tracing and value.shape[axis] == first_value.shape[first_axis]:
            return
        before = f"input {name!r} has size "
        after = (
            f" in dimension {axis}, but must have the size of dimension {first_axis} of input {first_name!r}, "
            "as when it was exported"
        )
        if tracing:
            _scripted_checks()[1](first_value, first_axis, value, axis, before, after)
        else:
            raise ValueError(f"{before}{value.shape[axis]}{after} ({first_value.shape[first_axis]})")


def _same_value(value: Any, expected: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return False
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(value, float) and math.isnan(value)
    return bool(value == expected)


@functools.lru_cache(maxsize=256)
def _compiled_checks(conditions: tuple[str, ...]) -> Any:
    """One function over the flat inputs returning the index of the first condition that fails, or -1."""
    lines = ["def checks(*args):"]
    lines += [f"    if not ({condition}):\n        return {index}" for index, condition in enumerate(conditions)]
    lines.append("    return -1")
    namespace: dict[str, Any] = {**sympy_interp(), "math": math, "inf": math.inf, "torch": torch}
    exec(compile("\n".join(lines), "<fxsparse input checks>", "exec"), namespace)
    return namespace["checks"]


def check_input_structure(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Forward pre-hook of a graph captured by ``torch.export``: every input it was captured with is given,
    with the structure it had.

    The graph reads every input it was exported with (Python's own error would not say how to
    leave one out), and the leaves of each list, tuple or dict input as exported: this refuses
    one whose structure differs (an extra item would otherwise be ignored without a word).
    """
    info: Any = codegen_of(module.graph).pytree_info  # type: ignore[arg-type,attr-defined]
    positional, keywords = info.in_spec.children()
    expected = dict(zip(info.orig_args, positional.children(), strict=False))
    expected.update(zip(keywords.context, keywords.children(), strict=True))
    given = dict(zip(info.orig_args, args, strict=False))
    given.update(kwargs)
    missing = [name for name in info.orig_args if name not in given]
    if missing:
        raise TypeError(
            f"missing input {missing[0]!r}: the model was captured with torch.export with {missing[0]!r} given, and "
            f"its graph reads it. Pass it, or transform again with example_inputs/example_kwargs that leave it out "
            "(the graph is then captured without it)"
        )
    for name, spec in expected.items():
        if not spec.is_leaf() and name in given:
            structure = tree_structure(given[name])
            if structure != spec:
                raise ValueError(
                    f"input {name!r} must have the structure the model was exported with, {spec}, got {structure}"
                )


def _size_in(value: torch.Tensor, axis: int, low: int, high: int, before: str, after: str) -> torch.Tensor:
    size = value.size(axis)
    if size < low or (high >= 0 and size > high):
        raise ValueError(before + str(size) + after)
    return value


def _same_size(
    first: torch.Tensor, first_axis: int, value: torch.Tensor, axis: int, before: str, after: str
) -> torch.Tensor:
    if value.size(axis) != first.size(first_axis):
        raise ValueError(before + str(value.size(axis)) + after + " (" + str(first.size(first_axis)) + ")")
    return value


@functools.cache
def _scripted_checks() -> tuple[Any, Any]:
    """The size checks as TorchScript functions: ``torch.jit.trace`` records a call to one (sizes it would bake in)."""
    return torch.jit.script(_size_in), torch.jit.script(_same_size)
