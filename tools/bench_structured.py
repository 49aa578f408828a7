"""Structured pruning: is the shrunk model faster, are the groups right, does it reload, what does it cost?

Four parts, each a section of ``docs/structured-pruning.md``:

1. ``speed``: CPU time of a forward of the shrunk model against the dense one, at batch 1
   and 64, on a 4×4096 MLP (four ``Linear(4096, 4096)`` with ReLU) and a small Llama
   (transformers ``LlamaForCausalLM`` from a config: hidden 512, MLP 1536, 4 layers, 8 query
   and 4 key/value heads, sequence 32), with 25, 50 and 75 % of the units of every prunable
   group removed (``masks.channels`` per group, ``shrink``); the ideal speed-up is the ratio
   of the multiply-adds of the linear layers; CSR (``freeze(..., layout="csr")``) runs the
   dense model's layers at the same fraction of weights removed (magnitude masks).
2. ``groups``: the groups fxsparse finds against Torch-Pruning's (``DependencyGraph``), run in
   its own virtual environment (``--tp-python``), on the same models: the differences and the
   time each takes to build them.
3. ``reload``: whether each tool's pruned transformers model loads again in its own class
   with ``from_pretrained``.
4. ``perplexity``: tools/bench_prune.py's small trained language model with 25 % of its MLP
   channels removed, by the L2 score and by the activation-aware one.

Usage::

    python tools/bench_structured.py [--quick] [--parts speed,groups,reload,perplexity]
        [--tp-python /work/venv-tp/bin/python] [--json tools/results/structured-cpu.json]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

FRACTIONS = (0.25, 0.5, 0.75)


# --------------------------------------------------------------------------- models (both environments)


def mlp(width: int = 4096, layers: int = 4) -> nn.Module:
    torch.manual_seed(0)
    parts: list[nn.Module] = []
    for index in range(layers):
        parts.append(nn.Linear(width, width))
        if index < layers - 1:
            parts.append(nn.ReLU())
    return nn.Sequential(*parts).eval()


def llama(hidden: int = 512, intermediate: int = 1536, layers: int = 4, heads: int = 8, kv_heads: int = 4) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128, use_cache=False,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(config)
    return model.eval()


def tiny_llama() -> Any:
    return llama(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2)


def tiny_gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=64, use_cache=False)
    model: Any = GPT2LMHeadModel(config)
    return model.eval()


class Flipped(nn.Module):
    """Channels reversed between two layers: row i of fc1 feeds column 7 - i of fc2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.flip(self.fc1(x), [-1]))  # type: ignore[no-any-return]


class GroupedCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.head(torch.relu(self.conv3(h)).mean(dim=(2, 3)))  # type: ignore[no-any-return]


def comparison_models() -> dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]]:
    """name -> (factory, inputs as {"args": ..., "kwargs": ...}) for the groups comparison."""
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    return {
        "mlp 4x256": (lambda: mlp(256), {"args": (torch.randn(2, 256),), "kwargs": {}}),
        "cnn (batchnorm, grouped conv)": (
            lambda: GroupedCNN().eval(),
            {"args": (torch.randn(1, 3, 8, 8),), "kwargs": {}},
        ),
        "flip between two layers": (Flipped, {"args": (torch.randn(2, 4),), "kwargs": {}}),
        "llama tiny (GQA)": (tiny_llama, {"args": (), "kwargs": {"input_ids": ids}}),
        "gpt2 tiny": (tiny_gpt2, {"args": (), "kwargs": {"input_ids": ids}}),
    }


# --------------------------------------------------------------------------- Torch-Pruning (child process)


def tp_child(part: str) -> dict[str, Any]:
    """Run in Torch-Pruning's environment: its groups (with build times), or its pruned Llama's reload."""
    import torch_pruning as tp  # type: ignore[import-not-found]  # in its own environment (--tp-python)

    if part == "reload":
        return tp_reload(tp)
    found: dict[str, Any] = {}
    for name, (factory, inputs) in comparison_models().items():
        if name != part:
            continue
        model = factory()
        example = inputs["kwargs"] or inputs["args"][0]
        start = time.perf_counter()
        try:
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
            groups = list(graph.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]))
        except Exception as error:
            found[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
            continue
        seconds = time.perf_counter() - start
        names = {module: module_name for module_name, module in model.named_modules()}
        listed = []
        for group in groups:
            members = set()
            for item in group:
                dep = item.dep
                module = dep.target.module
                handler = getattr(dep.handler, "__name__", str(dep.handler))
                if not hasattr(module, "weight"):
                    continue
                dim = 1 if "in_channels" in handler else 0
                if isinstance(module, nn.Embedding):
                    dim = 1
                if isinstance(module, nn.BatchNorm2d | nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
                    dim = 0
                if type(module).__name__ == "Conv1D":  # transformers' Conv1D holds [in, out]
                    dim = 1 - dim
                members.add(f"{names.get(module, '?')}.weight[{dim}]")
            listed.append(sorted(members))
        found[name] = {"seconds": seconds, "groups": listed}
    return found


def tp_reload(tp: Any) -> dict[str, Any]:
    model = tiny_llama()
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    num_heads = {m.q_proj: m.config.num_attention_heads for m in model.modules() if hasattr(m, "q_proj")}
    kwargs: dict[str, Any] = {"pruning_ratio": 0.5, "ignored_layers": [model.lm_head], "num_heads": num_heads}
    kwargs.update(prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.5)
    try:
        pruner = tp.pruner.MetaPruner(
            model, {"input_ids": ids}, importance=tp.importance.MagnitudeImportance(), **kwargs
        )
        pruner.step()
        with torch.no_grad():
            model(input_ids=ids)
        ran = True
    except Exception as error:
        return {"pruned": False, "error": f"{type(error).__name__}: {error}"[:300]}
    shapes = {name: list(p.shape) for name, p in model.named_parameters() if "layers.0." in name}
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        try:
            type(model).from_pretrained(folder)
            reloaded, error_text = True, ""
        except Exception as error:
            reloaded, error_text = False, f"{type(error).__name__}: {str(error).splitlines()[0]}"[:300]
    return {"pruned": True, "runs": ran, "reloads": reloaded, "error": error_text, "layer0_shapes": shapes}


def run_tp(python: str, part: str, timeout: float = 120) -> dict[str, Any]:
    """Torch-Pruning in its own environment; ``part`` is "reload" or a model of :func:`comparison_models`."""
    try:
        completed = subprocess.run(
            [python, __file__, "--tp-child", part], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout:.0f} s"}
    if completed.returncode != 0:
        return {"error": completed.stderr.strip().splitlines()[-1] if completed.stderr.strip() else "failed"}
    return json.loads(completed.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def tp_groups(python: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in comparison_models():
        result = run_tp(python, name)
        found[name] = result.get(name, result)
    return found


# --------------------------------------------------------------------------- fxsparse's side


def fx_groups() -> dict[str, Any]:
    import fxsparse

    found: dict[str, Any] = {}
    fxsparse.groups(nn.Linear(2, 2), example_inputs=(torch.randn(1, 2),))  # warm up: torch.export's first run
    for name, (factory, inputs) in comparison_models().items():
        model = factory()
        start = time.perf_counter()
        groups = fxsparse.groups(model, example_inputs=inputs["args"] or None, example_kwargs=inputs["kwargs"] or None)
        seconds = time.perf_counter() - start
        listed = [
            {
                "members": sorted(f"{m.tensor}[{m.dim}]" for m in g.members if m.tensor.endswith(".weight")),
                "units": g.units,
                "prunable": g.prunable,
                "blocked": g.blocked,
                "exact": g.exact,
            }
            for g in groups
        ]
        found[name] = {"seconds": seconds, "groups": listed}
    return found


def compare_groups(fx: Mapping[str, Any], tp: Mapping[str, Any]) -> dict[str, Any]:
    """Per model: the groups (as sets of weight dimensions) only one tool has."""
    compared: dict[str, Any] = {}
    for name, mine in fx.items():
        theirs = tp.get(name, {})
        if "groups" not in theirs:
            compared[name] = {"fxsparse_s": mine["seconds"], "torch_pruning": theirs.get("error", "missing")}
            continue
        ours = {frozenset(g["members"]) for g in mine["groups"] if g["prunable"]}
        blocked = {frozenset(g["members"]): g["blocked"] for g in mine["groups"] if not g["prunable"]}
        their_sets = {frozenset(g) for g in theirs["groups"] if g}
        compared[name] = {
            "fxsparse_s": mine["seconds"],
            "torch_pruning_s": theirs["seconds"],
            "ratio": theirs["seconds"] / mine["seconds"],
            "fxsparse_prunable": len(ours),
            "torch_pruning_groups": len(their_sets),
            "only_fxsparse": sorted(sorted(s) for s in ours - their_sets),
            "only_torch_pruning": [
                {"members": sorted(s), "fxsparse_says": next((b for k, b in blocked.items() if k & s), None)}
                for s in their_sets - ours
            ],
        }
    return compared


def fx_reload() -> dict[str, Any]:
    import fxsparse

    model = tiny_llama()
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    masks = fxsparse.masks.channels(model, 0.5, example_kwargs={"input_ids": ids})
    small: Any = fxsparse.shrink(fxsparse.transform(model, masks, example_kwargs={"input_ids": ids}))
    with tempfile.TemporaryDirectory() as folder:
        small.save_pretrained(folder)
        again = type(model).from_pretrained(folder).eval()
    with torch.no_grad():
        equal = torch.equal(again(input_ids=ids).logits, small(input_ids=ids).logits)
    return {"reloads": True, "equal_after_reload": equal, "config": {
        k: getattr(small.config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                             "num_key_value_heads", "head_dim")}}  # fmt: skip


# --------------------------------------------------------------------------- speed


def linear_macs(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def time_forward(functions: Mapping[str, Callable[[], Any]], quick: bool) -> dict[str, float]:
    from bench_speed import interleaved, medians

    with torch.no_grad():
        return medians(interleaved(functions, rounds=3 if quick else 7, min_sample_s=0.05 if quick else 0.3))


def call(model: Any, inputs: dict[str, Any]) -> Any:
    return model(*inputs["args"], **inputs["kwargs"])


def speed(quick: bool) -> list[dict[str, Any]]:
    from bench_speed import bind

    import fxsparse

    rows: list[dict[str, Any]] = []
    width = 512 if quick else 4096
    models: list[tuple[str, Callable[[], nn.Module], Callable[[int], dict[str, Any]]]] = [
        (f"mlp 4x{width}", lambda: mlp(width), lambda b: {"args": (torch.randn(b, width),), "kwargs": {}}),
        (
            "llama small",
            (lambda: llama(128, 384, 2, 4, 2)) if quick else llama,
            lambda b: {"args": (), "kwargs": {"input_ids": torch.randint(0, 1024, (b, 32))}},
        ),
    ]
    for name, factory, inputs_for in models:
        dense = factory()
        example = inputs_for(1)
        for fraction in FRACTIONS:
            masks = fxsparse.masks.channels(
                dense, fraction, example_inputs=example["args"] or None, example_kwargs=example["kwargs"] or None
            )
            out = fxsparse.transform(dense, masks, example_inputs=example["args"] or None,
                                     example_kwargs=example["kwargs"] or None)  # fmt: skip
            del masks
            gc.collect()
            small = fxsparse.shrink(out, example_inputs=example["args"] or None,
                                    example_kwargs=example["kwargs"] or None).eval()  # fmt: skip
            del out
            ideal = linear_macs(dense) / linear_macs(small)
            weight_sparsity = 1 - linear_macs(small) / linear_macs(dense)
            csr = None
            if name.startswith("mlp"):
                unstructured = fxsparse.masks.magnitude(dense, weight_sparsity, include="*")
                unstructured = {k: v for k, v in unstructured.items() if k.endswith("weight")}
                masked = fxsparse.transform(dense, unstructured)
                del unstructured
                csr = fxsparse.freeze(masked, layout="csr")
                del masked
                gc.collect()
            for batch in (1, 64):
                x = inputs_for(batch)
                functions: dict[str, Callable[[], Any]] = {
                    "dense": bind(call, dense, x),
                    "shrunk": bind(call, small, x),
                }
                if csr is not None:
                    functions["csr"] = bind(call, csr, x)
                times: dict[str, float] = time_forward(functions, quick)
                row: dict[str, Any] = {
                    "model": name, "removed": fraction, "batch": batch, "weight_sparsity": weight_sparsity,
                    "ideal": ideal, "dense_ms": times["dense"] * 1e3, "shrunk_ms": times["shrunk"] * 1e3,
                    "speedup": times["dense"] / times["shrunk"],
                }  # fmt: skip
                row["of_ideal"] = row["speedup"] / ideal
                if "csr" in times:
                    row["csr_ms"] = times["csr"] * 1e3
                    row["csr_speedup"] = times["dense"] / times["csr"]
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            del small, csr, functions
            gc.collect()  # the next fraction's models are built with this one's freed (a 4x4096 MLP is 256 MB)
    return rows


# --------------------------------------------------------------------------- perplexity


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits  # type: ignore[no-any-return]


def perplexity_part(quick: bool) -> dict[str, Any]:
    import bench_prune

    import fxsparse

    sizes = bench_prune.QUICK if quick else bench_prune.Sizes()
    train_text, held_out_text, corpus = bench_prune.load_corpus(sizes.max_files)
    model = bench_prune.make_model(sizes)
    training = bench_prune.train(model, train_text, sizes)
    evaluation = bench_prune.windows(held_out_text, sizes.eval_sequences, sizes.sequence)
    calibration = bench_prune.windows(train_text, min(32, sizes.calibration_sequences), sizes.sequence)
    dense = bench_prune.perplexity(lambda ids: model(input_ids=ids).logits, evaluation, sizes.batch)
    results: dict[str, Any] = {"dense": dense, "training": training, "corpus": corpus, "sizes": sizes.__dict__}
    for score in ("l2", "activation"):
        start = time.perf_counter()
        masks = fxsparse.masks.channels(
            model, 0.25, example_kwargs={"input_ids": calibration}, include="*mlp*", score=score
        )
        out = fxsparse.transform(model, masks, example_kwargs={"input_ids": calibration[:2]})
        small: Any = fxsparse.shrink(out)
        seconds = time.perf_counter() - start
        value = bench_prune.perplexity(functools.partial(logits, small), evaluation, sizes.batch)
        results[score] = {
            "perplexity": value, "increase": value - dense, "seconds": seconds,
            "intermediate_size": small.config.intermediate_size,
        }  # fmt: skip
        print(f"{score}: perplexity {value:.3f} (dense {dense:.3f})", file=sys.stderr, flush=True)
    return results


# --------------------------------------------------------------------------- report


def markdown(results: Mapping[str, Any]) -> str:
    """The tables of docs/structured-pruning.md's measured section."""
    lines: list[str] = []
    machine = results.get("machine", {})
    if machine:
        lines.append(
            f"{machine.get('cpu')}, {machine.get('threads')} thread(s), torch {machine.get('torch')}; load average "
            f"{machine.get('load_average', [0])[0]:.2f} at the start, {machine.get('load_average_end', [0])[0]:.2f} "
            "at the end.\n"
        )
    if "speed" in results:
        lines += [
            "| model | removed | batch | dense ms | shrunk ms | speed-up | ideal | of ideal | CSR ms (same weights) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in results["speed"]:
            csr = f"{row['csr_ms']:.1f} ({row['csr_speedup']:.2f}×)" if "csr_ms" in row else "-"
            lines.append(
                f"| {row['model']} | {row['removed']:.0%} | {row['batch']} | {row['dense_ms']:.1f} | "
                f"{row['shrunk_ms']:.1f} | {row['speedup']:.2f}× | {row['ideal']:.2f}× | {row['of_ideal']:.2f} "
                f"| {csr} |"
            )
        lines.append("")
    if "groups" in results:
        lines += ["| model | fxsparse s | Torch-Pruning s | fxsparse / Torch-Pruning |", "|---|---|---|---|"]
        for name, row in results["groups"]["compared"].items():
            if "torch_pruning_s" in row:
                ratio = row["fxsparse_s"] / row["torch_pruning_s"]
                lines.append(f"| {name} | {row['fxsparse_s']:.3f} | {row['torch_pruning_s']:.3f} | {ratio:.0f}× |")
            else:
                lines.append(f"| {name} | {row['fxsparse_s']:.3f} | {row['torch_pruning']} | - |")
        lines.append("")
    if "perplexity" in results:
        ppl = results["perplexity"]
        lines += ["| MLP channels removed (25 %) | perplexity | increase |", "|---|---|---|"]
        lines.append(f"| none (dense) | {ppl['dense']:.3f} | - |")
        for score in ("l2", "activation"):
            lines.append(f"| score={score!r} | {ppl[score]['perplexity']:.3f} | +{ppl[score]['increase']:.3f} |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test, numbers are noise")
    parser.add_argument("--parts", default="speed,groups,reload,perplexity")
    parser.add_argument("--tp-python", default="/work/venv-tp/bin/python", help="Python with torch-pruning")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the timed runs (default 1)")
    parser.add_argument("--from-json", type=Path, nargs="+", help="print the tables of earlier runs' results")
    parser.add_argument("--tp-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.from_json:
        for path in args.from_json:
            print(markdown(json.loads(path.read_text())))
        return 0
    if args.tp_child:
        print(json.dumps(tp_child(args.tp_child)))
        return 0
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_speed import machine_info

    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    results: dict[str, Any] = {"machine": machine_info(), "quick": args.quick}
    if "groups" in parts:
        fx = fx_groups()
        tp = tp_groups(args.tp_python)
        results["groups"] = {"fxsparse": fx, "torch_pruning": tp, "compared": compare_groups(fx, tp)}
    if "reload" in parts:
        results["reload"] = {"fxsparse": fx_reload(), "torch_pruning": run_tp(args.tp_python, "reload")}
    if "speed" in parts:
        results["speed"] = speed(args.quick)
    if "perplexity" in parts:
        results["perplexity"] = perplexity_part(args.quick)
    results["machine"]["load_average_end"] = list(os.getloadavg())
    text = json.dumps(results, indent=1, default=str)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
