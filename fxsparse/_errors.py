"""The exceptions fxsparse raises.

Every error fxsparse raises on purpose is an ``FxsparseError``, and also a builtin
exception of the kind a caller would expect, so ``except ValueError`` keeps working::

    FxsparseError
     ├── MaskError(ValueError)    a mask or mask key is wrong: names nothing, wrong shape,
     │                            not a tensor, NaN/inf, ...
     ├── TraceError(RuntimeError) the model cannot be captured as an FX graph
     └── EmitError(ValueError, RuntimeError)
                                  the requested output (emit=...) cannot be produced:
                                  a wrong argument, or the backend refused the graph
"""

from __future__ import annotations

__all__ = ["EmitError", "FxsparseError", "MaskError", "TraceError"]


class FxsparseError(Exception):
    """Root of every error fxsparse raises on purpose."""


class MaskError(FxsparseError, ValueError):
    """A mask, or the key naming its parameter, is not usable."""


class TraceError(FxsparseError, RuntimeError):
    """The model cannot be captured as a ``torch.fx`` graph."""


class EmitError(FxsparseError, ValueError, RuntimeError):
    """The requested output format cannot be produced (bad ``emit`` arguments or a backend refusal)."""
