"""How long do drawing, the diff, rendering and the report take on big models?

Builds, with random weights, models of N layers in three shapes users have:

* ``flat``: ``nn.Sequential`` of N ``Linear(8, 8)``;
* ``looped``: a ``ModuleList`` of N ``Linear(8, 8)`` called in a loop with a ``relu`` between;
* ``nested``: a ``ModuleList`` of N blocks (``attn`` Linear, ``mlp`` Sequential(Linear, ReLU),
  a residual add), three masked weights a block;

masks every weight at 50 % and times, once each, in one process: ``transform``, ``viz.draw``
of the output, rendering that (SVG, with whichever renderer ``viz.render_bytes`` finds),
``viz.diff``, ``viz.draw_diff`` + rendering, and the whole ``viz.report``. Prints a table
(seconds, and drawn nodes), the ratio of drawing to transforming, and ``--json`` writes it.
Usage::

    python tools/bench_draw.py [--layers 5000] [--shapes flat looped nested] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

import fxsparse
from fxsparse import viz


class Looped(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed: torch.Tensor = self.mlp(self.attn(x))
        return x + mixed


class Nested(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


SHAPES: dict[str, Callable[[int], nn.Module]] = {
    "flat": lambda n: nn.Sequential(*(nn.Linear(8, 8) for _ in range(n))),
    "looped": Looped,
    "nested": Nested,
}


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def measure(shape: str, layers: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = SHAPES[shape](layers)
    masks = {name: torch.rand_like(p) > 0.5 for name, p in model.named_parameters() if name.endswith("weight")}
    before = torch.fx.symbolic_trace(model)
    out, transform = timed(lambda: fxsparse.transform(model, masks))
    dot, draw = timed(lambda: viz.draw(out))
    _, render = timed(lambda: viz.render_bytes(dot))
    graph_diff, diff = timed(lambda: viz.diff(before, out))
    picture, draw_diff = timed(lambda: viz.draw_diff(before, out, graph_diff))
    _, render_diff = timed(lambda: viz.render_bytes(picture))
    with tempfile.TemporaryDirectory() as folder:
        page, report = timed(lambda: viz.report(before, out, Path(folder) / "r.html", graph_diff=graph_diff))
        size = page.stat().st_size
    return {
        "shape": shape,
        "layers": layers,
        "nodes": len(out.graph.nodes),
        "drawn": dot.source.count("[label="),
        "transform_s": transform,
        "draw_s": draw,
        "render_s": render,
        "diff_s": diff,
        "draw_diff_s": draw_diff,
        "render_diff_s": render_diff,
        "report_s": report,
        "report_bytes": size,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=5000)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = [measure(shape, args.layers) for shape in args.shapes]
    print(f"# fxsparse.viz on {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print("| model | nodes | drawn | transform s | draw s | render s | diff s | draw_diff + render s | report s "
          "| report MB | draw+render / transform |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['shape']} × {row['layers']} | {row['nodes']:,} | {row['drawn']:,} | {row['transform_s']:.2f} "
            f"| {row['draw_s']:.2f} | {row['render_s']:.2f} | {row['diff_s']:.2f} "
            f"| {row['draw_diff_s'] + row['render_diff_s']:.2f} | {row['report_s']:.2f} "
            f"| {row['report_bytes'] / 1e6:.1f} | {(row['draw_s'] + row['render_s']) / row['transform_s']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
