"""How long does fxsparse.transform take, next to symbolic_trace and torch.ao.pruning?

Times, in one process and on the same models (N × (Linear(16, 16) + ReLU)), the best of a
few runs of:

* ``torch.fx.symbolic_trace(model)``: the floor, tracing alone;
* ``fxsparse.transform(model, masks)``: copy + trace + rewrite + codegen, every Linear masked;
* ``copy.deepcopy(model)``: what copying the model costs on its own;
* ``WeightNormSparsifier().prepare(model, config=None)``: torch.ao.pruning's set-up (on a copy
  made outside the timing);
* ``pickle.loads`` of the transform's output;
* up to ``--export-max`` layers: ``torch.export.export(model, (x,))`` and
  ``fxsparse.transform(model, masks, capture="export", example_inputs=(x,))``, whose ratio is
  what the export capture adds to torch.export itself.

and prints ratios to symbolic_trace (absolute times only for scale). Usage::

    python tools/bench_transform.py [--sizes 100 1000 5000] [--repeat 3] [--export-max 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import pickle
import platform
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import nn

import fxsparse


def make_model(layers: int) -> nn.Sequential:
    modules: list[nn.Module] = []
    for _ in range(layers):
        modules += [nn.Linear(16, 16), nn.ReLU()]
    return nn.Sequential(*modules)


def best_time(function: Callable[[], Any], repeat: int) -> float:
    return best_time_with(lambda _: function(), repeat, lambda: None)


def best_time_with(function: Callable[[Any], Any], repeat: int, setup: Callable[[], Any]) -> float:
    """Best of ``repeat`` timings of ``function(setup())``, ``setup`` not timed."""
    best = float("inf")
    for _ in range(repeat):
        argument = setup()
        gc.collect()
        start = time.perf_counter()
        function(argument)
        best = min(best, time.perf_counter() - start)
    return best


def prepare_sparsifier(model: nn.Module) -> None:
    from torch.ao.pruning.sparsifier.weight_norm_sparsifier import WeightNormSparsifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        WeightNormSparsifier().prepare(model, config=None)  # type: ignore[no-untyped-call]


def measure(layers: int, repeat: int, export: bool) -> dict[str, float]:
    model = make_model(layers)
    masks = {f"{2 * i}": torch.rand(16, 16) > 0.5 for i in range(layers)}
    row = {"layers": float(layers)}
    row["symbolic_trace_s"] = best_time(lambda: torch.fx.symbolic_trace(model), repeat)
    row["transform_s"] = best_time(lambda: fxsparse.transform(model, masks), repeat)
    row["deepcopy_s"] = best_time(lambda: copy.deepcopy(model), repeat)
    row["prepare_s"] = best_time_with(prepare_sparsifier, max(1, repeat - 1), lambda: copy.deepcopy(model))
    pickled = pickle.dumps(fxsparse.transform(model, masks))
    row["unpickle_s"] = best_time(lambda: pickle.loads(pickled), repeat)
    if export:
        x = (torch.randn(2, 16),)
        row["export_s"] = best_time(lambda: torch.export.export(model, x), repeat)
        row["transform_export_s"] = best_time(
            lambda: fxsparse.transform(model, masks, capture="export", example_inputs=x), repeat
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--export-max", type=int, default=1000, help="largest size to time torch.export at")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [measure(n, args.repeat, n <= args.export_max) for n in args.sizes]
    print(
        f"# transform cost, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, best of {args.repeat}"
    )
    print()
    print(
        "| layers | symbolic_trace | transform ÷ trace | deepcopy ÷ trace | prepare ÷ trace | unpickle ÷ trace "
        "| transform µs/layer | capture='export' ÷ torch.export |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        trace = row["symbolic_trace_s"]
        export = f"{row['transform_export_s'] / row['export_s']:.2f}×" if "export_s" in row else "n/a"
        print(
            f"| {int(row['layers'])} | {trace:.3f} s | {row['transform_s'] / trace:.2f}× | "
            f"{row['deepcopy_s'] / trace:.2f}× | {row['prepare_s'] / trace:.2f}× | {row['unpickle_s'] / trace:.2f}× | "
            f"{row['transform_s'] / row['layers'] * 1e6:.0f} | {export} |"
        )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=2)


if __name__ == "__main__":
    main()
