"""How long does mask generation take on a 7B-parameter model's shapes?

Llama-2-7B's masked weights: 32 blocks of q, k, v, o (4096 × 4096), gate and up
(11008 × 4096) and down (4096 × 11008), and the 32000 × 4096 head: 6.6e9 weights. Layer
by layer, as a user with a model too big for memory would go, each weight is made with
random values (not timed) and masked with ``fxsparse.masks.magnitude`` (50 %, per layer)
and ``fxsparse.masks.n_m`` (2:4), timed. Prints the time per shape and the totals, and
``--json`` writes them.

``--scaling`` instead times what must stay linear in the number of masks: ``fxsparse.check``
against ``fxsparse.transform`` on ``--layers`` Linear(16, 16) + ReLU layers (check should cost
no more than transform), and ``fxsparse.save_masks`` of ``--small-masks`` 4×4 masks (under a
second for 10,000).

``--memory`` instead measures the peak memory of ``fxsparse.load_masks`` on a ``--mib`` MiB
file, plain and packed (``resource.getrusage``'s ``ru_maxrss`` in a fresh child process,
before and after the load: tracemalloc does not see torch's allocations). The masks loaded
own their memory, so the peak cannot fall below the masks themselves (for a packed file, 8
times the file); the question is what the load costs above that. Usage::

    python tools/bench_masks.py [--blocks 32] [--json out.json]
    python tools/bench_masks.py --scaling [--layers 5000] [--small-masks 10000]
    python tools/bench_masks.py --memory [--mib 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import fxsparse

SHAPES = {  # Llama-2-7B: name -> ([out, in], how many)
    "q/k/v/o 4096×4096": ((4096, 4096), 4),
    "gate/up 11008×4096": ((11008, 4096), 2),
    "down 4096×11008": ((4096, 11008), 1),
}
HEAD = ((32000, 4096), 1)


def timed_masks(shape: tuple[int, int]) -> tuple[float, float]:
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.randn(shape), requires_grad=False)
    start = time.perf_counter()
    fxsparse.masks.magnitude(holder, 0.5, include="*")
    middle = time.perf_counter()
    fxsparse.masks.n_m(holder, 2, 4, include="*")
    return middle - start, time.perf_counter() - middle


def scaling(layers: int, small_masks: int) -> dict[str, float]:
    """Seconds for transform, plan and check of ``layers`` small layers, and save_masks of ``small_masks``."""
    model = nn.Sequential(*[module for _ in range(layers) for module in (nn.Linear(16, 16), nn.ReLU())])
    masks = fxsparse.masks.magnitude(model, 0.5)
    seconds: dict[str, float] = {}
    for name, step in (
        ("transform_s", lambda: fxsparse.transform(model, masks)),
        ("plan_s", lambda: fxsparse.plan(model, masks)),
        ("check_s", lambda: fxsparse.check(model, masks)),
    ):
        start = time.perf_counter()
        step()
        seconds[name] = time.perf_counter() - start
    small = {f"mask{i}": torch.ones(4, 4, dtype=torch.bool) for i in range(small_masks)}
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        fxsparse.save_masks(small, Path(folder) / "masks.safetensors")
        seconds["save_masks_s"] = time.perf_counter() - start
    print(f"# fxsparse scaling on {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    ratio = seconds["check_s"] / seconds["transform_s"]
    print(f"{layers:,} layers: transform {seconds['transform_s']:.2f} s, plan {seconds['plan_s']:.3f} s, "
          f"check {seconds['check_s']:.2f} s; check / transform {ratio:.2f}")  # fmt: skip
    print(f"save_masks of {small_masks:,} masks: {seconds['save_masks_s']:.2f} s "
          f"({seconds['save_masks_s'] / small_masks * 1e6:.0f} µs a mask)")  # fmt: skip
    return seconds


def _peak_of_one_load(path: str) -> None:
    """In a fresh process: the peak memory (MiB) of loading ``path``, above what it held before."""
    fxsparse.load_masks(fxsparse.save_masks({"w": torch.ones(64, dtype=torch.bool)}, f"{path}.warm.safetensors"))
    before = _resident_peak_kib(reset=True)
    masks = fxsparse.load_masks(path)
    held = sum(mask.numel() * mask.element_size() for mask in masks.values())
    print(json.dumps({"peak_mib": (_resident_peak_kib() - before) / 1024, "masks_mib": held / 2**20}))


def _resident_peak_kib(reset: bool = False) -> int:
    """The process's peak resident memory (KiB). Linux's VmHWM, which ``reset`` sets to what is
    resident now; ``ru_maxrss`` elsewhere (it counts what the parent held when it forked)."""
    import resource

    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory(mib: int) -> dict[str, dict[str, float]]:
    """Peak memory of load_masks on a ``mib`` MiB file, plain (bool) and packed (bits)."""
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for kind, elements in (("plain", mib << 20), ("packed", mib << 23)):
            path = fxsparse.save_masks(
                {"w": torch.rand(elements) > 0.5}, Path(folder) / f"{kind}.safetensors", packed=kind == "packed"
            )
            here = os.pathsep.join([str(Path(fxsparse.__file__).parent.parent), *sys.path])
            child = subprocess.run(  # with the fxsparse this process imported
                [sys.executable, __file__, "--peak-of-one-load", str(path)], capture_output=True, text=True, check=True,
                env={**os.environ, "PYTHONPATH": here},
            )  # fmt: skip
            row = json.loads(child.stdout)
            row["file_mib"] = path.stat().st_size / 2**20
            rows[kind] = row
    print(f"# load_masks peak memory on {platform.machine()}, torch {torch.__version__}")
    print("| file | file (MiB) | masks (MiB) | peak (MiB) | peak / file | (peak - masks) / file |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, row in rows.items():
        file, masks, peak = row["file_mib"], row["masks_mib"], row["peak_mib"]
        print(f"| {kind} | {file:.0f} | {masks:.0f} | {peak:.0f} | {peak / file:.2f} | {(peak - masks) / file:.2f} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=32, help="transformer blocks (default: 32, Llama-2-7B)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--scaling", action="store_true", help="time check and save_masks against the mask count")
    parser.add_argument("--layers", type=int, default=5000, help="--scaling: Linear layers (default: 5000)")
    parser.add_argument("--small-masks", type=int, default=10000, help="--scaling: masks saved (default: 10000)")
    parser.add_argument("--memory", action="store_true", help="peak memory of load_masks, plain and packed")
    parser.add_argument("--mib", type=int, default=64, help="--memory: the file's size in MiB (default: 64)")
    parser.add_argument("--peak-of-one-load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_of_one_load:
        _peak_of_one_load(args.peak_of_one_load)
        return 0
    if args.memory:
        peaks = memory(args.mib)
        if args.json:
            args.json.write_text(json.dumps(peaks, indent=2))
        return 0
    if args.scaling:
        seconds = scaling(args.layers, args.small_masks)
        if args.json:
            args.json.write_text(json.dumps(seconds, indent=2))
        return 0
    rows: dict[str, dict[str, float]] = {}
    weights = 0
    plan = [(name, shape) for _ in range(args.blocks) for name, (shape, count) in SHAPES.items() for _ in range(count)]
    plan.append(("head 32000×4096", HEAD[0]))
    for name, shape in plan:
        magnitude, two_four = timed_masks(shape)
        row = rows.setdefault(name, {"layers": 0, "magnitude_s": 0.0, "n_m_s": 0.0})
        row["layers"] += 1
        row["magnitude_s"] += magnitude
        row["n_m_s"] += two_four
        weights += shape[0] * shape[1]
    print(f"# fxsparse.masks on {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads: "
          f"{weights / 1e9:.2f}e9 weights, layer by layer")  # fmt: skip
    print("| shape | layers | magnitude 50 % (s) | 2:4 (s) |")
    print("|---|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['layers']} | {row['magnitude_s']:.1f} | {row['n_m_s']:.1f} |")
    total_magnitude = sum(row["magnitude_s"] for row in rows.values())
    total_n_m = sum(row["n_m_s"] for row in rows.values())
    print(f"| total | {sum(int(r['layers']) for r in rows.values())} | {total_magnitude:.1f} | {total_n_m:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"weights": weights, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
