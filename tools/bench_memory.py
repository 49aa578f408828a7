"""Peak memory of calibrate → transform → train → freeze → save on a Llama-shaped model, over its weights.

A ``LlamaForCausalLM`` built from a ``transformers.LlamaConfig`` with random weights, in
bfloat16, sized by ``--gib`` (the weights' own size; layers are added at the ``--hidden``
width until it is reached). Each step is measured in a fresh child process: the child runs
the steps before it unmeasured, resets Linux's peak resident memory (``VmHWM``, through
``/proc/self/clear_refs``), runs the step and reports the peak. So a step's peak includes
what the pipeline holds at that point (the model, the masks, the output), as a user's
process would, and the Python + torch baseline the child started with (reported apart).
The children run with ``MALLOC_MMAP_THRESHOLD_=65536`` (see ``_env``), so that resident
memory follows what is alive (users at the edge of their memory may want the same).

Steps: ``calibrate`` (``fxsparse.masks.wanda``, 50 %, the head left out; the masks are then
saved for the later steps' children, which load them), ``transform`` (train mode, captured by
torch.export, as docs/pruning-language-models.md does), ``train`` (``--steps`` steps of plain
SGD over every parameter: gradients take one more copy of the weights, whatever prunes them),
``freeze`` (of that train-mode capture: captured again in eval mode) and ``save``
(``fxsparse.save`` of the frozen model). Two variants: ``copy`` (the defaults) and ``shared``
(``transform(..., share_weights=True)``, ``freeze(..., inplace=True)``).

Usage::

    python tools/bench_memory.py --gib 1.5                  # about 10 minutes on 2 cores
    python tools/bench_memory.py --gib 13 --hidden 4096 --train-last 2   # 7B widths: ~20 GiB free

Target (issue 15): a step's peak, less the baseline, at most 1.3 × (weights + masks) + one
layer group's activations (training: + the gradients).
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
from typing import Any

STEPS = ("calibrate", "transform", "train", "freeze", "save")
VARIANTS = ("copy", "shared")


def _resident_peak_kib(reset: bool = False) -> int:
    """Linux's VmHWM (KiB), which ``reset`` first sets to what is resident now (see tools/bench_masks.py)."""
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])


def _resident_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


def config_for(gib: float, hidden: int) -> Any:
    from transformers import LlamaConfig

    intermediate = (int(hidden * 8 / 3) + 255) // 256 * 256  # Llama's SwiGLU width, rounded as Llama-2's 11008
    vocab = 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    outside = 2 * vocab * hidden + hidden
    layers = max(1, round((gib * 2**30 / 2 - outside) / per_layer))
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 128),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=256,
        use_cache=False,
        tie_word_embeddings=False,
    )


def child(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaForCausalLM

    import fxsparse

    torch.manual_seed(0)
    baseline = _resident_kib()
    config = config_for(args.gib, args.hidden)
    torch.set_default_dtype(torch.bfloat16)
    model: Any = LlamaForCausalLM(config)
    model.eval()
    torch.set_default_dtype(torch.float32)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    calibration = [{"input_ids": torch.randint(0, config.vocab_size, (1, args.tokens))} for _ in range(args.batches)]
    shared = args.variant == "shared"
    masks_path = Path(args.folder) / "masks.safetensors"
    held: dict[str, Any] = {}
    peak = 0
    for step in STEPS[: STEPS.index(args.step) + 1]:
        measured = step == args.step
        if measured:
            before = _resident_peak_kib(reset=True)
        start = time.perf_counter()
        if step == "calibrate":
            if measured or not masks_path.exists():
                masks = fxsparse.masks.wanda(model, calibration, 0.5, exclude="lm_head", progress=False)
                if measured:  # saving the masks for the later steps is not calibration's
                    peak, seconds = _resident_peak_kib() - before, time.perf_counter() - start
                    measured = False
                fxsparse.save_masks(masks, masks_path)
            else:
                masks = fxsparse.load_masks(masks_path)
            held["masks"] = masks
        elif step == "transform":
            held["out"] = fxsparse.transform(
                model.train(), held["masks"], example_kwargs=calibration[0], share_weights=shared
            )
        elif step == "train":
            out = held["out"]
            if args.train_last:  # the last layers alone: the gradients of all 7B weights would not fit
                first = config.num_hidden_layers - args.train_last
                for name, parameter in out.named_parameters():
                    layer = name.split(".")[2] if name.startswith("model.layers.") else None
                    parameter.requires_grad_(layer is not None and int(layer) >= first)
            optimizer = torch.optim.SGD([p for p in out.parameters() if p.requires_grad], lr=1e-4)
            for batch in calibration[: args.steps]:
                logits = out(**batch).logits
                loss: Any = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), batch["input_ids"][:, 1:].flatten()
                )
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            del out, optimizer, logits, loss
        elif step == "freeze":
            held["frozen"] = fxsparse.freeze(held["out"], example_kwargs=calibration[0], inplace=shared)
            if shared:
                del held["out"]  # consumed
        elif step == "save":
            fxsparse.save(held["frozen"], Path(args.folder) / f"frozen-{args.variant}.pt")
        if measured:
            peak, seconds = _resident_peak_kib() - before, time.perf_counter() - start
        if step == args.step:
            resident_before = before
    masks_bytes = sum(m.numel() * m.element_size() for m in held["masks"].values())
    print(
        json.dumps(
            {
                "weights_gib": weights / 2**30,
                "masks_gib": masks_bytes / 2**30,
                "baseline_gib": baseline / 2**20,
                "held_before_gib": resident_before / 2**20,
                "peak_gib": (resident_before + peak) / 2**20,
                "seconds": seconds,
                "layers": config.num_hidden_layers,
            }
        )
    )


def _env(pythonpath: str) -> dict[str, str]:
    """The children's environment: this fxsparse, one thread, and glibc's malloc returning what is freed.

    glibc serves allocations below its mmap threshold (which grows to 32 MiB as large blocks are
    freed, the size of a layer's weight) from its heap, and keeps what is freed there resident:
    a later step's "held before" would count the earlier steps' garbage. A fixed threshold of
    64 KiB maps every tensor of any size on its own, and unmaps it when it is freed.
    """
    return {"PYTHONPATH": pythonpath, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.5, help="the bfloat16 weights' size in GiB (default: 1.5)")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden width (default: 2048; Llama-7B: 4096)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per calibration batch (default: 128)")
    parser.add_argument("--batches", type=int, default=4, help="calibration batches (default: 4)")
    parser.add_argument("--steps", type=int, default=2, help="training steps (default: 2)")
    parser.add_argument("--train-last", type=int, default=0, help="train the last N layers only (default: all)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        child(args)
        return 0
    here = os.pathsep.join([str(Path(__file__).resolve().parent.parent), *sys.path])
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for variant in args.variants.split(","):
            for step in STEPS:
                if step == "calibrate" and variant != VARIANTS[0] and f"calibrate/{VARIANTS[0]}" in rows:
                    rows[f"calibrate/{variant}"] = rows[f"calibrate/{VARIANTS[0]}"]  # the options do not touch it
                    continue
                command = [sys.executable, __file__, "--step", step, "--variant", variant, "--folder", folder]
                command += [f"--{k}={getattr(args, k)}" for k in ("gib", "hidden", "tokens", "batches", "steps")]
                command += [f"--train-last={args.train_last}"]
                done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **_env(here)})
                if done.returncode:
                    sys.stderr.write(done.stderr[-3000:])
                    raise SystemExit(f"{variant}/{step} failed")
                rows[f"{step}/{variant}"] = json.loads(done.stdout.strip().splitlines()[-1])
                print(step, variant, rows[f"{step}/{variant}"], file=sys.stderr)
    first = next(iter(rows.values()))
    weights, masks, baseline = first["weights_gib"], first["masks_gib"], first["baseline_gib"]
    import torch

    machine = f"{platform.machine()}, torch {torch.__version__}"
    print(f"# peak resident memory, Llama-shaped, {first['layers']} layers, hidden {args.hidden}, bfloat16 "
          f"weights {weights:.2f} GiB, bool masks {masks:.2f} GiB; {machine}")  # fmt: skip
    print(f"# baseline (Python + torch + transformers, before the model): {baseline:.2f} GiB; "
          f"target: peak - baseline <= 1.3 x (weights + masks) = {1.3 * (weights + masks):.2f} GiB "
          "+ one layer group's activations")  # fmt: skip
    print("| step | variant | held before (GiB) | peak (GiB) | (peak - baseline) / weights | "
          "(peak - baseline) / (weights + masks) | time (s) |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|")
    for key, row in rows.items():
        step, variant = key.split("/")
        above = row["peak_gib"] - baseline
        print(f"| {step} | {variant} | {row['held_before_gib']:.2f} | {row['peak_gib']:.2f} | {above / weights:.2f} "
              f"| {above / (weights + masks):.2f} | {row['seconds']:.1f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
