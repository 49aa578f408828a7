"""How big is the viewer's page for a 5,000-layer MLP, and how fast does it open and expand?

Builds ``layers`` ``Linear(8, 8)`` in a ``ModuleList`` called in a loop with a ``relu`` between
(about 6 nodes a layer once masked: 30,000 for 5,000 layers), masks every weight at 50 %,
writes ``fxsparse.viz.view(out, before)`` and opens it in headless Chromium (1280×800) through
the DevTools protocol: the time from navigation to the first screen drawn (``data-ready``),
and the time from a real click on the folded run of layers to its contents drawn (layout with
ELK, SVG, the next frame). Each page load is timed ``--repeat`` times. Targets (issue 16): file
under 10 MB, first screen within 2 s, an expansion within 200 ms. Usage::

    python tools/bench_viewer.py [--layers 5000] [--repeat 2] [--json out.json] [--screenshot first.png]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.fx
from bench_draw import Looped  # tools/ is the script's folder: the model bench_draw draws
from torch import nn

import fxsparse

ROOT = Path(__file__).parent.parent


def chromium_class() -> Any:
    """The DevTools client the browser tests use (tests/chromium.py)."""
    spec = importlib.util.spec_from_file_location("chromium", ROOT / "tests" / "chromium.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Chromium


def wait_ready(browser: Any, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not browser.evaluate("document.body.hasAttribute('data-ready')"):
        if time.monotonic() > deadline:
            raise TimeoutError("the viewer never drew its first screen")
        time.sleep(0.02)


def time_click(browser: Any, selector: str) -> float:
    """Milliseconds from a real click on ``selector`` to the redrawn graph's next frame."""
    browser.evaluate(
        "window.fxvDrawn = new Promise(done => document.getElementById('fxv').addEventListener('fxv-drawn', "
        "() => requestAnimationFrame(() => done(performance.now())), {once: true})), 0"
    )
    started = browser.evaluate("performance.now()")
    browser.click(selector)
    return float(browser.evaluate("window.fxvDrawn")) - float(started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--layers", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--screenshot", type=Path, help="save the first screen here (PNG), and beside it the run opened"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Looped(args.layers)
    masks = {
        name: torch.rand(module.weight.shape) > 0.5
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }
    started = time.perf_counter()
    out = fxsparse.transform(model, masks)
    transform_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as folder:
        started = time.perf_counter()
        page = fxsparse.viz.view(out, torch.fx.symbolic_trace(model), Path(folder) / "graph.html")
        write_s = time.perf_counter() - started
        size = page.stat().st_size
        browser = chromium_class()(Path(folder) / "profile")
        try:
            browser.call(
                "Emulation.setDeviceMetricsOverride", width=1280, height=800, deviceScaleFactor=1, mobile=False
            )
            first: list[float] = []
            expand: list[float] = []
            for _ in range(args.repeat):
                browser.open(page)
                wait_ready(browser)
                first.append(float(browser.evaluate("document.getElementById('fxv').fxv.readyAt")))
                if args.screenshot is not None and not expand:
                    browser.screenshot(args.screenshot)
                # The stack of layers, then the folded run inside it.
                expand.append(time_click(browser, ".fxv-box[data-stack]"))
                expand.append(time_click(browser, ".fxv-box[data-run]"))
                if args.screenshot is not None and len(expand) == 2:
                    browser.screenshot(args.screenshot.with_name(f"{args.screenshot.stem}-open.png"))
            nodes = int(browser.evaluate("document.getElementById('fxv').fxv.nodes.length"))
        finally:
            browser.close()
    result = {
        "layers": args.layers, "nodes": nodes, "file_mb": size / 1e6, "transform_s": transform_s, "write_s": write_s,
        "first_screen_ms": first, "expand_ms": expand, "load": os.getloadavg()[0], "machine": platform.processor(),
    }  # fmt: skip
    print(f"{args.layers} layers, {nodes:,} nodes: page {size / 1e6:.2f} MB (written in {write_s:.1f} s)")
    print("first screen (ms): " + ", ".join(f"{t:.0f}" for t in first) + "   target ≤ 2000")
    print("expand the stack, then its folded run (ms): " + ", ".join(f"{t:.0f}" for t in expand) + "   target ≤ 200")
    print(f"load average {result['load']:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
