"""2:4 sparsity on an NVIDIA GPU: torch's semi-structured kernels, and fxsparse end to end.

Prepared for one run on an NVIDIA GPU with 2:4 sparse tensor cores (Ampere SM8x, Hopper
SM9x such as H100/H200). Measures, with CUDA events, medians over interleaved rounds:

* ``kernels``: ``F.linear(x, W, b)`` in bfloat16 with ``W`` dense against ``W`` as
  ``torch.sparse.to_sparse_semi_structured(W)`` (2:4, from ``fxsparse.masks.n_m``), for
  weights (out × in) 4096², 8192², 16384², 4096 × 16384 and 16384 × 4096 and 1, 64 and
  2048 tokens, on each backend this GPU has: cuSPARSELt (the default, where
  ``torch.backends.cusparselt.is_available()``) and CUTLASS
  (``SparseSemiStructuredTensor._FORCE_CUTLASS = True``; its kernels are built for SM8x
  only, so it is skipped elsewhere). Speed-up = dense time ÷ sparse time (> 1 is faster),
  and the largest absolute difference from the dense output;
* ``mlp``: 4 × (Linear(8192, 8192) + ReLU), bfloat16, masked with
  ``fxsparse.masks.n_m(model, 2, 4)``: the dense model, the masked graph
  (``fxsparse.transform``), ``fxsparse.freeze(out)``, ``freeze(out, layout="semi_structured")``
  and ``freeze(out, layout="auto")`` (tuned at each token count), time ÷ dense.

torch's constraints (torch/sparse/semi_structured.py): CUDA only, 2-D contiguous weights;
cuSPARSELt takes float16/bfloat16 (rows and columns multiples of 16), int8 and float8
(multiples of 32); CUTLASS float16/bfloat16 (multiples of 32 × 64), float32, int8; the
dense input is padded to a multiple of 8 rows (float16/bfloat16), so 1 token costs as 8.

Writes JSON to ``--out`` (default ``$OUT/gpu.json`` when ``$OUT`` is set, else ``gpu.json``)
after each part, so a run cut short still leaves what it measured.
``python tools/bench_speed.py --docs --gpu-json gpu.json`` shows it in docs/performance.md.
Without CUDA it measures nothing, says so on stderr and exits with status 2. Usage::

    python tools/bench_gpu.py [--out gpu.json] [--quick] [--rounds 15]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fxsparse  # noqa: E402

NO_CUDA_EXIT = 2
SHAPES = ((4096, 4096), (8192, 8192), (16384, 16384), (4096, 16384), (16384, 4096))  # (out, in)
TOKENS = (1, 64, 2048)
MLP_WIDTH = 8192
MLP_LAYERS = 4


def bind(function: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """``function`` with its arguments bound now (not a late-binding closure over a loop variable)."""
    return lambda: function(*args)


def error_text(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def cuda_medians(functions: Mapping[str, Callable[[], Any]], rounds: int, inner: int) -> dict[str, float]:
    """Median seconds per call of each function: every round times each function (in a rotated
    order) over ``inner`` calls between two CUDA events."""
    names = list(functions)
    for name in names:  # warm up: cuBLAS/cuSPARSELt plans, allocator
        for _ in range(3):
            functions[name]()
    torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            function = functions[name]
            start.record()
            for _ in range(inner):
                function()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) / 1e3 / inner)
    return {name: statistics.median(values) for name, values in samples.items()}


def backends() -> dict[str, str]:
    """Backend name -> '' if usable here, else why not."""
    major, _ = torch.cuda.get_device_capability()
    cusparselt = torch.backends.cusparselt.is_available()
    return {
        "cusparselt": "" if cusparselt else "torch.backends.cusparselt.is_available() is False",
        "cutlass": "" if major == 8 else f"CUTLASS 2:4 kernels are built for SM8x only; this GPU is SM{major}x",
    }


def to_semi_structured(weight: torch.Tensor, backend: str) -> torch.Tensor:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        return to_sparse_semi_structured(weight.contiguous())
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = False


def bench_kernels(shapes: tuple[tuple[int, int], ...], tokens: tuple[int, ...], rounds: int) -> list[dict[str, Any]]:
    usable = backends()
    rows = []
    for out_features, in_features in shapes:
        torch.manual_seed(0)
        linear = nn.Linear(in_features, out_features, device="cuda", dtype=torch.bfloat16)
        mask = fxsparse.masks.n_m(linear, 2, 4, include="*")["weight"]
        weight = (linear.weight.detach() * mask).contiguous()
        bias = linear.bias.detach()
        sparse: dict[str, torch.Tensor] = {}
        errors: dict[str, str] = {name: why for name, why in usable.items() if why}
        for backend in (name for name, why in usable.items() if not why):
            try:
                sparse[backend] = to_semi_structured(weight, backend)
            except Exception as error:  # a benchmark reports what failed, and goes on
                errors[backend] = error_text(error)
        for count in tokens:
            x = torch.randn(count, in_features, device="cuda", dtype=torch.bfloat16)
            functions: dict[str, Callable[[], Any]] = {"dense": bind(F.linear, x, weight, bias)}
            max_error: dict[str, float] = {}
            row_errors = dict(errors)
            with torch.no_grad():
                expected = F.linear(x, weight, bias).float()
                for backend, w in sparse.items():
                    try:
                        max_error[backend] = float((F.linear(x, w, bias).float() - expected).abs().max())
                        functions[backend] = bind(F.linear, x, w, bias)
                    except Exception as error:
                        row_errors[backend] = error_text(error)
                inner = 50 if count * in_features * out_features < 2**36 else 10
                times = cuda_medians(functions, rounds, inner)
            row: dict[str, Any] = {
                "out": out_features,
                "in": in_features,
                "tokens": count,
                "dense_s": times["dense"],
                "times_s": times,
                "speedup": {name: times["dense"] / t for name, t in times.items() if name != "dense"},
                "max_abs_error": max_error,
                "errors": row_errors,
            }
            rows.append(row)
            print(
                f"  {out_features} × {in_features}, {count} tokens: dense {times['dense'] * 1e6:.0f} µs, "
                + ", ".join(f"{k} {v:.2f}×" for k, v in row["speedup"].items())
                + "".join(f", {k}: {v}" for k, v in row_errors.items()),
                flush=True,
            )
        del linear, weight, sparse
        torch.cuda.empty_cache()
    return rows


def bench_mlp(width: int, layers: int, tokens: tuple[int, ...], rounds: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = nn.Sequential(*(m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())))
    model = model.to(device="cuda", dtype=torch.bfloat16).eval()
    masks = fxsparse.masks.n_m(model, 2, 4)
    out = fxsparse.transform(model, masks)
    freeze: Any = fxsparse.freeze
    modules: dict[str, nn.Module | str] = {"dense": model, "masked": out, "frozen": fxsparse.freeze(out)}
    try:
        modules["semi_structured"] = freeze(out, layout="semi_structured")
    except Exception as error:  # a benchmark reports what failed, and goes on
        modules["semi_structured"] = error_text(error)
    rows = []
    for count in tokens:
        x = torch.randn(count, width, device="cuda", dtype=torch.bfloat16)
        variants = dict(modules)
        layouts: dict[str, str] = {}
        try:
            variants["auto"] = freeze(out, layout="auto", example_inputs=(x,))
            layouts = {k: str(v) for k, v in getattr(fxsparse, "layouts")(variants["auto"]).items()}  # noqa: B009
        except Exception as error:
            variants["auto"] = error_text(error)
        runnable = {k: m for k, m in variants.items() if isinstance(m, nn.Module)}
        errors = {k: m for k, m in variants.items() if isinstance(m, str)}
        with torch.no_grad():
            expected = runnable["frozen"](x).float()
            max_error = {}
            for name, module in list(runnable.items()):
                try:
                    max_error[name] = float((module(x).float() - expected).abs().max())
                except Exception as error:
                    errors[name] = error_text(error)
                    del runnable[name]
            times = cuda_medians({k: bind(m, x) for k, m in runnable.items()}, rounds, 10)
        row: dict[str, Any] = {
            "tokens": count,
            "times_s": times,
            "ratio_to_dense": {k: t / times["dense"] for k, t in times.items()},
            "max_abs_error_vs_frozen": max_error,
            "errors": errors,
            "auto_layouts": layouts,
        }
        rows.append(row)
        print(
            f"  MLP {layers} × {width}, {count} tokens: dense {times['dense'] * 1e3:.2f} ms, "
            + ", ".join(f"{k} {v:.2f}×" for k, v in row["ratio_to_dense"].items())
            + "".join(f", {k}: {v}" for k, v in errors.items()),
            flush=True,
        )
    return rows


def default_out() -> Path:
    return Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else Path("gpu.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default $OUT/gpu.json, else gpu.json)")
    parser.add_argument("--quick", action="store_true", help="two small shapes and a small MLP: a smoke test")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            f"bench_gpu.py needs an NVIDIA GPU with CUDA: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}); nothing was measured.",
            file=sys.stderr,
        )
        return NO_CUDA_EXIT
    warnings.filterwarnings("ignore")
    out = args.out or default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    major, minor = torch.cuda.get_device_capability()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "capability": f"{major}.{minor}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cusparselt": torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None,
        "backends": backends(),
        "fxsparse": fxsparse.__version__,
        "layouts_api": hasattr(fxsparse, "layouts"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
    }
    print(f"# 2:4 on {result['device']} (SM{major}{minor}), torch {torch.__version__}, CUDA {torch.version.cuda}")
    start = time.perf_counter()
    shapes = ((1024, 1024), (2048, 4096)) if args.quick else SHAPES
    tokens = (1, 64) if args.quick else TOKENS
    parts: tuple[tuple[str, Callable[[], list[dict[str, Any]]]], ...] = (
        ("kernels", lambda: bench_kernels(shapes, tokens, args.rounds)),
        ("mlp", lambda: bench_mlp(1024 if args.quick else MLP_WIDTH, MLP_LAYERS, tokens, args.rounds)),
    )
    for part, run in parts:
        try:
            result[part] = run()
        except Exception as error:  # keep what the other part measured
            result[f"{part}_error"] = error_text(error)
            print(f"  {part} failed: {result[f'{part}_error']}", flush=True)
        result["wall_s"] = time.perf_counter() - start
        out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
