"""Sparse fine-tuning at dense cost? Training step time and memory of the folded mode, against dense and FakeSparsity.

Four ways to train a model whose weights are 50 % pruned (``fxsparse.masks.magnitude``):

- ``dense``: the model itself with ``mask * weight`` written into its weights once (what a
  step costs without masks; its pruned weights would not stay pruned);
- ``fakesparsity``: ``torch.ao.pruning.FakeSparsity`` on every masked weight
  (``fxsparse.transform(..., emit="parametrize")``): ``mask * weight`` on every forward;
- ``masked``: fxsparse's masked graph (``fxsparse.transform``): the same product, as a node;
- ``folded``: ``fxsparse.transform(..., fold=True)``: the weights hold ``mask * weight``, the
  graph reads them as they are, gradients are masked.

Three measurements:

1. ``--time``: a training step (forward, loss, backward, ``AdamW.step``, ``zero_grad``), the
   fastest of ``--repeats`` steps after three warm-up steps (the median is kept in the JSON
   too), divided by the dense model's, on
   4 × ``Linear(2048)`` at batch 1 and 64 and on a small ``LlamaForCausalLM`` (transformers,
   random weights, 4 layers, hidden 256) at 32, 128 and 512 tokens; eager and under
   ``torch.compile`` (forward and backward; the optimizer eager). One thread. Target: folded
   at most 1.05 × dense everywhere.
2. ``--memory``: the peak resident memory of a fine-tuning step (after the optimizer's state
   exists), each in a fresh child process (Linux's ``VmHWM``, reset before the step, as
   tools/bench_memory.py measures), less the child's baseline before the model was built, ÷
   the dense model's; and the peak of ``fxsparse.freeze(out, inplace=True)`` of the masked and
   of the folded output. Target: folded at most dense + the masks.
3. ``--finetune``: tools/bench_prune.py's small language model (trained here on the Python
   standard library's source for ``--pretrain-steps`` steps) pruned at 50 % and at 2:4
   (magnitude, ``lm_head`` left out), then fine-tuned ``--steps`` steps (AdamW, gradient
   clipping at 1.0) folded and by FakeSparsity, from the same weights, on the same batches,
   with the parameters given to the optimizer in the same order: the first step whose loss
   differs (none, if the curves are identical) and each one's wall time.

Usage::

    python tools/bench_train.py --time --memory --finetune --json tools/results/train-cpu.json
    python tools/bench_train.py --from-json tools/results/train-cpu.json     # the tables again
    python tools/bench_train.py --time --quick                               # a smoke test

Timed runs want a quiet machine: the load average is recorded with the results.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from bench_memory import _env, _resident_kib, _resident_peak_kib  # noqa: E402  # tools/ is the script's folder
from bench_prune import Sizes, load_corpus, make_model, next_byte_loss, prune, random_batches  # noqa: E402
from bench_speed import machine_info  # noqa: E402
from torch import nn  # noqa: E402

import fxsparse  # noqa: E402

VARIANTS = ("dense", "fakesparsity", "masked", "folded")
WIDTH = 2048
LLAMA_TOKENS = (32, 128, 512)
# torch.compile's tracing of any custom autograd.Function (the folded graph's masked_gradient)
# instantiates torch.autograd.Function, which torch itself deprecates: its warning, not ours.
COMPILE_WARNING = r"<class 'torch.autograd.function.Function'> should not be instantiated"


@dataclass(frozen=True)
class Workload:
    name: str
    build: Callable[[], nn.Module]
    sizes: tuple[int, ...]  # batch rows (mlp) or tokens (llama)
    inputs: Callable[[int], dict[str, torch.Tensor]]
    loss: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]
    exclude: str | None = None  # weights left unmasked
    dynamic: Any = None  # dynamic_shapes for torch.export, where FX cannot trace the model


class Stack(nn.Module):
    """4 × Linear(2048) with ReLU between, called with ``x=``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *itertools.chain.from_iterable((nn.Linear(WIDTH, WIDTH), nn.ReLU()) for _ in range(4))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # type: ignore[no-any-return]


def _stack() -> nn.Module:
    torch.manual_seed(0)
    return Stack()


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=max(LLAMA_TOKENS), tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _rows(size: int) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(size, WIDTH, generator=torch.Generator().manual_seed(size))}


def _tokens(size: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 4096, (1, size), generator=torch.Generator().manual_seed(size))}


def workloads(quick: bool) -> dict[str, Workload]:
    tokens = torch.export.Dim("tokens", min=2, max=max(LLAMA_TOKENS))
    return {
        "4 x Linear(2048)": Workload("4 x Linear(2048)", _stack, (1, 64), _rows, lambda out, _: out.square().mean()),
        "Llama": Workload(
            "Llama",
            _llama,
            (32, 128) if quick else LLAMA_TOKENS,
            _tokens,
            lambda out, inputs: next_byte_loss(out.logits, inputs["input_ids"]),
            exclude="lm_head",
            dynamic={"input_ids": {1: tokens}},
        ),
    }


def masks_of(workload: Workload, model: nn.Module) -> dict[str, torch.Tensor]:
    return fxsparse.masks.magnitude(model, 0.5, exclude=workload.exclude)


def variant(name: str, workload: Workload, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """The model trained the way ``name`` says (see the module's docstring); ``model`` is not changed."""
    options: dict[str, Any] = {"example_kwargs": workload.inputs(workload.sizes[0]), "dynamic_shapes": workload.dynamic}
    if name == "dense":
        dense = copy.deepcopy(model)
        with torch.no_grad():
            for key, mask in masks.items():
                dense.get_parameter(key).mul_(mask)
        return dense
    if name == "dense graph":  # the dense model captured as fxsparse captures it, no masks: what the capture holds
        return fxsparse.transform(variant("dense", workload, model, masks), {}, **options)  # type: ignore[no-any-return]
    if name == "fakesparsity":
        return fxsparse.transform(model, dict(masks), emit="parametrize")  # type: ignore[no-any-return]
    return fxsparse.transform(model, dict(masks), fold=name == "folded", **options)  # type: ignore[no-any-return]


def adamw(module: nn.Module) -> torch.optim.Optimizer:
    """AdamW, fused: on CPU the default implementation's ``sqrt`` is several times slower on zeros, which
    the second moment of every pruned entry is (FakeSparsity's and the folded model's alike): see
    :func:`optimizer_rows`. Fused, the step costs the same whatever the values."""
    return torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.1, fused=True)


def optimizer_rows(repeats: int) -> list[dict[str, Any]]:
    """One ``AdamW.step`` over 4 × 2048² weights (for-loop, foreach, fused), with dense gradients and with
    gradients zero at half the entries (as pruned weights get them): what the zeros cost the optimizer."""
    rows = []
    for implementation in ("for-loop", "foreach", "fused"):
        for zeros in (False, True):
            parameters = [
                nn.Parameter(torch.randn(WIDTH, WIDTH, generator=torch.Generator().manual_seed(i))) for i in range(4)
            ]
            optimizer = torch.optim.AdamW(
                parameters,
                lr=1e-4,
                weight_decay=0.1,
                foreach=implementation == "foreach",
                fused=implementation == "fused",
            )
            gradients = [torch.randn_like(p) * 1e-3 for p in parameters]
            if zeros:
                for gradient in gradients:
                    gradient.view(-1)[::2] = 0
            times = []
            for _ in range(3 + repeats):
                for parameter, gradient in zip(parameters, gradients, strict=True):
                    parameter.grad = gradient.clone()
                start = time.perf_counter()
                optimizer.step()
                times.append(time.perf_counter() - start)
            rows.append({"implementation": implementation, "zero_gradients": zeros, "ms": 1000 * min(times[3:])})
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def train_step(
    module: Callable[..., Any], optimizer: torch.optim.Optimizer, workload: Workload, inputs: dict[str, torch.Tensor]
) -> None:
    """Forward, backward, ``optimizer.step()``, and the gradients dropped (as fine-tuning loops do)."""
    loss = workload.loss(module(**inputs), inputs)
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- 1. step time


def time_steps(workload: Workload, repeats: int) -> list[dict[str, Any]]:
    """One row per (size, compiled, variant): the median step time in ms."""
    import warnings

    model = workload.build().train()
    masks = masks_of(workload, model)
    rows = []
    for name in VARIANTS:
        module = variant(name, workload, model, masks).train()
        optimizer = adamw(module)
        for compiled in (False, True):
            run: Callable[..., Any] = torch.compile(module) if compiled else module
            for size in workload.sizes:
                inputs = workload.inputs(size)
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=COMPILE_WARNING)
                    for _ in range(3):  # warm-up (and compilation)
                        train_step(run, optimizer, workload, inputs)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    train_step(run, optimizer, workload, inputs)
                    times.append(time.perf_counter() - start)
                row = {"workload": workload.name, "size": size, "compiled": compiled, "variant": name}
                # The fastest step: what the step costs when nothing else on the machine got in its way.
                row |= {"ms": 1000 * min(times), "median_ms": 1000 * statistics.median(times)}
                rows.append({**row, "load": os.getloadavg()[0]})
                print(rows[-1], file=sys.stderr, flush=True)
        del module, optimizer, run
        torch.compiler.reset()  # compiled code holds its module: the next variant starts clean
        gc.collect()
    return rows


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    dense = {(r["workload"], r["size"], r["compiled"]): r["ms"] for r in rows if r["variant"] == "dense"}
    return [{**r, "to_dense": r["ms"] / dense[(r["workload"], r["size"], r["compiled"])]} for r in rows]


# --------------------------------------------------------------------------- 2. memory


def memory_child(workload_name: str, name: str, quick: bool) -> dict[str, Any]:
    """In a fresh process: the peak of a fine-tuning step (``train/…``) or of an in-place freeze (``freeze/…``)."""
    import transformers  # noqa: F401  # loaded before the baseline, as everything else

    workload = workloads(quick)[workload_name]
    step, _, kind = name.partition("/")
    # What the first training step and the first torch.export load (autograd's engine, the optimizer,
    # torch.export's and sympy's modules: tens of MiB of code) is loaded before the baseline.
    warm = nn.Sequential(nn.Linear(4, 4))
    captured = fxsparse.transform(
        warm, {"0.weight": torch.ones(4, 4)}, capture="export", example_inputs=(torch.ones(1, 4),)
    )
    warm_optimizer = torch.optim.AdamW(captured.parameters(), fused=True)
    warm_loss = replace(workload, loss=lambda out, _: out.sum())
    train_step(captured, warm_optimizer, warm_loss, {"input": torch.ones(1, 4)})
    del warm, captured, warm_optimizer
    torch.manual_seed(0)
    baseline = _resident_kib()
    model = workload.build().train()
    masks = masks_of(workload, model)
    weights = sum(model.get_parameter(key).numel() * model.get_parameter(key).element_size() for key in masks)
    mask_bytes = sum(mask.numel() * mask.element_size() for mask in masks.values())
    module = variant(kind, workload, model, masks).train()
    del model  # the variant holds its own copy
    inputs = workload.inputs(workload.sizes[-1])
    if step == "freeze":
        before = _resident_peak_kib(reset=True)
        frozen = fxsparse.freeze(module, inplace=True, example_kwargs=inputs, dynamic_shapes=workload.dynamic)  # type: ignore[arg-type]
        peak = _resident_peak_kib() - before
        del frozen
    else:
        optimizer = adamw(module)
        train_step(module, optimizer, workload, inputs)  # the optimizer's state exists from here on
        before = _resident_peak_kib(reset=True)
        for _ in range(2):
            train_step(module, optimizer, workload, inputs)
        peak = _resident_peak_kib() - before
    return {
        "workload": workload_name,
        "measured": name,
        "size": workload.sizes[-1],
        "baseline_mib": baseline / 1024,
        "held_before_mib": (before - baseline) / 1024,
        "peak_mib": (before + peak - baseline) / 1024,
        "step_peak_mib": peak / 1024,
        "masked_weights_mib": weights / 2**20,
        "masks_mib": mask_bytes / 2**20,
    }


def measure_memory(quick: bool) -> list[dict[str, Any]]:
    here = os.pathsep.join([str(ROOT), str(Path(__file__).resolve().parent), *sys.path])
    rows = []
    for workload in workloads(quick):
        trained = ["train/dense", "train/dense graph", *(f"train/{v}" for v in VARIANTS[1:])]
        for name in [*trained, "freeze/masked", "freeze/folded"]:
            command = [sys.executable, __file__, "--memory-child", workload, name] + (["--quick"] if quick else [])
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **_env(here)})
            if done.returncode:
                sys.stderr.write(done.stderr[-3000:])
                raise SystemExit(f"{workload} {name} failed")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr, flush=True)
    dense = {r["workload"]: r["peak_mib"] for r in rows if r["measured"] == "train/dense"}
    return [{**r, "to_dense": r["peak_mib"] / dense[r["workload"]]} for r in rows]


# --------------------------------------------------------------------------- 3. fine-tuning


def fine_tune(
    module: nn.Module, order: Sequence[str], text: torch.Tensor, sizes: Sizes, steps: int
) -> tuple[list[torch.Tensor], float]:
    """``steps`` steps of AdamW (clipped at 1.0) over the parameters named in ``order``, in that order."""
    parameters = dict(module.named_parameters())
    chosen = [parameters[name] for name in order]
    optimizer = torch.optim.AdamW(chosen, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    module.train()
    losses = []
    start = time.perf_counter()
    for ids in itertools.islice(random_batches(text, sizes, seed=2), steps):
        loss = next_byte_loss(module(input_ids=ids).logits, ids)
        loss.backward()  # type: ignore[no-untyped-call]
        nn.utils.clip_grad_norm_(chosen, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses, time.perf_counter() - start


def parametrized_name(name: str, masks: Mapping[str, torch.Tensor]) -> str:
    """A parameter's name in the FakeSparsity model: a masked weight lives under ``parametrizations``."""
    if name not in masks:
        return name
    owner, _, attribute = name.rpartition(".")
    return f"{owner}.parametrizations.{attribute}.original"


def measure_fine_tuning(pretrain_steps: int, steps: int, quick: bool) -> dict[str, Any]:
    from bench_prune import QUICK
    from bench_prune import train as pretrain

    sizes = replace(QUICK if quick else Sizes(max_files=600), steps=pretrain_steps)
    text, _, corpus = load_corpus(sizes.max_files)
    model = make_model(sizes)
    trained = pretrain(model, text, sizes)
    model.train()  # pretraining leaves it in eval mode; fine-tuning captures it in train mode
    results: dict[str, Any] = {"corpus": corpus, "pretraining": trained, "steps": steps, "patterns": {}}
    for pattern in ("50%", "2:4"):
        masks = prune(model, "magnitude", pattern, []).masks
        example = {"input_ids": next(random_batches(text, sizes, seed=2))}
        folded = fxsparse.transform(model, masks, fold=True, example_kwargs=example)
        reference = fxsparse.transform(model, masks, emit="parametrize")
        order = [name for name, _ in folded.named_parameters()]
        folded_losses, folded_s = fine_tune(folded, order, text, sizes, steps)
        reference_losses, reference_s = fine_tune(
            reference, [parametrized_name(name, masks) for name in order], text, sizes, steps
        )
        first_differing = next(
            (i for i, (a, b) in enumerate(zip(folded_losses, reference_losses, strict=True)) if not torch.equal(a, b)),
            None,
        )
        effective_equal = all(
            torch.equal(folded.get_parameter(name), reference.get_submodule(name.rpartition(".")[0]).weight)
            for name in masks
        )
        results["patterns"][pattern] = {
            "first_differing_step": first_differing,
            "final_weights_equal": effective_equal,
            "first_loss": float(folded_losses[0]),
            "last_loss": float(folded_losses[-1]),
            "folded_s": folded_s,
            "fakesparsity_s": reference_s,
            "load_end": os.getloadavg()[0],
        }
        print(pattern, results["patterns"][pattern], file=sys.stderr, flush=True)
        del folded, reference
    return results


# --------------------------------------------------------------------------- report


RESULTS = ROOT / "tools" / "results" / "train-cpu.json"


def machine_of(results: Mapping[str, Any], section: str) -> str:
    machine = results.get("machines", {}).get(section, results["machine"])
    load = machine["load_average"][0], machine.get("load_average_end", [float("nan")])[0]
    return (
        f"*Measured* on {machine['cpu']}, {machine['cores']} cores, {machine['threads']} torch thread, torch "
        f"{machine['torch']}, {machine['date'][:16].replace('T', ' ')} UTC, load average {load[0]:.2f} at the start "
        f"and {load[1]:.2f} at the end (a machine shared with other work)."
    )


def table_time(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["| workload | size | compiled | dense step | FakeSparsity | masked graph | folded |"]
    lines.append("|---|---:|---|---:|---:|---:|---:|")
    keys = sorted({(r["workload"], r["size"], r["compiled"]) for r in rows}, key=lambda k: (k[0], k[2], k[1]))
    for key in keys:
        by = {r["variant"]: r for r in rows if (r["workload"], r["size"], r["compiled"]) == key}
        unit = "rows" if key[0].startswith("4") else "tokens"
        cells = " | ".join(f"{by[v]['to_dense']:.2f}×" for v in VARIANTS[1:])
        compiled = "torch.compile" if key[2] else "eager"
        lines.append(f"| {key[0]} | {key[1]} {unit} | {compiled} | {by['dense']['ms']:.1f} ms | {cells} |")
    return lines


def table_memory(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["| workload | measured | peak above baseline | ÷ dense step | masked weights | masks |"]
    lines.append("|---|---|---:|---:|---:|---:|")
    for r in rows:
        lines.append(
            f"| {r['workload']} ({r['size']}) | {r['measured']} | {r['peak_mib']:.0f} MiB | {r['to_dense']:.2f}× | "
            f"{r['masked_weights_mib']:.0f} MiB | {r['masks_mib']:.0f} MiB |"
        )
    return lines


def table_finetune(tuned: Mapping[str, Any]) -> list[str]:
    lines = ["| pattern | first step whose loss differs | weights equal at the end | loss, first → last step | "]
    lines[0] += "folded | FakeSparsity |"
    lines.append("|---|---|---|---|---:|---:|")
    for pattern, r in tuned["patterns"].items():
        first = "none: identical curves" if r["first_differing_step"] is None else f"step {r['first_differing_step']}"
        lines.append(
            f"| {pattern} | {first} | {'yes' if r['final_weights_equal'] else 'no'} | {r['first_loss']:.3f} → "
            f"{r['last_loss']:.3f} | {r['folded_s']:.1f} s | {r['fakesparsity_s']:.1f} s |"
        )
    return lines


def time_summary(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[str]:
    """Folded ÷ dense at its worst and at its best over both runs, and FakeSparsity's, for comparison."""
    lines = []
    for name, label in (("folded", "Folded"), ("fakesparsity", "FakeSparsity"), ("masked", "The masked graph")):
        ratios = [r["to_dense"] for rows in runs for r in rows if r["variant"] == name]
        within = sum(ratio <= 1.05 for ratio in ratios)
        lines.append(
            f"- {label}: {min(ratios):.2f}× to {max(ratios):.2f}× the dense step; {within} of {len(ratios)} "
            "measurements within 1.05×."
        )
    return lines


def time_explained(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[str]:
    """What a folded step pays over the dense one, per masked weight, where it shows most (the stack at 1 row)."""

    def fastest(variant: str) -> float:
        return min(
            float(r["ms"]) for rows in runs for r in rows
            if r["variant"] == variant and r["workload"].startswith("4") and r["size"] == 1 and not r["compiled"]
        )  # fmt: skip

    extra = (fastest("folded") - fastest("dense")) / 4
    forward = (fastest("fakesparsity") - fastest("folded")) / 4
    return [
        "Where the folded step misses 1.05×, what it pays over the dense step is the gradient's mask: one "
        "`grad * mask` per masked weight in the backward, a pass over the weight's gradient and its mask, on one "
        f"thread here about {extra:.1f} ms per 2048 × 2048 weight (the stack at one row, eager). FakeSparsity pays "
        f"it too, and its product in the forward besides (about {forward:.1f} ms more per weight). It weighs most "
        "where the step does little else (one row, 32 tokens) and fades as the batch grows (the Llama at 512 "
        "tokens); on a GPU it is a memory-bound pass at its bandwidth."
    ]


def memory_summary(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each workload's folded step against the target (dense + masks) and against the dense capture + masks."""
    lines = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        by = {r["measured"]: r for r in rows if r["workload"] == workload}
        masks = by["train/folded"]["masks_mib"]
        folded, dense = by["train/folded"]["peak_mib"], by["train/dense"]["peak_mib"]
        line = f"- {workload}: folded {folded:.0f} MiB against dense + masks {dense + masks:.0f} MiB"
        if "train/dense graph" in by:
            line += f" (the dense capture + masks: {by['train/dense graph']['peak_mib'] + masks:.0f} MiB)"
        fake = by["train/fakesparsity"]["peak_mib"]
        lines.append(line + f"; FakeSparsity {fake:.0f} MiB. Freezing the folded output in place: "
                     f"{by['freeze/folded']['step_peak_mib']:+.0f} MiB, the masked one "
                     f"{by['freeze/masked']['step_peak_mib']:+.0f} MiB.")  # fmt: skip
    return lines


def docs_section(results: Mapping[str, Any]) -> list[str]:
    """The "Fine-tuning, folded" section of docs/performance.md (see tools/bench_speed.py's ``docs_page``)."""
    lines = [
        "## Fine-tuning, folded",
        "",
        "`fxsparse.transform(model, masks, fold=True)` "
        "([how it works](distributed.md#folded-fine-tuning-without-the-product)) trains without the product: its "
        "weights hold `mask * weight`, its graph reads them as they are, and only the gradients are masked. "
        "`tools/bench_train.py` measures it against dense (the weights masked once, no masks), FakeSparsity "
        "and the masked graph, every linear weight 50 % pruned by magnitude (the Llama's head left out). "
        "Rerun it, and this section, with:",
        "",
        "```bash",
        "python tools/bench_train.py --time --memory --finetune --json tools/results/train-cpu.json --docs",
        "```",
    ]
    if "time" in results:
        lines += [
            "",
            "Training step time (forward, backward, `AdamW(fused=True).step`) ÷ the dense step's: "
            "4 × (Linear(2048, 2048) + ReLU) at 1 and 64 rows, and a `LlamaForCausalLM` (4 layers, hidden 256, "
            "vocabulary 4096, random weights) at 32 to 512 tokens; each the fastest of "
            f"{results.get('repeats', 10)} steps after 3 warm-up steps, one torch thread; compiled: "
            "`torch.compile` of the model (forward and backward), the optimizer eager. Target: folded ≤ 1.05×. "
            + machine_of(results, "time"),
        ]
        for number, rows in enumerate(results["time"], 1):
            lines += ["", f"Run {number} of 2:", "", *table_time(rows)]
        lines += ["", *time_summary(results["time"])]
        lines += ["", *time_explained(results["time"])]
    if "optimizer" in results:
        by = {(r["implementation"], r["zero_gradients"]): r["ms"] for r in results["optimizer"]}
        lines += [
            "",
            "Why fused: on this CPU, torch's `sqrt` is several times slower on zeros, and every pruned entry's "
            "second moment is zero (FakeSparsity's as well as the folded model's; the dense baseline has none). "
            "One `AdamW.step` over 4 × 2048² weights, dense gradients → gradients zero at half the entries:",
            "",
            "| AdamW | dense gradients | half zero | ÷ |",
            "|---|---:|---:|---:|",
            *(
                f"| {name} | {by[(name, False)]:.1f} ms | {by[(name, True)]:.1f} ms | "
                f"{by[(name, True)] / by[(name, False)]:.2f}× |"
                for name in ("for-loop", "foreach", "fused")
            ),
        ]
    if "memory" in results:
        lines += [
            "",
            "Peak resident memory of a fine-tuning step (`AdamW`, its state made by a step before), each in a fresh "
            "process, above the process's baseline (Python, torch, transformers), ÷ the dense model's step; and "
            'the peak of `fxsparse.freeze(out, inplace=True)`. Target: folded ≤ dense + masks. "dense graph" is '
            "the dense model captured as fxsparse captures it (`transform(dense, {})`: FX for the linear stack, "
            "torch.export for the Llama), which holds the captured graph besides the weights: a few MiB, whatever "
            "the model's width. The Llama, captured by torch.export in train mode, is captured again in eval mode by "
            "`freeze` (one capture, folded or not); the linear stack, an FX capture, is frozen where it is. What "
            "a folded step holds beyond the dense one and its masks is, for a moment, one weight's gradient twice "
            "(as computed, and masked: 16 MiB for a 2048 × 2048 weight). " + machine_of(results, "memory"),
            "",
            *table_memory(results["memory"]),
            "",
            *memory_summary(results["memory"]),
        ]
    if "finetune" in results:
        tuned = results["finetune"]
        pretraining = tuned["pretraining"]
        lines += [
            "",
            f"A {tuned['steps']}-step fine-tune of tools/bench_prune.py's small language model "
            f"({pretraining['parameters']:,} parameters, trained here {pretraining['steps']} steps on the Python "
            "standard library's source), pruned by magnitude at 50 % and at 2:4 (`lm_head` left out), folded and "
            "with FakeSparsity, from the same weights on the same batches (AdamW, gradients clipped at 1.0, the "
            "parameters given to the optimizer in the same order): the first step whose loss differs, and each "
            "one's wall time. " + machine_of(results, "finetune"),
            "",
            *table_finetune(tuned),
        ]
    return lines


def tables(results: Mapping[str, Any]) -> str:
    return "\n".join(docs_section(results))


def write_docs() -> None:
    """docs/performance.md again, as tools/bench_speed.py writes it (which reads ``RESULTS`` for this section)."""
    import bench_speed

    speed = json.loads((ROOT / "tools" / "results" / "speed-cpu.json").read_text())
    (ROOT / "docs" / "performance.md").write_text(bench_speed.docs_page(speed, None))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", action="store_true", help="step times (run twice)")
    parser.add_argument("--memory", action="store_true", help="peak memory of a step, in child processes")
    parser.add_argument("--finetune", action="store_true", help="the 200-step fine-tune, folded vs FakeSparsity")
    parser.add_argument("--docs", action="store_true", help="write docs/performance.md (bench_speed's page) again")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per measurement (default: 10)")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="dense training first (default: 300)")
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps (default: 200)")
    parser.add_argument("--quick", action="store_true", help="smaller everything: a smoke test")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--from-json", type=Path, help="print the tables of saved results")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.memory_child:
        workload_name, measured = args.memory_child
        print(json.dumps(memory_child(workload_name, measured, args.quick)))
        return 0
    if args.from_json:
        print(tables(json.loads(args.from_json.read_text())))
        if args.docs:
            write_docs()
        return 0
    # Sections measured at different times go into one file: those not measured now are kept.
    kept = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    results: dict[str, Any] = {**kept, "machine": machine_info(), "quick": args.quick}
    if args.time:
        repeats = results["repeats"] = 3 if args.quick else args.repeats
        results["time"] = [
            with_ratios([row for workload in workloads(args.quick).values() for row in time_steps(workload, repeats)])
            for _ in range(2)
        ]
        results["optimizer"] = optimizer_rows(repeats)
    if args.memory:
        results["memory"] = measure_memory(args.quick)
    if args.finetune:
        results["finetune"] = measure_fine_tuning(
            3 if args.quick else args.pretrain_steps, 5 if args.quick else args.steps, args.quick
        )
    results["machine"]["load_average_end"] = list(os.getloadavg())
    for section in ("time", "memory", "finetune"):
        if getattr(args, section):
            results.setdefault("machines", {})[section] = results["machine"]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(tables(results))
    if args.docs:
        write_docs()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
