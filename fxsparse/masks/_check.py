"""Check masks before (or after) using them: a report per parameter, problems as sentences.

``check`` never raises for a bad mask: it says what is wrong with each, so that a user
with a mask file from elsewhere sees every problem at once rather than the first
``MaskError`` ``transform`` would raise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.export
from torch import nn

from .._errors import MaskError
from .._plan import MaskedParameter, NameIndex, build_plan, check_buffer_names, normalize_mask, resolve_key
from .._sparsity import density_of, holder_types, input_axis_of, pattern_of, uniform_blocks
from ._importers import mask_buffers, require_module

__all__ = ["CheckReport", "MaskCheck", "check", "printable"]


@dataclass(frozen=True)
class MaskCheck:
    """One mask: what it is, and what is wrong with it (``problems``, empty when fine)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    device: str
    density: float | None  # None when it cannot be computed (meta tensors, wrong types)
    binary: bool | None
    pattern: str | None
    problems: tuple[str, ...]


@dataclass(frozen=True)
class CheckReport:
    """Every mask checked; ``ok`` when none has a problem."""

    masks: tuple[MaskCheck, ...]
    problems: tuple[str, ...]  # every problem, each naming its parameter

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        """The table a terminal shows; names and problems come from a mask file, so control
        characters in them are escaped (``\\x1b``): none can move the cursor or fake a row."""
        lines = [f"{'parameter':<40} {'shape':<14} {'dtype':<14} {'device':<8} {'density':>7}  {'binary':<6} pattern"]
        for entry in self.masks:
            density = "-" if entry.density is None else f"{entry.density:.3f}"
            binary = "-" if entry.binary is None else ("yes" if entry.binary else "no")
            shape = "×".join(map(str, entry.shape))
            lines.append(
                f"{printable(entry.name):<40} {shape:<14} {printable(entry.dtype):<14} {printable(entry.device):<8} "
                f"{density:>7}  {binary:<6} {entry.pattern or '-'}"
            )
        lines.append(
            f"{len(self.masks)} masks, " + (f"{len(self.problems)} problems:" if self.problems else "no problems")
        )
        lines += [f"  - {printable(problem)}" for problem in self.problems]
        return "\n".join(lines)


def printable(text: str, *, keep: str = "") -> str:
    """``text`` with every character a terminal would act on (escape codes, carriage returns,
    newlines, bidirectional overrides) written as Python writes it in a repr, ``\\x1b``; those
    in ``keep`` stay as they are."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)


def check(
    model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None, *, pattern: str | None = None
) -> CheckReport:
    """Check ``masks`` against ``model`` (or, without ``masks``, the masks ``model`` applies:
    fxsparse's output, or a module with ``FakeSparsity`` parametrizations).

    For each mask: shape, dtype, device, density, whether it is binary, and its pattern
    (read along the weight's input dimension). Problems: a key that names no parameter,
    a shape or dtype ``transform`` refuses, NaN or infinite values, two keys for one tied
    parameter, and, given ``pattern`` (``"2:4"``, ``"block 4x4"``), a mask that does not
    follow it (an N:M mask may keep fewer than N of a group, as sparse kernels allow).

    Example:
        >>> import torch, fxsparse
        >>> model = torch.nn.Linear(8, 2)
        >>> report = fxsparse.check(model, {"weight": torch.tensor([[1, 1, 0, 0] * 2] * 2)}, pattern="2:4")
        >>> report.ok, report.masks[0].pattern
        (True, 'columns')
        >>> fxsparse.check(model, {"wieght": torch.ones(2, 8)}).problems[0]
        "mask key 'wieght' names no parameter or module of the model; closest valid names: 'weight'"
    """
    if isinstance(model, torch.export.ExportedProgram):
        raise MaskError("check takes the model, or fxsparse's emit='graph' output; for an exported program, check that")
    require_module(model, "check")
    expected = _pattern(pattern) if pattern is not None else None
    own = masks is None  # the masks a transformed model applies: already accepted by transform
    if masks is None:
        masks = {name: buffer for name, (_, buffer) in mask_buffers(model).items()}
    if not isinstance(masks, Mapping):
        problem = f"masks must be a mapping from parameter or module names to tensors, got {type(masks).__name__}"
        return CheckReport((), (problem,))
    holders = holder_types(model)
    # What build_plan checks of one key, with the model indexed once: a plan per key cost
    # the whole model's walk per key (17 s at 2,000 layers).
    parameter_by_name = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules(remove_duplicate=False))
    names = NameIndex(parameter_by_name, modules, model)  # keys naming nothing: a lookup each, not a search
    entries = []
    problems: list[str] = []
    accepted: dict[str, torch.Tensor] = {}
    for key, mask in masks.items():
        found: list[str] = []
        try:
            name = key if own else resolve_key(key, parameter_by_name, modules, model, names)
            if not own:
                normalized = normalize_mask(key, mask, name, parameter_by_name[name])
                check_buffer_names((MaskedParameter(name, (name,), normalized),), modules)
                accepted[key] = mask
        except MaskError as error:
            found.append(str(error))
            name = str(key)
        except Exception as error:  # never raised: check reports every problem at once
            found.append(f"{key!r}: {type(error).__name__}: {error}")
            name = str(key)
        if not isinstance(mask, torch.Tensor):
            entries.append(MaskCheck(name, (), type(mask).__name__, "-", None, None, None, tuple(found)))
            problems += found
            continue
        density = binary = kind = None
        if not mask.is_meta and not found:  # what transform refuses is the problem to fix first
            try:
                values = _countable(mask.detach())
                if values.is_floating_point() and not bool(torch.isfinite(values).all()):
                    found.append(f"mask for {name!r} holds NaN or infinite values")
                elif not values.is_complex():
                    density = density_of(values)
                    binary = values.dtype == torch.bool or bool(((values == 0) | (values == 1)).all())
                    axis = input_axis_of(holders.get(name)) if values.dim() > 1 else 0
                    kind = pattern_of(values, axis)
                    if expected is not None and values.dim() < 2:
                        found.append(
                            f"mask for {name!r} is {values.dim()}-D: {pattern} applies to weights of 2 or more"
                        )
                    elif expected is not None and not _follows(values, expected, axis):
                        found.append(f"mask for {name!r} does not follow {pattern} (it is {kind})")
            except Exception as error:  # a tensor kind torch cannot count: said, never raised (as documented)
                found.append(f"cannot read the values of the mask for {name!r}: {type(error).__name__}: {error}")
        entries.append(MaskCheck(name, tuple(mask.shape), str(mask.dtype).removeprefix("torch."), str(mask.device),
                                 density, binary, kind, tuple(found)))  # fmt: skip
        problems += found
    if accepted:
        try:
            build_plan(model, accepted)  # what only shows across keys: two keys for one tied parameter
        except MaskError as error:
            problems.append(str(error))
    return CheckReport(tuple(entries), tuple(problems))


# The dtypes torch's reductions (count_nonzero, isfinite, all) implement on every device.
_COUNTABLE = frozenset({torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                        torch.bfloat16, torch.float32, torch.float64})  # fmt: skip


def _countable(values: torch.Tensor) -> torch.Tensor:
    """``values`` in a dtype torch can count and compare: float8 and unsigned 16 to 64-bit masks,
    which ``transform`` accepts, become float64, exactly for every float8 and 32-bit value, and
    with 0, 1 and NaN kept as such (all density, binary and pattern read) for 64-bit ones."""
    return values if values.dtype in _COUNTABLE else values.to(torch.float64)


def _pattern(pattern: str) -> tuple[str, int, int]:
    """``("n:m", n, m)`` or ``("block", rows, columns)`` from ``"2:4"`` or ``"block 4x4"``."""
    n_m = re.fullmatch(r"(\d+):(\d+)", pattern)
    if n_m and 0 <= int(n_m.group(1)) <= int(n_m.group(2)) and int(n_m.group(2)) > 0:
        return "n:m", int(n_m.group(1)), int(n_m.group(2))
    block = re.fullmatch(r"block (\d+)x(\d+)", pattern)
    if block and int(block.group(1)) > 0 and int(block.group(2)) > 0:
        return "block", int(block.group(1)), int(block.group(2))
    raise MaskError(
        f"pattern must be 'N:M' with 0 <= N <= M (such as '2:4') or 'block RxC' (such as 'block 4x4'), got {pattern!r}"
    )


def _follows(mask: torch.Tensor, pattern: tuple[str, int, int], axis: int) -> bool:
    """Whether ``mask`` can run as ``pattern``: at most N kept of every M along the input, or
    blocks (of ``[out, in * kernel]``, cut short at the edges) each all kept or all pruned."""
    kind, first, second = pattern
    kept = mask != 0
    if kind == "n:m":
        moved = kept.movedim(axis, -1)
        return moved.shape[-1] % second == 0 and bool((moved.reshape(-1, second).sum(dim=1) <= first).all())
    return uniform_blocks(kept.reshape(kept.shape[0], -1), first, second)
