"""The ``fxsparse`` command line."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch


def main(argv: Sequence[str] | None = None) -> int:
    from fxsparse import __version__

    parser = argparse.ArgumentParser(prog="fxsparse", description="Weight masks as an explicit torch.fx graph rewrite.")
    parser.add_argument("--version", action="version", version=f"fxsparse {__version__} (torch {torch.__version__})")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="mask a small built-in model, check it against FakeSparsity, write TorchScript and torch.export files",
    )
    demo.add_argument("--out", type=Path, default=Path("fxsparse-demo"), help="output folder (default: %(default)s)")
    demo.add_argument("--sparsity", type=float, default=0.5, help="fraction of each weight to prune (default: 0.5)")
    demo.add_argument("--seed", type=int, default=0, help="random seed for weights and inputs (default: 0)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.sparsity <= 1.0:
        parser.error(f"--sparsity must be between 0 and 1, got {args.sparsity}")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out must be a folder, but {args.out} is a file")
    return run_demo(args.out, args.sparsity, args.seed)


def run_demo(out_dir: Path, sparsity: float, seed: int) -> int:
    import fxsparse

    from ._demo import TinyLM, magnitude_masks

    # TorchScript is deprecated in torch 2.13 and warns on every call; the demo writes it on purpose.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="The TorchScript type system", category=UserWarning)
    torch.manual_seed(seed)
    model = TinyLM().eval()
    masks = magnitude_masks(model, sparsity)
    ids = torch.randint(0, 64, (4, 16))
    print(f"fxsparse demo: {type(model).__name__}, {len(masks)} Linear weights, lm_head tied to embed")

    start = time.perf_counter()
    out = fxsparse.transform(model, masks)
    elapsed = time.perf_counter() - start
    products = [n for n in out.graph.nodes if n.meta.get(fxsparse.META_KEY, {}).get("role") == "masked"]
    opened = [n for n in out.graph.nodes if n.meta.get(fxsparse.META_KEY, {}).get("role") == "opened"]
    density = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    print(f"  masks      {sparsity:.0%} magnitude sparsity per layer (density {density:.3f})")
    print(f"  transform  {elapsed * 1000:.0f} ms: {len(products)} mask*weight nodes, {len(opened)} module calls opened")

    reference = fxsparse.transform(model, masks, emit="parametrize")
    with torch.no_grad():
        expected = reference(ids)
        equal = torch.equal(out(ids), expected)
    print(f"  check      output bitwise equal to torch.ao.pruning.FakeSparsity: {'yes' if equal else 'NO'}")

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "graph.py").write_text(out.code)
    scripted = fxsparse.transform(model, masks, emit="script")
    torch.jit.save(scripted, str(out_dir / "model.script.pt"))
    exported = fxsparse.transform(model, masks, emit="export", example_inputs=(ids,))
    torch.export.save(exported, out_dir / "model.pt2")
    torch.save(out.state_dict(), out_dir / "state_dict.pt")
    with torch.no_grad():
        reloaded = torch.jit.load(str(out_dir / "model.script.pt"))  # type: ignore[no-untyped-call]
        script_equal = torch.equal(reloaded(ids), expected)
        export_equal = torch.equal(torch.export.load(out_dir / "model.pt2").module()(ids), expected)
    masks_kept = sum(k.endswith("_mask") for k in torch.load(out_dir / "state_dict.pt"))
    print(f"  wrote      {out_dir / 'model.script.pt'} (TorchScript, reloaded output equal: {_yes(script_equal)})")
    print(f"             {out_dir / 'model.pt2'} (torch.export, reloaded output equal: {_yes(export_equal)})")
    print(f"             {out_dir / 'state_dict.pt'} ({masks_kept} masks kept), {out_dir / 'graph.py'} (the code)")
    ok = equal and script_equal and export_equal and masks_kept == len(masks)
    if not ok:
        print("fxsparse demo: FAILED, outputs differ", file=sys.stderr)
    return 0 if ok else 1


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


if __name__ == "__main__":
    raise SystemExit(main())
