"""The exceptions fxsparse raises.

Every error fxsparse raises on purpose is an ``FxsparseError``, and also a builtin
exception of the kind a caller would expect, so ``except ValueError`` keeps working::

    FxsparseError
     ├── MaskError(ValueError)    a mask or mask key is wrong: names nothing, wrong shape,
     │                            not a tensor, NaN/inf, ...
     ├── TraceError(RuntimeError) the model cannot be captured as an FX graph (by
     │                            torch.fx tracing or torch.export), or capture
     │                            arguments are wrong
     └── EmitError(ValueError, RuntimeError)
                                  the requested output (emit=...) cannot be produced:
                                  a wrong argument, or the backend refused the graph
"""

from __future__ import annotations

import re

__all__ = ["EmitError", "FxsparseError", "MaskError", "TraceError", "describe", "percent_hint"]

_TERMINAL_COLOURS = re.compile(r"\x1b\[[0-9;]*m")


class FxsparseError(Exception):
    """Root of every error fxsparse raises on purpose."""


class MaskError(FxsparseError, ValueError):
    """A mask, or the key naming its parameter, is not usable."""


class TraceError(FxsparseError, RuntimeError):
    """The model cannot be captured as a ``torch.fx`` graph (by FX tracing or by ``torch.export``)."""


class EmitError(FxsparseError, ValueError, RuntimeError):
    """The requested output format cannot be produced (bad ``emit`` arguments or a backend refusal)."""


def percent_hint(value: object) -> str:
    """What to write instead of a sparsity given in percent (``50`` for ``0.5``), or ``""``."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 1 < value <= 100:
        return f": a fraction, so {value / 100:g} for {value:g} %"
    return ""


def describe(exc: BaseException) -> str:
    """``"Type: message"`` of an error fxsparse wraps, without the terminal colour codes torch puts in some."""
    return _TERMINAL_COLOURS.sub("", f"{type(exc).__name__}: {exc}").strip()
