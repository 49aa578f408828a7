"""Sparse kernels for frozen linear layers: the layouts, how to store a weight in one, and
which one is fastest on this machine.

Nothing here edits a graph. :func:`choose` turns frozen weights into a pure-data decision
per parameter (a :class:`LayoutChoice`), measured or forced; ``_rewrite.use_layouts`` carries
it out, and ``fxsparse.layouts`` reads it back from the graph's node meta.

On CPU, ``torch.sparse`` CSR with int32 indices beats a dense ``F.linear`` from about 70-90 %
sparsity on (``torch.mv`` for a single row, ``torch.mm`` on the transposed input otherwise;
``F.linear`` on a CSR weight is several times slower than both), and loses badly below it,
so ``"auto"`` measures instead of guessing.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ._compat import semi_structured_shape_constraints
from ._errors import MaskError, describe
from ._runtime.sparse_ops import bsr_linear, csr_linear
from ._sparsity import pattern_of, uniform_blocks
from ._tags import tag_of

__all__ = [
    "LAYOUTS",
    "MARGIN",
    "LayoutChoice",
    "blocksize_of",
    "check_layout",
    "choose",
    "layouts_in",
    "quiet_sparse_warnings",
    "sparse_parts",
]

LAYOUTS: dict[str, str] = {
    "dense": "the folded dense weight and F.linear: outputs equal the masked model's bit for bit",
    "auto": "per linear layer, the fastest of dense and every sparse layout its mask allows, measured here",
    "csr": "compressed sparse rows with int32 indices (torch.mv for one input row, torch.mm otherwise)",
    "bsr": "blocked sparse rows, for block masks (torch.mm); the block is the largest the mask is made of",
    "semi_structured": "2:4 sparsity on NVIDIA GPUs (torch.sparse.to_sparse_semi_structured, float16/bfloat16)",
}
SPARSE_LAYOUTS = ("csr", "bsr", "semi_structured")
MARGIN = 1.1
"""``"auto"`` keeps a sparse kernel only if it measured at least this much faster than dense."""
DEFAULT_ROWS = (1, 64)
"""Input rows measured at when no example inputs are given: one token, and a batch."""
_MOST_DENSE = 0.9  # above this density no sparse kernel wins (measured: CSR is 2x slower at 50 %)
_BLOCKS = (64, 32, 16, 8, 4)
_SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LayoutChoice:
    """How ``freeze`` stores one masked linear weight, and why.

    Attributes:
        param: the parameter's name.
        layout: what the graph runs: ``"dense"``, ``"csr"``, ``"bsr"`` or ``"semi_structured"``.
        speedup: dense time ÷ the chosen layout's time, as measured by ``layout="auto"``
            (the lowest over the input sizes measured); ``None`` where nothing was measured.
        measured: each layout tried → its speed-up over dense.
        rows: the input rows (batch × tokens) the measurement ran at.
        density: the fraction of the weight that is nonzero.
        note: why the layer stayed dense, or which layer's measurement was reused.
    """

    param: str
    layout: str
    speedup: float | None = None
    measured: Mapping[str, float] = field(default_factory=dict, hash=False)
    rows: tuple[int, ...] = ()
    density: float = 1.0
    note: str = ""

    def as_meta(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "speedup": self.speedup,
            "measured": dict(self.measured),
            "rows": list(self.rows),
            "density": self.density,
            "note": self.note,
        }

    @classmethod
    def from_meta(cls, param: str, meta: Mapping[str, Any]) -> LayoutChoice:
        return cls(
            param=param,
            layout=str(meta["layout"]),
            speedup=meta.get("speedup"),
            measured=dict(meta.get("measured", {})),
            rows=tuple(meta.get("rows", ())),
            density=float(meta.get("density", 1.0)),
            note=str(meta.get("note", "")),
        )

    def __str__(self) -> str:
        speed = "" if self.speedup is None else f" ×{self.speedup:.2f}"
        return f"{self.layout}{speed}"


def layouts_in(graph: Any) -> dict[str, LayoutChoice]:
    """The choices recorded in a frozen graph's node meta (on its linear calls)."""
    found: dict[str, LayoutChoice] = {}
    for node in graph.nodes:
        tag = tag_of(node)
        if node.op == "call_function" and tag is not None and tag.choice is not None:
            found.setdefault(str(tag.param), LayoutChoice.from_meta(str(tag.param), tag.choice))
    return found


@contextmanager
def quiet_sparse_warnings() -> Iterator[None]:
    """Silence torch's once-per-process notes that sparse CSR/BSR tensors are in beta."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse (CSR|BSR|CSC|BSC) tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        yield


def blocksize_of(mask: torch.Tensor) -> int | None:
    """The largest square block (64 down to 4) a 2-D ``mask`` is made of and whose size divides
    both dimensions (BSR needs that), or None."""
    kept = mask.detach().to("cpu") != 0
    height, width = kept.shape
    for size in _BLOCKS:
        if height % size == 0 and width % size == 0 and uniform_blocks(kept, size, size):
            return size
    return None


def sparse_parts(weight: torch.Tensor, layout: str, blocksize: int | None = None) -> dict[str, torch.Tensor]:
    """``weight`` (2-D, dense, zeros where pruned) as the tensors ``csr_linear``/``bsr_linear`` take:
    ``crow_indices`` and ``col_indices`` (int32) and ``values``."""
    dense = weight.detach()
    with quiet_sparse_warnings():
        if layout == "csr":
            sparse = dense.to_sparse_csr()
        elif layout == "bsr":
            if blocksize is None:
                raise ValueError("bsr needs a block size")
            sparse = dense.to_sparse_bsr((blocksize, blocksize))
        else:
            raise ValueError(f"no parts for layout {layout!r}")
    # Copies: views of a sparse tensor's parts keep it as their base, which torch.compile trips over.
    return {
        "crow_indices": sparse.crow_indices().to(torch.int32, copy=True),
        "col_indices": sparse.col_indices().to(torch.int32, copy=True),
        "values": sparse.values().clone(),
    }


def _semi_structured_class() -> Any:
    """The backend ``to_sparse_semi_structured`` would use: cuSPARSELt, or CUTLASS where torch was
    built without cuSPARSELt (as torch's own tests choose it)."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cusparselt = getattr(torch.backends, "cusparselt", None)
    available = cusparselt is not None and cusparselt.is_available()
    return SparseSemiStructuredTensorCUSPARSELT if available else SparseSemiStructuredTensorCUTLASS


def semi_structured(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as a ``SparseSemiStructuredTensor`` (CUDA, float16/bfloat16, a 2:4 mask)."""
    return _semi_structured_class().from_dense(weight.detach().contiguous())  # type: ignore[no-any-return]


def _semi_structured_shape_problem(weight: torch.Tensor) -> str:
    constraints = semi_structured_shape_constraints(_semi_structured_class(), weight.dtype)
    if constraints is None:
        return f"it is {weight.dtype}; 2:4 kernels take float16 or bfloat16"
    rows, columns = constraints.sparse_min_rows, constraints.sparse_min_cols
    height, width = weight.shape
    if height % rows or width % columns:
        return f"its {tuple(weight.shape)} shape is not a multiple of ({rows}, {columns}), which 2:4 kernels need"
    return ""


@dataclass(frozen=True)
class Candidate:
    """One masked linear weight ``choose`` decides for."""

    param: str
    weight: torch.Tensor  # frozen: mask * weight
    bias: torch.Tensor | None
    mask: torch.Tensor
    rows: tuple[int, ...]
    blocked: str = ""  # why it cannot change layout ("also read by embedding"), or ""

    @functools.cached_property
    def pattern(self) -> str:
        return pattern_of(self.mask) if self.mask.dim() == 2 else "unstructured"

    @functools.cached_property
    def blocksize(self) -> int | None:
        return blocksize_of(self.mask)


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise MaskError(f"layout must be one of {', '.join(repr(name) for name in LAYOUTS)}, got {layout!r}")


def choose(candidates: Sequence[Candidate], layout: str) -> dict[str, LayoutChoice]:
    """The layout of each candidate: forced (every candidate that can take ``layout``), or
    measured (``"auto"``: the fastest, if at least :data:`MARGIN` × dense's speed)."""
    check_layout(layout)
    if layout == "auto":
        cache: dict[tuple[Any, ...], tuple[str, dict[str, float]]] = {}
        return {c.param: _measured_choice(c, cache) for c in candidates}
    refusals = [f"{c.param}: {why}" for c in candidates if (why := _cannot(c, layout))]
    if refusals:
        raise MaskError(
            f"layout={layout!r} cannot run {len(refusals)} of the masked linear weights; " + "; ".join(refusals)
        )
    return {
        c.param: LayoutChoice(
            c.param, "dense" if c.blocked else layout, None, {}, (), _density(c), c.blocked or f"layout={layout!r}"
        )
        for c in candidates
    }


def _cannot(c: Candidate, layout: str) -> str:
    """Why ``c`` cannot be stored in ``layout``, or ``""``."""
    if layout in ("dense", "auto") or c.blocked:
        return ""
    if c.weight.dim() != 2:
        return f"a {c.weight.dim()}-D weight"
    if layout == "bsr" and c.blocksize is None:
        return (
            f"its {c.pattern} mask is not made of square blocks (4x4 to 64x64) that divide its "
            f"{tuple(c.weight.shape)} shape; use 'csr' or 'auto'"
        )
    if layout == "semi_structured":
        if not c.weight.is_cuda:
            return f"2:4 semi-structured kernels need a CUDA weight, this one is on {c.weight.device}"
        if c.pattern != "2:4":
            return f"its mask is {c.pattern}, not 2:4"
        if c.weight.dtype not in _SEMI_STRUCTURED_DTYPES:
            return f"it is {c.weight.dtype}; 2:4 kernels take float16 or bfloat16"
        return _semi_structured_shape_problem(c.weight)
    if layout in ("csr", "bsr") and c.weight.dtype not in (torch.float32, torch.float64) and not c.weight.is_cuda:
        return f"it is {c.weight.dtype}; torch's CPU sparse kernels take float32 or float64"
    return ""


def _density(c: Candidate) -> float:
    return int(torch.count_nonzero(c.weight)) / max(c.weight.numel(), 1)


def _measured_choice(c: Candidate, cache: dict[tuple[Any, ...], tuple[str, dict[str, float]]]) -> LayoutChoice:
    density = _density(c)
    if c.blocked:
        return LayoutChoice(c.param, "dense", None, {}, c.rows, density, c.blocked)
    layouts = [name for name in SPARSE_LAYOUTS if not _cannot(c, name)]
    if density > _MOST_DENSE or not layouts:
        why = (
            f"density {density:.2f}: too dense for a sparse kernel to win"
            if layouts
            else "no sparse layout fits this weight"
        )
        return LayoutChoice(c.param, "dense", None, {}, c.rows, density, why)
    w = c.weight
    key = (tuple(w.shape), w.dtype, w.device, c.rows, tuple(layouts), round(density, 2), c.blocksize)
    note = ""
    if key in cache:
        source, measured = cache[key]
        note = f"measured on {source}, of the same shape and density"
    else:
        measured, failed = _measure(c, layouts)
        best = max(measured, key=measured.__getitem__, default="dense")
        if best != "dense" and measured[best] >= MARGIN:
            # A second, independent look at the winner: a busy machine can flatter one round.
            again, _ = _measure(c, [best])
            measured[best] = min(measured[best], again.get(best, 0.0))
        note = "; ".join(f"{layout} could not run here ({why})" for layout, why in failed.items())
        cache[key] = (c.param, measured)
    best = max(measured, key=measured.__getitem__, default="dense")
    if best == "dense" or measured[best] < MARGIN:
        best_note = f"no sparse kernel was {MARGIN:.1f}x faster than dense" if measured else ""
        return LayoutChoice(
            c.param, "dense", 1.0, measured, c.rows, density, "; ".join(filter(None, [best_note, note]))
        )
    return LayoutChoice(c.param, best, measured[best], measured, c.rows, density, note)


def _measure(c: Candidate, layouts: Sequence[str]) -> tuple[dict[str, float], dict[str, str]]:
    """Each layout's speed-up over dense ``F.linear`` (the lowest over ``c.rows``), and the
    layouts this build of torch could not run on this weight, with the reason."""
    w, bias = c.weight.detach(), None if c.bias is None else c.bias.detach()
    runs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    failed: dict[str, str] = {}
    for layout in layouts:
        try:
            runs[layout] = _runner(w, bias, layout, c.blocksize)
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            failed[layout] = describe(exc).splitlines()[0]
    speedups = {layout: math.inf for layout in runs}
    for rows in c.rows:
        x = torch.randn(rows, w.shape[1], dtype=w.dtype, device=w.device)
        times = _median_times(
            {"dense": _bind(lambda x: F.linear(x, w, bias), x), **{k: _bind(f, x) for k, f in runs.items()}}, w
        )
        for layout in runs:
            speedups[layout] = min(speedups[layout], times["dense"] / times[layout])
    return {layout: round(s, 3) for layout, s in speedups.items() if math.isfinite(s)}, failed


def _bind(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: run(x)


def _runner(
    w: torch.Tensor, bias: torch.Tensor | None, layout: str, blocksize: int | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    if layout == "semi_structured":
        sparse = semi_structured(w)
        return lambda x: F.linear(x, sparse, bias)
    parts = sparse_parts(w, layout, blocksize)
    kernel = csr_linear if layout == "csr" else bsr_linear
    out_features, in_features = w.shape
    with quiet_sparse_warnings():
        kernel(
            torch.zeros(1, w.shape[1], dtype=w.dtype, device=w.device),
            parts["crow_indices"],
            parts["col_indices"],
            parts["values"],
            bias,
            out_features,
            in_features,
        )
    return lambda x: kernel(
        x, parts["crow_indices"], parts["col_indices"], parts["values"], bias, out_features, in_features
    )


def _nothing() -> None:
    pass


def _median_times(runs: Mapping[str, Callable[[], Any]], like: torch.Tensor, rounds: int = 7) -> dict[str, float]:
    """Median seconds per call of each run, measured in interleaved rounds (so drift hits all alike)."""
    synchronize: Callable[[], None] = torch.cuda.synchronize if like.is_cuda else _nothing
    loops = {}
    for name, run in runs.items():
        run()
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        loops[name] = max(1, min(1000, int(2e-3 / max(time.perf_counter() - start, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in runs}
    forward = list(runs.items())
    for round_ in range(rounds):
        for name, run in forward if round_ % 2 else forward[::-1]:  # no run always follows the same other
            start = time.perf_counter()
            for _ in range(loops[name]):
                run()
            synchronize()
            samples[name].append((time.perf_counter() - start) / loops[name])
    return {name: sorted(times)[len(times) // 2] for name, times in samples.items()}
