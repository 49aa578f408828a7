"""Regenerate every picture in docs/images/ (a DOT source and its SVG each).

Usage::

    python tools/make_pictures.py            # write docs/images/*.dot and *.svg
    python tools/make_pictures.py --check    # exit 1 if a committed DOT source or mask picture is stale

The tests run ``--check``'s comparison, so a picture that no longer matches the code fails CI.
The SVGs are rendered with whichever renderer ``fxsparse.viz.render`` finds.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

import fxsparse
from fxsparse import viz

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"


def _small() -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    masks = {
        "0": torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=torch.bool).repeat(4, 2),  # 2:4
        "2": (torch.rand(4, 8) > 0.7),
    }
    return torch.fx.symbolic_trace(model), fxsparse.transform(model, masks)


def _gpt2() -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0, use_cache=False
    )
    model: nn.Module = GPT2LMHeadModel(config)
    model.eval()
    example = {"input_ids": torch.zeros(2, 8, dtype=torch.long)}
    before = fxsparse.transform(model, {}, example_kwargs=example)
    return before, fxsparse.transform(model, fxsparse.masks.magnitude(model, 0.5), example_kwargs=example)


def _big() -> torch.fx.GraphModule:
    """400 transformer-like blocks, every weight masked: 4,802 nodes, over the drawing's budget."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_draw import Nested

    torch.manual_seed(0)
    model = Nested(400)
    masks = {name: torch.rand_like(p) > 0.5 for name, p in model.named_parameters() if name.endswith("weight")}
    out: torch.fx.GraphModule = fxsparse.transform(model, masks)
    return out


def pictures() -> dict[str, Callable[[], Any]]:
    """Each picture's name and the function drawing it (a graphviz.Digraph)."""
    small = _small()
    gpt2 = _gpt2()
    return {
        # Every node: these explain the rewrite, mask fetches and products included.
        "before": lambda: viz.draw(small[0], title="before: the model traced", compact=False),
        "after": lambda: viz.draw(small[1], title="after: fxsparse.transform", compact=False),
        "diff": lambda: viz.draw_diff(*small, compact=False),
        "compact": lambda: viz.draw(small[1], title="after, compact"),
        "gpt2-diff": lambda: viz.draw_diff(*gpt2),
        "big": lambda: viz.draw(_big(), title="400 blocks: first two, last, and a box for the rest"),
        "frozen-csr": lambda: viz.draw_diff(small[1], fxsparse.freeze(small[1], layout="csr")),
    }


def mask_svg(mask: torch.Tensor, title: str, cell: int = 12) -> str:
    """A mask as a grid, kept weights dark: a deterministic SVG, compared as text."""
    rows, columns = mask.shape
    width, height = columns * cell + 2, rows * cell + 28
    cells = "".join(
        f'<rect x="{1 + c * cell}" y="{24 + r * cell}" width="{cell - 1}" height="{cell - 1}" '
        f'fill="{"#1f4e79" if mask[r, c] else "#e8e8e8"}"/>'
        for r in range(rows)
        for c in range(columns)
    )
    kept = float(mask.float().mean())
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="13">'
        f'<text x="1" y="16">{title}: {rows}×{columns}, density {kept:.2f}</text>{cells}</svg>\n'
    )


def mask_pictures() -> dict[str, str]:
    """Each mask family's picture on one random 16 × 32 weight (seeded)."""
    torch.manual_seed(0)
    model = nn.Linear(32, 16)
    return {
        "mask-magnitude": mask_svg(fxsparse.masks.magnitude(model, 0.5)["weight"], "magnitude, 50 %"),
        "mask-2-4": mask_svg(fxsparse.masks.n_m(model, 2, 4)["weight"], "2:4 along the input"),
        "mask-block": mask_svg(fxsparse.masks.block(model, 0.5, (4, 4))["weight"], "blocks of 4×4, 50 %"),
        "mask-weight-norm": mask_svg(
            fxsparse.masks.weight_norm(model, 0.5, (1, 8), 6)["weight"], "WeightNormSparsifier (1, 8), 6 zeros a block"
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare DOT sources only; write nothing")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    stale = []
    for name, make in pictures().items():
        dot = make()
        path = IMAGES / f"{name}.svg"
        if args.check:
            committed = path.with_suffix(".dot")
            if not committed.exists() or committed.read_text() != dot.source:
                stale.append(name)
        else:
            viz.render(dot, path)
            print(f"wrote {path.relative_to(IMAGES.parent.parent)}")
    for name, svg in mask_pictures().items():
        path = IMAGES / f"{name}.svg"
        if args.check:
            if not path.exists() or path.read_text() != svg:
                stale.append(name)
        else:
            path.write_text(svg)
            print(f"wrote {path.relative_to(IMAGES.parent.parent)}")
    if stale:
        print(f"stale pictures: {', '.join(stale)}; run python tools/make_pictures.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
