"""fxsparse's SparseGPT (and Wanda) 2:4 side by side with llm-compressor's, on one tiny Llama.

Both sides load the same random Llama (seeded, written with ``save_pretrained``) and prune it
with the same calibration token ids (seeded, written as safetensors). fxsparse runs here
(this project's venv); llm-compressor runs in its own venv, as a subprocess on a small script
this tool writes, because it pins its own dependencies::

    python3 -m venv /tmp/llmc-venv
    /tmp/llmc-venv/bin/pip install torch==2.13.0 "llmcompressor==0.14.*"
    PYTHONPATH=$PWD /work/venv/bin/python tools/compare_llmcompressor.py --llmc-python /tmp/llmc-venv/bin/python

Reported: the wall time of the pruning call alone on each side (``fxsparse.masks.sparsegpt``
vs ``oneshot``; model loading and imports excluded; best of ``--repeats``; one thread each),
and per weight the fraction of equal mask entries and ``max |ΔW| / max |W|`` of the pruned
weights. Three fxsparse runs are compared, to say where differences come from:

- ``sequential=True`` (fxsparse's default): each weight group is calibrated on the model with
  every weight before it (in graph order) pruned, q/k/v sharing one input;
- ``sequential=False``: every weight is calibrated on the unpruned model;
- ``per layer``: fxsparse's solver (``masks._sparsegpt``) given llm-compressor's inputs: for
  decoder layer ``i``, the model with llm-compressor's pruned layers ``< i`` and layer ``i``
  unpruned (llm-compressor's sequential targets are decoder layers: all their linears are
  calibrated in one pass before any is pruned). Differences left there are the solvers'.

Not part of the test suite (it needs the other venv).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

_LLMC_SIDE = textwrap.dedent(
    '''
    """llm-compressor's side: oneshot on the saved model, timed, the pruned state dict saved."""
    import json, sys, time
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    model_dir, calibration_file, method, out_file, repeats = sys.argv[1:6]
    torch.set_num_threads(1)
    ids = load_file(calibration_file)["input_ids"]
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    # oneshot wants a processor whenever a dataset is given; the DataLoader below never uses it.
    unused = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    processor = PreTrainedTokenizerFast(tokenizer_object=unused)
    times = []
    for _ in range(int(repeats)):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        loader = torch.utils.data.DataLoader(rows, batch_size=1, shuffle=False)
        common = dict(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"])
        if method == "sparsegpt":
            recipe = SparseGPTModifier(block_size=128, dampening_frac=0.01, **common)
        else:
            recipe = WandaPruningModifier(**common)
        start = time.perf_counter()
        oneshot(model=model, dataset=loader, recipe=recipe, processor=processor, num_calibration_samples=len(rows))
        times.append(time.perf_counter() - start)
    state = {name: value.detach().contiguous() for name, value in model.state_dict().items()}
    save_file(state, out_file)
    print(json.dumps({"times": times}))
    '''
)


def _build(directory: Path, args: argparse.Namespace) -> torch.Tensor:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
        use_cache=False,
    )
    LlamaForCausalLM(config).save_pretrained(directory / "model")
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=generator)
    save_file({"input_ids": ids}, str(directory / "calibration.safetensors"))
    return ids


def _load(directory: Path) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    model: Any = LlamaForCausalLM.from_pretrained(directory / "model", dtype=torch.float32)
    loaded: torch.nn.Module = model.eval()
    return loaded


def _fxsparse_side(
    directory: Path, ids: torch.Tensor, method: str, sequential: bool, repeats: int
) -> tuple[list[float], dict[str, torch.Tensor]]:
    import fxsparse

    calibration = [{"input_ids": row[None], "attention_mask": torch.ones_like(row[None])} for row in ids]
    times, weights = [], {}
    for _ in range(repeats):
        model = _load(directory)
        start = time.perf_counter()
        if method == "sparsegpt":
            result = fxsparse.masks.sparsegpt(
                model, calibration, pattern="2:4", sequential=sequential, exclude="lm_head", progress=False
            )
            weights = result.weights
        else:
            masks = fxsparse.masks.wanda(
                model, calibration, pattern="2:4", sequential=sequential, exclude="lm_head", progress=False
            )
            weights = {name: model.get_parameter(name).detach() * mask for name, mask in masks.items()}
        times.append(time.perf_counter() - start)
    return times, weights


def _per_layer_solver(directory: Path, ids: torch.Tensor, theirs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fxsparse's SparseGPT solver on the inputs llm-compressor's layer-at-a-time pipeline sees."""
    from fxsparse.masks._sparsegpt import hessian_update, prune

    model: Any = _load(directory)
    original = {name: value.clone() for name, value in model.state_dict().items()}
    weights: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(model.model.layers):
        state = dict(original)
        state.update({name: theirs[name] for name in original if _layer_of(name) < index})
        model.load_state_dict(state)
        linears = {
            f"model.layers.{index}.{name}": module
            for name, module in layer.named_modules()
            if isinstance(module, torch.nn.Linear)
        }
        hessians: dict[str, tuple[torch.Tensor | None, int]] = {name: (None, 0) for name in linears}

        def hook(name: str, inputs: tuple[Any, ...], into: dict[str, tuple[torch.Tensor | None, int]]) -> None:
            into[name] = hessian_update(into[name][0], inputs[0], into[name][1])

        handles = [
            module.register_forward_pre_hook(lambda _module, inputs, name=name, into=hessians: hook(name, inputs, into))
            for name, module in linears.items()
        ]
        with torch.no_grad():
            for row in ids:
                model(input_ids=row[None], attention_mask=torch.ones_like(row[None]))
        for handle in handles:
            handle.remove()
        for name, module in linears.items():
            hessian = hessians[name][0]
            assert hessian is not None
            _, weights[f"{name}.weight"] = prune(module.weight.detach(), hessian, pattern=(2, 4))
    return weights


def _layer_of(name: str) -> int:
    """The decoder layer a parameter belongs to; the embeddings, final norm and head: a large number."""
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] else 1 << 30


def _agreement(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    rows = {}
    for name, weight in ours.items():
        other = theirs[name]
        delta = (weight - other).abs().max().item() / other.abs().max().item()
        rows[name] = {"mask": ((weight != 0) == (other != 0)).double().mean().item(), "dw": delta}
    return rows


def _run_llmc(python: str, directory: Path, method: str, repeats: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    script = directory / "llmc_side.py"
    script.write_text(_LLMC_SIDE)
    out = directory / f"llmc_{method}.safetensors"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    done = subprocess.run(
        [
            python,
            str(script),
            str(directory / "model"),
            str(directory / "calibration.safetensors"),
            method,
            str(out),
            str(repeats),
        ],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"llm-compressor's side failed ({method}):\n{done.stderr[-4000:]}")
    times = json.loads(done.stdout.strip().splitlines()[-1])["times"]
    return times, load_file(str(out))


def _versions(python: str) -> dict[str, str]:
    packages = ("llmcompressor", "torch", "transformers", "compressed-tensors")
    code = f"import importlib.metadata as m; print(' '.join(m.version(p) for p in {packages!r}))"
    theirs = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    import transformers

    return {
        "llmcompressor": theirs[0],
        "torch (llmc venv)": theirs[1],
        "transformers (llmc venv)": theirs[2],
        "compressed-tensors": theirs[3],
        "torch (fxsparse venv)": torch.__version__,
        "transformers (fxsparse venv)": transformers.__version__,
    }


def _summary(rows: dict[str, dict[str, float]]) -> dict[str, float]:
    masks = [row["mask"] for row in rows.values()]
    layer0 = [row["mask"] for name, row in rows.items() if _layer_of(name) == 0]
    return {
        "mask agreement (mean)": sum(masks) / len(masks),
        "mask agreement (min)": min(masks),
        "mask agreement layer 0 (mean)": sum(layer0) / len(layer0),
        "max |dW|/max|W| (max)": max(row["dw"] for row in rows.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llmc-python", default="/tmp/llmc-venv/bin/python")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=176)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="sparsegpt,wanda")
    parser.add_argument("--per-weight", action="store_true", help="print every weight's agreement")
    parser.add_argument("--json", type=Path, help="write everything measured here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    report: dict[str, Any] = {"versions": _versions(args.llmc_python), "config": vars(args) | {"json": None}}
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        ids = _build(directory, args)
        for method in args.methods.split(","):
            llmc_times, theirs = _run_llmc(args.llmc_python, directory, method, args.repeats)
            fx_times, ours = _fxsparse_side(directory, ids, method, True, args.repeats)
            _, ours_unsequential = _fxsparse_side(directory, ids, method, False, 1)
            runs = {
                "sequential=True": _agreement(ours, theirs),
                "sequential=False": _agreement(ours_unsequential, theirs),
            }
            if method == "sparsegpt":
                runs["per layer (llmc's inputs)"] = _agreement(_per_layer_solver(directory, ids, theirs), theirs)
            report[method] = {
                "seconds": {"fxsparse": min(fx_times), "llm-compressor": min(llmc_times)},
                "all seconds": {"fxsparse": fx_times, "llm-compressor": llmc_times},
                "ratio": min(fx_times) / min(llmc_times),
                "agreement": {run: _summary(rows) for run, rows in runs.items()},
                "per weight": runs,
            }
            print(f"== {method} 2:4 ({len(ours)} weights)")
            best = report[method]["seconds"]
            print(f"time: fxsparse {best['fxsparse']:.3f} s, llm-compressor {best['llm-compressor']:.3f} s", end="")
            print(f", ratio {report[method]['ratio']:.2f}x")
            for run, rows in runs.items():
                print(f"  {run}: " + ", ".join(f"{key} {value:.6g}" for key, value in _summary(rows).items()))
                if args.per_weight:
                    for name, row in rows.items():
                        print(f"    {name}: mask {row['mask']:.4f}  dW {row['dw']:.2e}")
    print(json.dumps(report["versions"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
