"""How fast is fxsparse's output, next to dense, FakeSparsity and sparse kernels?

Measures, in one process and on models with random weights (nothing is downloaded), and
prints ratios (absolute times only for scale):

a. ``setup``: ``fxsparse.transform`` ÷ ``torch.fx.symbolic_trace``, and
   ``WeightNormSparsifier().prepare(copy, config=None)`` ÷ trace, on N × (Linear(16, 16) + ReLU);
b. ``forward``: inference latency under ``torch.no_grad()``, ÷ the dense model in eager mode, of
   the dense model, the dense model captured as fxsparse captures it (``transform(model, {})``:
   what the capture itself costs), the FakeSparsity model (``emit="parametrize"``), the masked graph
   (``transform``), the frozen graph (``freeze(out)``) and the sparse-kernel graph
   (``freeze(out, layout="auto")``, tuned at each batch), each also under ``torch.compile``;
   on an MLP of 4 × (Linear(4096, 4096) + ReLU) at 90 % unstructured magnitude sparsity and
   on a tiny Llama (transformers' ``LlamaForCausalLM``, 2 layers, hidden size 256, 32
   tokens), at batch 1 and 64;
c. ``training``: one SGD step (forward, backward, step) of the dense model and the masked
   graph ÷ the FakeSparsity model's (MLP of 4 × Linear(2048, 2048) at batch 64, the tiny Llama);
d. ``kernels``: one Linear(4096, 4096) at 50 to 99 % sparsity, unstructured (``masks.magnitude``),
   16 × 16 blocks (``masks.block``) and 2:4 (``masks.n_m``): speed-up (dense time ÷ time,
   > 1 is faster) of ``freeze(out, layout=...)`` with ``"csr"``, ``"bsr"`` and ``"auto"``
   over the dense frozen graph, and of torch's own ``torch.sparse.mm`` on an int32 CSR
   weight (a reference for the kernel alone), which layout ``"auto"`` picked, and the
   largest absolute difference from the dense frozen output;
e. ``memory``: a 4096 × 4096 mask as float32, bool and packed bits (the size of
   ``fxsparse.save_masks(..., packed=True)``'s file), and CSR storage (int32 indices) of the
   weight at 90 %, against the dense weight; extrapolated to 7e9 weights.

Times are medians over interleaved rounds: each round runs every variant once, in a random
order, so that the machine's drift hits all alike. ``torch.compile`` runs in a child process
per model and variant (``--child compile``): FakeSparsity is on dynamo's skip list and
compiling several variants in one process can reuse the wrong fallback. Each child times
its compiled variant against the dense model in eager mode, interleaved, in that process,
with ``torch._inductor.config.freezing = True`` set for the first (compiling) call.

Usage::

    python tools/bench_speed.py [--quick] [--no-compile] [--sections setup forward training kernels memory]
                                [--json out.json] [--markdown out.md] [--docs] [--gpu-json gpu.json]

The run behind ``docs/performance.md`` is kept in ``tools/results/speed-cpu.json``;
``--from-json FILE --docs`` rewrites the page from such a file without measuring (with
``--gpu-json``, adding a GPU run's numbers). ``--quick`` shrinks every model and repeat count
(a smoke test, well under a minute);
``--docs`` writes ``docs/performance.md`` from the results (with ``--gpu-json``, also the
numbers of a ``tools/bench_gpu.py`` run).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.fx  # noqa: E402
from bench_transform import best_time, best_time_with, make_model, prepare_sparsifier  # noqa: E402
from torch import nn  # noqa: E402

import fxsparse  # noqa: E402

SECTIONS = ("setup", "forward", "training", "kernels", "memory")
VARIANTS = ("dense", "captured", "fakesparsity", "masked", "frozen", "sparse_auto")
VARIANT_LABELS = {
    "dense": "dense",
    "captured": "dense graph",
    "fakesparsity": "FakeSparsity",
    "masked": "masked graph",
    "frozen": "frozen",
    "sparse_auto": 'layout="auto"',
}
KERNEL_VARIANTS = ("csr", "bsr", "auto", "torch_csr_mm")
SEVEN_B = 7e9


@dataclass(frozen=True)
class Sizes:
    """Everything --quick shrinks."""

    setup_layers: tuple[int, ...] = (100, 1000, 5000)
    setup_repeat: int = 2
    mlp_width: int = 4096
    mlp_layers: int = 4
    sparsity: float = 0.9
    batches: tuple[int, ...] = (1, 64)
    llama: tuple[int, int, int, int] = (256, 688, 2, 1000)  # hidden, intermediate, layers, vocabulary
    llama_heads: int = 4
    tokens: int = 32
    rounds: int = 15
    min_sample_s: float = 0.02
    train_width: int = 2048
    train_batch: int = 64
    train_rounds: int = 9
    kernel_width: int = 4096
    kernel_sparsities: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
    kernel_rounds: int = 7
    block: int = 16
    memory_width: int = 4096
    child_timeout_s: float = 420.0
    compile_models: tuple[str, ...] = ("mlp", "llama")


QUICK = Sizes(
    setup_layers=(10, 50),
    setup_repeat=1,
    mlp_width=128,
    mlp_layers=2,
    batches=(1, 8),
    llama=(32, 64, 1, 96),
    llama_heads=2,
    tokens=8,
    rounds=3,
    min_sample_s=0.002,
    train_width=128,
    train_batch=8,
    train_rounds=3,
    kernel_width=128,
    kernel_sparsities=(0.5, 0.9),
    kernel_rounds=3,
    memory_width=256,
    child_timeout_s=60.0,
    compile_models=("mlp",),
)


# --------------------------------------------------------------------------- helpers


def error_text(error: BaseException) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}"[:300]


def interleaved(functions: Mapping[str, Callable[[], Any]], rounds: int, min_sample_s: float) -> dict[str, list[float]]:
    """Seconds per call of each function, one sample a round; every round runs all functions
    (in a random order), each as many times as makes a sample last ``min_sample_s``."""
    names = list(functions)
    numbers: dict[str, int] = {}
    for name in names:
        functions[name]()  # warm up: first-call allocations, lazy initialisation
        start = time.perf_counter()
        functions[name]()
        once = time.perf_counter() - start
        numbers[name] = max(1, math.ceil(min_sample_s / max(once, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(0)
    for _ in range(rounds):
        gc.collect()
        # A fresh order each round: a fixed rotation always runs a variant after the same other
        # one (and its cache state), which biased identical computations by up to 14 %.
        shuffled = names[:]
        order.shuffle(shuffled)
        for name in shuffled:
            function, number = functions[name], numbers[name]
            start = time.perf_counter()
            for _ in range(number):
                function()
            samples[name].append((time.perf_counter() - start) / number)
    return samples


def bind(function: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """``function`` with its arguments bound now (not a late-binding closure over a loop variable)."""
    return lambda: function(*args)


def medians(samples: Mapping[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in samples.items()}


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "fxsparse": fxsparse.__version__,
        "load_average": list(os.getloadavg()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, sparse ones counted by their index and value tensors."""
    if tensor.layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = [tensor.crow_indices(), tensor.col_indices(), tensor.values()]
    elif tensor.layout in (torch.sparse_csc, torch.sparse_bsc):
        parts = [tensor.ccol_indices(), tensor.row_indices(), tensor.values()]
    elif tensor.layout == torch.sparse_coo:
        parts = [tensor._indices(), tensor._values()]
    else:
        return tensor.untyped_storage().nbytes() if tensor.numel() else 0
    return sum(part.numel() * part.element_size() for part in parts)


def module_bytes(module: nn.Module) -> int:
    """Bytes of every distinct tensor a module holds (parameters, buffers, tensor attributes)."""
    seen: set[int] = set()
    total = 0
    tensors: list[torch.Tensor] = [t for _, t in module.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in module.named_buffers(remove_duplicate=False)]
    for sub in module.modules():
        tensors += [v for v in vars(sub).values() if isinstance(v, torch.Tensor)]
    for tensor in tensors:
        key = id(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(tensor)
    return total


# --------------------------------------------------------------------------- models


class Model:
    """A model to benchmark: how to build it, call it, and mask it."""

    def __init__(self, name: str, sizes: Sizes) -> None:
        self.name = name
        self.sizes = sizes

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        if self.name == "mlp":
            width = self.sizes.mlp_width
            return nn.Sequential(
                *(m for _ in range(self.sizes.mlp_layers) for m in (nn.Linear(width, width), nn.ReLU()))
            )
        if self.name == "mlp_train":
            width = self.sizes.train_width
            return nn.Sequential(
                *(m for _ in range(self.sizes.mlp_layers) for m in (nn.Linear(width, width), nn.ReLU()))
            )
        from transformers import LlamaConfig, LlamaForCausalLM

        hidden, intermediate, layers, vocabulary = self.sizes.llama
        config = LlamaConfig(
            hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=self.sizes.llama_heads, num_key_value_heads=self.sizes.llama_heads,
            vocab_size=vocabulary, max_position_embeddings=max(64, self.sizes.tokens), use_cache=False,
        )  # fmt: skip
        llama: nn.Module = LlamaForCausalLM(config)
        llama.train(False)
        return llama

    @property
    def is_hf(self) -> bool:
        return self.name == "llama"

    def inputs(self, batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        generator = torch.Generator().manual_seed(batch)
        if self.is_hf:
            ids = torch.randint(0, self.sizes.llama[3], (batch, self.sizes.tokens), generator=generator)
            return (), {"input_ids": ids}
        width = self.sizes.train_width if self.name == "mlp_train" else self.sizes.mlp_width
        return (torch.randn(batch, width, generator=generator),), {}

    def masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return fxsparse.masks.magnitude(model, self.sizes.sparsity)

    def transform(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> torch.fx.GraphModule:
        if not self.is_hf:
            out: torch.fx.GraphModule = fxsparse.transform(model, masks)
            return out
        from torch.export import Dim

        _, kwargs = self.inputs(2)
        dims = {"input_ids": {0: Dim("batch", min=1, max=1024)}}
        exported: torch.fx.GraphModule = fxsparse.transform(model, masks, example_kwargs=kwargs, dynamic_shapes=dims)
        return exported

    def freeze_auto(self, out: torch.fx.GraphModule, batch: int) -> torch.fx.GraphModule:
        args, kwargs = self.inputs(batch)
        freeze: Any = fxsparse.freeze
        if self.is_hf:
            return freeze(out, layout="auto", example_kwargs=kwargs)  # type: ignore[no-any-return]
        return freeze(out, layout="auto", example_inputs=args)  # type: ignore[no-any-return]

    def call(self, module: Callable[..., Any], batch: int) -> Callable[[], torch.Tensor]:
        args, kwargs = self.inputs(batch)
        if self.is_hf:
            return lambda: module(*args, **kwargs).logits
        return lambda: module(*args, **kwargs)


class Variants:
    """Builds each variant of one model, transforming it once."""

    def __init__(self, spec: Model, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        self.spec, self.model, self.masks = spec, model, masks
        self._out: torch.fx.GraphModule | None = None

    def out(self) -> torch.fx.GraphModule:
        if self._out is None:
            self._out = self.spec.transform(self.model, self.masks)
        return self._out

    def build(self, variant: str, batch: int) -> tuple[nn.Module | None, str, dict[str, str]]:
        """(module, error, layouts): the module for one variant, or None and why not."""
        try:
            if variant == "dense":
                return self.model, "", {}
            if variant == "captured":  # the dense model through the same capture, no masks
                return self.spec.transform(self.model, {}), "", {}
            if variant == "fakesparsity":
                return fxsparse.transform(self.model, self.masks, emit="parametrize"), "", {}
            if variant == "masked":
                return self.out(), "", {}
            if variant == "frozen":
                return fxsparse.freeze(self.out()), "", {}
            frozen = self.spec.freeze_auto(self.out(), batch)
            return frozen, "", layout_summary(frozen)
        except Exception as error:  # a benchmark reports what failed, and goes on
            return None, error_text(error), {}


def layout_summary(frozen: nn.Module) -> dict[str, str]:
    layouts: Mapping[str, Any] = fxsparse.layouts(frozen)  # type: ignore[arg-type]
    return {name: str(choice) for name, choice in layouts.items()}


def layouts_text(layouts: Mapping[str, str]) -> str:
    """'csr ×2.10 (3), dense (1)': how many layers got which layout."""
    counts: dict[str, int] = {}
    for value in layouts.values():
        counts[value.split(" ")[0]] = counts.get(value.split(" ")[0], 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


# --------------------------------------------------------------------------- a. setup


def bench_setup(sizes: Sizes) -> list[dict[str, float]]:
    rows = []
    for layers in sizes.setup_layers:
        model = make_model(layers)
        masks = {f"{2 * i}.weight": torch.rand(16, 16) > 0.5 for i in range(layers)}
        row = {"layers": float(layers)}
        row["symbolic_trace_s"] = best_time(lambda: torch.fx.symbolic_trace(model), sizes.setup_repeat)  # noqa: B023
        row["transform_s"] = best_time(lambda: fxsparse.transform(model, masks), sizes.setup_repeat)  # noqa: B023
        row["prepare_s"] = best_time_with(prepare_sparsifier, sizes.setup_repeat, lambda: copy.deepcopy(model))  # noqa: B023
        rows.append(row)
        print(f"  setup {layers} layers: transform {row['transform_s']:.3f} s", flush=True)
    return rows


# --------------------------------------------------------------------------- b. forward


def bench_forward(sizes: Sizes, compile_: bool, quick: bool) -> list[dict[str, Any]]:
    rows = []
    for name in ("mlp", "llama"):
        spec = Model(name, sizes)
        model = spec.build()
        variants = Variants(spec, model, spec.masks(model))
        for batch in sizes.batches:
            modules: dict[str, nn.Module] = {}
            errors: dict[str, str] = {}
            layouts: dict[str, str] = {}
            for variant in VARIANTS:
                module, error, chosen = variants.build(variant, batch)
                if module is None:
                    errors[variant] = error
                else:
                    modules[variant] = module
                    layouts.update(chosen)
            with torch.no_grad():
                calls = {variant: spec.call(module, batch) for variant, module in modules.items()}
                expected = calls["frozen"]() if "frozen" in calls else None
                max_error = {
                    v: float((c() - expected).abs().max())
                    for v, c in calls.items()
                    if v not in ("dense", "captured") and expected is not None
                }
                samples = interleaved(calls, sizes.rounds, sizes.min_sample_s)
            times = medians(samples)
            row: dict[str, Any] = {
                "model": name,
                "batch": batch,
                "times_s": times,
                "ratio_to_dense": {v: t / times["dense"] for v, t in times.items()},
                "samples_s": samples,
                "errors": errors,
                "max_abs_error_vs_frozen": max_error,
                "auto_layouts": layouts,
                "compiled": {},
            }
            rows.append(row)
            print(
                f"  forward {name} batch {batch}: "
                + ", ".join(f"{v} {r:.2f}×" for v, r in row["ratio_to_dense"].items()),
                flush=True,
            )
            del modules, calls
            gc.collect()
        del model, variants
        gc.collect()
        if compile_ and name in sizes.compile_models:
            for variant in VARIANTS:
                result = run_child(name, variant, sizes, quick)
                for row in rows:
                    if row["model"] == name:
                        row["compiled"][variant] = result.get(str(row["batch"]), {"error": result.get("error", "?")})
                print(f"  compiled {name} {variant}: {summary_of_child(result)}", flush=True)
    return rows


def summary_of_child(result: Mapping[str, Any]) -> str:
    if "error" in result:
        return str(result["error"])
    parts = []
    for key, value in result.items():
        if isinstance(value, dict) and "ratio_to_dense_eager" in value:
            parts.append(f"batch {key} {value['ratio_to_dense_eager']:.2f}×")
        elif isinstance(value, dict) and "error" in value:
            parts.append(f"batch {key} {value['error']}")
    return ", ".join(parts)


def run_child(model: str, variant: str, sizes: Sizes, quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "child.json"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            "compile",
            "--child-model",
            model,
            "--child-variant",
            variant,
            "--child-out",
            str(out),
            "--threads",
            str(torch.get_num_threads()),
        ]
        command += ["--quick"] if quick else []  # fmt: skip
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=sizes.child_timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {sizes.child_timeout_s:.0f} s"}
        if done.returncode != 0 or not out.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"error": f"child exited {done.returncode}: {tail[0][:300]}"}
        result: dict[str, Any] = json.loads(out.read_text())
        result["child_wall_s"] = time.perf_counter() - start
        return result


def child_compile(model_name: str, variant: str, sizes: Sizes) -> dict[str, Any]:
    """In a fresh process: compile one variant of one model, time it against dense eager."""
    import torch._dynamo.utils
    import torch._inductor.config

    spec = Model(model_name, sizes)
    model = spec.build()
    variants = Variants(spec, model, spec.masks(model))
    dense = spec.build()  # an independent dense eager model, never compiled
    result: dict[str, Any] = {"model": model_name, "variant": variant}
    for batch in sizes.batches:
        module, error, layouts = variants.build(variant, batch)
        if module is None:
            result[str(batch)] = {"error": error}
            continue
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(module, dynamic=False)
        call = spec.call(compiled, batch)
        try:
            with torch.no_grad():
                torch._inductor.config.freezing = True  # must be set for the first, compiling call
                start = time.perf_counter()
                call()
                compile_s = time.perf_counter() - start
                samples = interleaved({"dense_eager": spec.call(dense, batch), "compiled": call}, sizes.rounds,
                                      sizes.min_sample_s)  # fmt: skip
        except Exception as error:
            result[str(batch)] = {"error": error_text(error)}
            continue
        times = medians(samples)
        stats = torch._dynamo.utils.counters["stats"]
        result[str(batch)] = {
            "compile_s": compile_s,
            "times_s": times,
            "samples_s": samples,
            "ratio_to_dense_eager": times["compiled"] / times["dense_eager"],
            "graphs": int(stats.get("unique_graphs", 0)),
            "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
            "auto_layouts": layouts,
        }
    return result


# --------------------------------------------------------------------------- c. training


def bench_training(sizes: Sizes) -> list[dict[str, Any]]:
    rows = []
    for name in ("mlp_train", "llama"):
        spec = Model(name, sizes)
        model = spec.build()
        masks = spec.masks(model)
        modules: dict[str, nn.Module] = {
            "dense": copy.deepcopy(model),
            "fakesparsity": fxsparse.transform(model, masks, emit="parametrize"),
            "masked": spec.transform(model, masks),
        }
        batch = sizes.train_batch

        def step_of(module: nn.Module) -> Callable[[], None]:
            optimizer = torch.optim.SGD(module.parameters(), lr=1e-4)
            forward = spec.call(module, batch)  # noqa: B023

            def step() -> None:
                optimizer.zero_grad(set_to_none=True)
                loss = forward().float().pow(2).mean()
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()

            return step

        samples = interleaved({v: step_of(m) for v, m in modules.items()}, sizes.train_rounds, sizes.min_sample_s)
        times = medians(samples)
        rows.append(
            {
                "model": name,
                "batch": batch,
                "times_s": times,
                "ratio_to_fakesparsity": {v: t / times["fakesparsity"] for v, t in times.items()},
                "samples_s": samples,
            }
        )
        print(f"  training {name}: masked ÷ FakeSparsity {times['masked'] / times['fakesparsity']:.2f}×", flush=True)
        del modules, model
        gc.collect()
    return rows


# --------------------------------------------------------------------------- d. kernels


def kernel_masks(sizes: Sizes, model: nn.Module) -> list[tuple[str, float, dict[str, torch.Tensor]]]:
    cases = []
    for sparsity in sizes.kernel_sparsities:
        cases.append(("unstructured", sparsity, fxsparse.masks.magnitude(model, sparsity)))
    for sparsity in sizes.kernel_sparsities:
        cases.append(
            (
                f"block {sizes.block}×{sizes.block}",
                sparsity,
                fxsparse.masks.block(model, sparsity, (sizes.block, sizes.block)),
            )
        )
    cases.append(("2:4", 0.5, fxsparse.masks.n_m(model, 2, 4)))
    return cases


def torch_csr_mm(frozen: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch's own CSR kernel on the frozen weight: ``torch.sparse.mm(W_csr, x.T).T + b``."""
    weight: torch.Tensor = frozen.get_parameter("weight").detach()
    bias: torch.Tensor = frozen.get_parameter("bias").detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        csr = weight.to_sparse_csr()
        csr = torch.sparse_csr_tensor(
            csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32), csr.values(), csr.shape
        )
    return lambda x: torch.sparse.mm(csr, x.T).T + bias


def bench_kernels(sizes: Sizes) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = nn.Linear(sizes.kernel_width, sizes.kernel_width)
    rows = []
    for pattern, sparsity, masks in kernel_masks(sizes, model):
        out = fxsparse.transform(model, masks)
        dense = fxsparse.freeze(out)
        freeze: Any = fxsparse.freeze
        forced: dict[str, nn.Module | str] = {}
        for layout in ("csr", "bsr"):
            try:
                forced[layout] = freeze(out, layout=layout)
            except Exception as error:
                forced[layout] = error_text(error)
        for batch in sizes.batches:
            x = torch.randn(batch, sizes.kernel_width, generator=torch.Generator().manual_seed(batch))
            modules = dict(forced)
            try:
                modules["auto"] = freeze(out, layout="auto", example_inputs=(x,))
            except Exception as error:
                modules["auto"] = error_text(error)
            runners: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"dense": dense}
            runners.update({k: m for k, m in modules.items() if isinstance(m, nn.Module)})
            runners["torch_csr_mm"] = torch_csr_mm(dense)
            errors = {k: m for k, m in modules.items() if isinstance(m, str)}
            with torch.no_grad():
                expected = dense(x)
                max_error = {k: float((run(x) - expected).abs().max()) for k, run in runners.items() if k != "dense"}
                samples = interleaved(
                    {k: bind(run, x) for k, run in runners.items()},
                    sizes.kernel_rounds,
                    sizes.min_sample_s,
                )
            times = medians(samples)
            auto = modules["auto"]
            row: dict[str, Any] = {
                "pattern": pattern,
                "sparsity": sparsity,
                "density": float(masks["weight"].float().mean()),
                "batch": batch,
                "times_s": times,
                "speedup": {k: times["dense"] / t for k, t in times.items() if k != "dense"},
                "max_abs_error": max_error,
                "errors": errors,
                "auto_layout": layout_summary(auto).get("weight", "?") if isinstance(auto, nn.Module) else "n/a",
                "samples_s": samples,
            }
            rows.append(row)
            print(
                f"  kernels {pattern} {sparsity:.0%} batch {batch}: "
                + ", ".join(f"{k} {s:.2f}×" for k, s in row["speedup"].items())
                + f" (auto: {row['auto_layout']})",
                flush=True,
            )
    return rows


# --------------------------------------------------------------------------- e. memory


def bench_memory(sizes: Sizes) -> dict[str, Any]:
    torch.manual_seed(0)
    width = sizes.memory_width
    model = nn.Linear(width, width, bias=False)
    masks = fxsparse.masks.magnitude(model, 0.9)
    mask = masks["weight"]
    numel = mask.numel()
    with tempfile.TemporaryDirectory() as folder:
        packed = fxsparse.save_masks(masks, Path(folder) / "packed.safetensors", packed=True).stat().st_size
        unpacked = fxsparse.save_masks(masks, Path(folder) / "bool.safetensors").stat().st_size
    weight = model.weight.detach() * mask
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        csr = weight.to_sparse_csr()
    nnz = csr.values().numel()
    csr_int32 = nnz * (4 + 4) + (width + 1) * 4
    csr_int64 = nnz * (4 + 8) + (width + 1) * 8
    row: dict[str, Any] = {
        "shape": [width, width],
        "sparsity": 0.9,
        "bytes": {
            "dense_weight_float32": numel * 4,
            "mask_float32": numel * 4,
            "mask_bool": numel * mask.element_size(),
            "mask_packed_file": packed,
            "mask_bool_file": unpacked,
            "csr_weight_int32": csr_int32,
            "csr_weight_int64": csr_int64,
        },
    }
    try:
        frozen_csr: nn.Module = fxsparse.freeze(fxsparse.transform(model, masks), layout="csr")
        row["bytes"]["fxsparse_csr_frozen_module"] = module_bytes(frozen_csr)
    except Exception as error:
        row["fxsparse_csr_error"] = error_text(error)
    row["bytes_for_7e9_weights"] = {k: v / numel * SEVEN_B for k, v in row["bytes"].items()}
    print(
        f"  memory {width}²: bool mask {row['bytes']['mask_bool'] / 2**20:.1f} MiB, packed {packed / 2**20:.2f} MiB, "
        f"CSR {csr_int32 / row['bytes']['dense_weight_float32']:.2f}× dense",
        flush=True,
    )
    return row


# --------------------------------------------------------------------------- reports


def fmt_ratio(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}×" if value >= 0.1 else f"{value:.2g}×"  # 0.0031×, not 0.00×


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_bytes(count: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f} B"


def table_setup(rows: Sequence[Mapping[str, float]]) -> list[str]:
    lines = [
        "| layers | symbolic_trace | transform ÷ trace | prepare ÷ trace | prepare ÷ transform |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        trace = row["symbolic_trace_s"]
        lines.append(
            f"| {int(row['layers'])} | {fmt_time(trace)} | {row['transform_s'] / trace:.2f}× "
            f"| {row['prepare_s'] / trace:.2f}× | {row['prepare_s'] / row['transform_s']:.2f}× |"
        )
    return lines


def table_forward(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    header = " | ".join(VARIANT_LABELS[v] for v in VARIANTS)
    compiled_header = " | ".join(f"compiled {VARIANT_LABELS[v]}" for v in VARIANTS)
    lines = [
        f"| model | batch | dense eager | {header} | {compiled_header} |",
        "|---|---:|---:|" + "---:|" * (2 * len(VARIANTS)),
    ]
    for row in rows:
        cells = [fmt_ratio(row["ratio_to_dense"].get(v)) for v in VARIANTS]
        compiled = []
        for v in VARIANTS:
            result = row["compiled"].get(v)
            if result is None:
                compiled.append("not run")
            elif "ratio_to_dense_eager" in result:
                graphs = "" if result.get("graphs", 1) else " (0 graphs: eager)"
                compiled.append(fmt_ratio(result["ratio_to_dense_eager"]) + graphs)
            else:
                compiled.append("failed" if not str(result.get("error", "")).startswith("n/a") else "n/a")
        lines.append(
            f"| {row['model']} | {row['batch']} | {fmt_time(row['times_s']['dense'])} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(compiled)
            + " |"
        )
    return lines


def forward_notes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    notes = []
    for row in rows:
        where = f"{row['model']} batch {row['batch']}"
        if row["auto_layouts"]:
            notes.append(f'- {where}: layout="auto" chose {layouts_text(row["auto_layouts"])}')
        for variant, error in row["errors"].items():
            notes.append(f"- {where}, {VARIANT_LABELS[variant]}: {error}")
        for variant, result in row["compiled"].items():
            if "error" in result and not str(result["error"]).startswith("n/a"):
                notes.append(f"- {where}, compiled {VARIANT_LABELS[variant]}: {result['error']}")
        worst = max(row["max_abs_error_vs_frozen"].items(), key=lambda kv: kv[1], default=None)
        if worst is not None and worst[1] > 0:
            notes.append(f"- {where}: largest difference from the frozen output: {worst[1]:.2e} ({worst[0]})")
    return notes


def table_training(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "| model | batch | FakeSparsity step | dense ÷ FakeSparsity | masked graph ÷ FakeSparsity |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratio = row["ratio_to_fakesparsity"]
        lines.append(
            f"| {row['model']} | {row['batch']} | {fmt_time(row['times_s']['fakesparsity'])} | "
            f"{fmt_ratio(ratio['dense'])} | {fmt_ratio(ratio['masked'])} |"
        )
    return lines


def table_kernels(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "| pattern | sparsity | batch | dense | csr | bsr | auto | auto picked | torch.sparse.mm (CSR) "
        "| max abs error (auto) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        speed = row["speedup"]
        cells = [fmt_ratio(speed.get(k)) for k in KERNEL_VARIANTS]
        error = row["max_abs_error"].get("auto")
        lines.append(
            f"| {row['pattern']} | {row['sparsity']:.0%} | {row['batch']} | {fmt_time(row['times_s']['dense'])} | "
            f"{cells[0]} | {cells[1]} | {cells[2]} | {row['auto_layout']} | {cells[3]} | "
            f"{'n/a' if error is None else f'{error:.1e}'} |"
        )
    return lines


def kernel_notes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, str] = {}
    for row in rows:
        for layout, error in row["errors"].items():
            seen.setdefault(f"{layout}: {error}", f"{row['pattern']} {row['sparsity']:.0%}")
    return [f"- {key} (first at {where})" for key, where in seen.items()]


def table_memory(row: Mapping[str, Any]) -> list[str]:
    labels = {
        "dense_weight_float32": "dense float32 weight",
        "mask_float32": "float32 mask",
        "mask_bool": "bool mask",
        "mask_bool_file": "bool mask file (save_masks)",
        "mask_packed_file": "packed mask file (save_masks(packed=True))",
        "csr_weight_int32": "CSR weight at 90 %, int32 indices",
        "csr_weight_int64": "CSR weight at 90 %, int64 indices (torch's default)",
        "fxsparse_csr_frozen_module": 'freeze(out, layout="csr"): every tensor of the module',
    }
    width = row["shape"][0]
    dense = row["bytes"]["dense_weight_float32"]
    lines = [f"| storage | {width} × {width} | ÷ dense weight | 7e9 weights |", "|---|---:|---:|---:|"]
    for key, value in row["bytes"].items():
        lines.append(
            f"| {labels.get(key, key)} | {fmt_bytes(value)} | {value / dense:.3f}× "
            f"| {fmt_bytes(row['bytes_for_7e9_weights'][key])} |"
        )
    return lines


def machine_line(machine: Mapping[str, Any]) -> str:
    load = machine.get("load_average", [0.0])[0]
    end = machine.get("load_average_end", [load])[0]
    return (
        f"{machine['cpu']}, {machine['cores']} cores, {machine['threads']} torch threads, torch {machine['torch']}, "
        f"Python {machine['python']}, fxsparse {machine['fxsparse']}, {machine['date']}, "
        f"load average {load:.2f} at the start and {end:.2f} at the end"
    )


def load_warning(machine: Mapping[str, Any]) -> str:
    """A sentence on how far other work on the machine makes the numbers doubtful."""
    # The load at the end counts this tool's own threads; only the load before it started is other work.
    load = machine.get("load_average", [0.0])[0]
    if load < 1.0:
        return "Nothing else ran on the machine; repeated runs vary by about ±10 %."
    return (
        f"Other work shared the machine during this run (load average {load:.1f} before it started, on "
        f"{machine['cores']} cores): every multi-threaded kernel then waits for a core at each parallel "
        "region, which can turn a 0.1 ms call into several milliseconds, so small-batch ratios, and "
        '`layout="auto"`\'s own measurements, are doubtful. Rerun on a quiet machine before quoting them.'
    )


def markdown(results: Mapping[str, Any]) -> str:
    lines = ["# fxsparse speed", "", f"Machine: {machine_line(results['machine'])}.", ""]
    lines += [load_warning(results["machine"]), ""]
    lines.append(f"Mode: {'quick (smoke test sizes)' if results['quick'] else 'full'}; "
                 f"took {results['wall_s']:.0f} s.")  # fmt: skip
    if results["quick"]:
        lines += ["", "Quick mode checks that every part runs: its tiny models and few rounds make the ratios noise."]
    if "setup" in results:
        lines += ["", "## Setup cost", "", *table_setup(results["setup"])]
    if "forward" in results:
        lines += ["", "## Forward latency ÷ dense eager (no_grad)", "", *table_forward(results["forward"])]
        lines += ["", *forward_notes(results["forward"])]
    if "training" in results:
        lines += ["", "## Training step ÷ FakeSparsity", "", *table_training(results["training"])]
    if "kernels" in results:
        lines += ["", "## Sparse kernels: speed-up over dense (> 1 is faster)", "", *table_kernels(results["kernels"])]
        lines += ["", *kernel_notes(results["kernels"])]
    if "memory" in results:
        lines += ["", "## Mask and weight memory", "", *table_memory(results["memory"])]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- docs/performance.md

DOCS_EXAMPLE_LAYOUTS = """```python
import torch
import fxsparse

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
masks = fxsparse.masks.magnitude(model, 0.95)  # every Linear weight, 95 % pruned

out = fxsparse.transform(model, masks)  # the masked graph: train this one
frozen = fxsparse.freeze(out)  # masks folded into the weights: dense speed, same outputs
fast = fxsparse.freeze(out, layout="auto")  # per layer, the fastest measured kernel
print({name: choice.layout for name, choice in fxsparse.layouts(fast).items()})

x = torch.randn(4, 64)
with torch.no_grad():
    assert torch.equal(frozen(x), out(x))
    assert torch.allclose(fast(x), frozen(x), atol=1e-5)
```"""

DOCS_EXAMPLE_DENSE = """```python
import torch
import fxsparse

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
masks = fxsparse.masks.magnitude(model, 0.95)  # every Linear weight, 95 % pruned

out = fxsparse.transform(model, masks)  # the masked graph: train this one
frozen = fxsparse.freeze(out)  # masks folded into the weights: dense speed, same outputs

x = torch.randn(4, 64)
with torch.no_grad():
    assert torch.equal(frozen(x), out(x))
```"""


def gpu_section(gpu: Mapping[str, Any] | None) -> list[str]:
    lines = ["## GPU", ""]
    if gpu is None:
        return [
            *lines,
            "`python tools/bench_gpu.py --out gpu.json` measures 2:4 sparsity on an NVIDIA GPU: "
            "`torch.sparse.to_sparse_semi_structured` against a dense bfloat16 `F.linear` on weights of "
            "4096² to 16384², and an MLP of Linear(8192, 8192) with `fxsparse.masks.n_m(model, 2, 4)`, "
            'dense against the masked graph, `freeze(out)`, `freeze(out, layout="semi_structured")` and '
            '`freeze(out, layout="auto")`. The script is ready and has not been run on a GPU yet; '
            "`python tools/bench_speed.py --from-json tools/results/speed-cpu.json --docs --gpu-json gpu.json` "
            "puts its numbers here.",
        ]
    lines += [f"Device: {gpu.get('device', '?')}, torch {gpu.get('torch', '?')}, {gpu.get('date', '?')}.", ""]
    kernels = gpu.get("kernels", [])
    if kernels:
        lines += [
            "2:4 semi-structured weight ÷ dense bfloat16 `F.linear` (speed-up, > 1 is faster):",
            "",
            "| out × in | tokens | dense | backend | speed-up |",
            "|---|---:|---:|---|---:|",
        ]
        for row in kernels:
            for backend, value in row.get("speedup", {}).items():
                lines.append(
                    f"| {row['out']} × {row['in']} | {row['tokens']} | {fmt_time(row['dense_s'])} | {backend} "
                    f"| {fmt_ratio(value)} |"
                )
        lines.append("")
    mlp = gpu.get("mlp", [])
    if mlp:
        lines += ["End to end, MLP of Linear(8192, 8192), 2:4 masks, bfloat16 (time ÷ dense):", ""]
        names = [n for n in mlp[0].get("ratio_to_dense", {})]
        lines += [
            "| tokens | dense | " + " | ".join(names) + " |",
            "|---:|---:|" + "---:|" * len(names),
        ]
        for row in mlp:
            lines.append(
                f"| {row['tokens']} | {fmt_time(row['times_s']['dense'])} | "
                + " | ".join(fmt_ratio(row["ratio_to_dense"].get(n)) for n in names)
                + " |"
            )
    return lines


def folded_training_section() -> list[str]:
    """The folded mode's section, from tools/bench_train.py's saved results (none where they are not saved)."""
    saved = ROOT / "tools" / "results" / "train-cpu.json"
    if not saved.exists():
        return []
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_train

    return ["", *bench_train.docs_section(json.loads(saved.read_text()))]


def docs_page(results: Mapping[str, Any], gpu: Mapping[str, Any] | None) -> str:
    layouts = results["machine"].get("layouts_api", False)
    lines = [
        "# Performance",
        "",
        "What masking costs, and what a sparse weight can save: `tools/bench_speed.py` times fxsparse's "
        "outputs against the dense model, `torch.ao.pruning`'s FakeSparsity and torch's sparse kernels, "
        "and prints ratios (absolute times are only for scale). Rerun it, and rewrite this page, with:",
        "",
        "```bash",
        "python tools/bench_speed.py --json speed.json --markdown speed.md --docs",
        "```",
        "",
        f"It took {results['wall_s'] / 60:.1f} minutes on: {machine_line(results['machine'])}. "
        f"{load_warning(results['machine'])} Times are medians over interleaved "
        "rounds (every variant once a round, in a random order); `torch.compile` runs in a child "
        "process per model and variant.",
        "",
        *(f"{note}\n" for note in results.get("notes", [])),
        "## Usage",
        "",
        "Train the masked graph; for inference, freeze it: the masks are folded into the weights, and "
        "the frozen graph runs at the dense model's speed."
        + (
            ' `layout="auto"` also measures, per linear layer, whether a sparse kernel (CSR, BSR) beats '
            "the dense one on this machine, and uses it where it does."
            if layouts
            else ""
        ),
        "",
        DOCS_EXAMPLE_LAYOUTS if layouts else DOCS_EXAMPLE_DENSE,
    ]
    if "setup" in results:
        lines += [
            "",
            "## Setup cost",
            "",
            "Time to set masks up on N × (Linear(16, 16) + ReLU), ÷ `torch.fx.symbolic_trace`: `fxsparse.transform` "
            "against `WeightNormSparsifier().prepare(model, config=None)`; the last column above 1 means "
            "fxsparse is faster.",
            "",
            *table_setup(results["setup"]),
        ]
    if "forward" in results:
        lines += [
            "",
            "## Inference",
            "",
            "Forward time under `torch.no_grad()` ÷ the dense model's in eager mode (below 1 is faster than "
            "dense). MLP: 4 × (Linear(4096, 4096) + ReLU); llama: `LlamaForCausalLM` with 2 layers, hidden "
            "size 256, 32 tokens; every linear weight 90 % pruned by magnitude. The compiled columns are "
            "`torch.compile` with inductor freezing, each in its own process; FakeSparsity is on dynamo's "
            'skip list, so its compiled model runs eagerly. `layout="auto"` was tuned at each batch. "dense '
            'graph" is the dense model captured as fxsparse captures it (`transform(model, {})`: FX for the MLP, '
            "torch.export's ATen graph for the Llama), so frozen ÷ dense graph is what is left of masking once "
            "frozen, and dense graph ÷ dense is what the capture itself costs.",
            "",
            *table_forward(results["forward"]),
            "",
            *forward_notes(results["forward"]),
        ]
    if "training" in results:
        lines += [
            "",
            "## Training",
            "",
            "One SGD step (forward, backward, step) ÷ the FakeSparsity model's: the masked graph computes "
            "the same `mask * weight` as FakeSparsity, bit for bit, so it should cost the same (1.00×).",
            "",
            *table_training(results["training"]),
        ]
    lines += folded_training_section()
    if "kernels" in results:
        lines += [
            "",
            "## Sparse kernels",
            "",
            "One Linear(4096, 4096): dense time ÷ each layout's time (above 1 is faster than the dense frozen "
            'weight); "auto picked" is the layout `layout="auto"` chose at that batch, with the speed-up its '
            "own short measurement found while freezing (the figure `fxsparse.layouts` reports), where the "
            '"auto" column is this benchmark\'s longer measurement of the result; the last column is its '
            "largest difference from the dense output. `torch.sparse.mm` is torch's CSR kernel called "
            "directly, for reference. On this CPU, BSR never beats CSR, even on block masks.",
            "",
            *table_kernels(results["kernels"]),
            "",
            *kernel_notes(results["kernels"]),
        ]
    if "memory" in results:
        lines += [
            "",
            "## Memory",
            "",
            "Bytes of one 4096 × 4096 weight's mask (90 % pruned) in each form, ÷ the dense float32 weight, "
            "and scaled to a 7e9-weight model.",
            "",
            *table_memory(results["memory"]),
        ]
    lines += ["", *gpu_section(gpu)]
    return "\n".join(line for line in lines).rstrip() + "\n"


# --------------------------------------------------------------------------- main


def measure_all(args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    start = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_info(), "quick": args.quick, "sizes": asdict(sizes)}
    print(f"# fxsparse speed, {machine_line(results['machine'])}", flush=True)
    if results["machine"]["load_average"][0] >= 1.0:
        print(f"  warning: load average {results['machine']['load_average'][0]:.2f} before starting: other work "
              "slows multi-threaded kernels (each parallel region waits for a core)", flush=True)  # fmt: skip
    if "setup" in args.sections:
        results["setup"] = bench_setup(sizes)
    if "forward" in args.sections:
        results["forward"] = bench_forward(sizes, not args.no_compile, args.quick)
    if "training" in args.sections:
        results["training"] = bench_training(sizes)
    if "kernels" in args.sections:
        results["kernels"] = bench_kernels(sizes)
    if "memory" in args.sections:
        results["memory"] = bench_memory(sizes)
    results["wall_s"] = time.perf_counter() - start
    results["machine"]["load_average_end"] = list(os.getloadavg())
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: a smoke test")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile child processes")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--json", type=Path, help="write every raw number here")
    parser.add_argument("--markdown", type=Path, help="write the report here")
    parser.add_argument("--docs", action="store_true", help="write docs/performance.md from the results")
    parser.add_argument("--from-json", type=Path, help="measure nothing: report (and --docs) from this --json file")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--gpu-json", type=Path, help="a tools/bench_gpu.py result to show in docs/performance.md")
    parser.add_argument("--child", choices=["compile"], help=argparse.SUPPRESS)
    parser.add_argument("--child-model", help=argparse.SUPPRESS)
    parser.add_argument("--child-variant", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    sizes = QUICK if args.quick else Sizes()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        result = child_compile(args.child_model, args.child_variant, sizes)
        args.child_out.write_text(json.dumps(result))
        return 0

    if args.from_json:
        results: dict[str, Any] = json.loads(args.from_json.read_text())
    else:
        results = measure_all(args, sizes)
    report = markdown(results)
    print()
    print(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report)
    if args.docs:
        gpu = json.loads(args.gpu_json.read_text()) if args.gpu_json else None
        (ROOT / "docs" / "performance.md").write_text(docs_page(results, gpu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
