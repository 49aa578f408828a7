"""``fxsparse prune``: calibration files in, the pruned model and its masks out, equal to the Python API's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fxsparse
from fxsparse._cli import main

VOCABULARY = 96  # hf_zoo's
SOLVER = importlib.util.find_spec("fxsparse.masks._sparsegpt") is not None
NO_SOLVER = "the SparseGPT solver (fxsparse/masks/_sparsegpt.py) is not merged into this tree yet"
METHODS = ["wanda", "magnitude", pytest.param("sparsegpt", marks=pytest.mark.skipif(not SOLVER, reason=NO_SOLVER))]


def tiny_mlp() -> nn.Module:
    """A model that reads token ids and has two Linears, 16 and 32 inputs wide (2:4 groups fit both)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(VOCABULARY, 16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))


def tiny_llama() -> nn.Module:
    from hf_zoo import FAMILIES, build

    return build(FAMILIES["llama"])


def token_ids(*shape: int) -> torch.Tensor:
    return torch.randint(0, VOCABULARY, shape, generator=torch.Generator().manual_seed(1))


def expected(
    method: str, model: nn.Module, batches: list[torch.Tensor], amount: list[str], **chosen: Any
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The Python API's masks for the same calibration, and each weight as the command must write it:
    ``mask * weight`` (the weight as masked), or SparseGPT's reconstruction."""
    pattern = amount[1] if amount[0] == "--pattern" else None
    sparsity = float(amount[1]) if pattern is None else 0.5
    if method == "magnitude":
        n, m = map(int, pattern.split(":")) if pattern else (0, 0)
        masks = fxsparse.masks.n_m(model, n, m, **chosen) if pattern else fxsparse.masks.magnitude(model, sparsity)
        return masks, {name: mask * model.get_parameter(name) for name, mask in masks.items()}
    if method == "wanda":
        masks = fxsparse.masks.wanda(model, batches, sparsity, pattern=pattern, **chosen)
        return masks, {name: mask * model.get_parameter(name) for name, mask in masks.items()}
    result = fxsparse.masks.sparsegpt(model, batches, sparsity, pattern=pattern, **chosen)
    return result.masks, result.weights


def assert_same(found: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor]) -> None:
    assert sorted(found) == sorted(wanted)
    for name, tensor in wanted.items():
        assert torch.equal(found[name], tensor.detach()), name


@pytest.mark.parametrize("amount", [["--sparsity", "0.5"], ["--pattern", "2:4"]], ids=["unstructured", "2:4"])
@pytest.mark.parametrize("method", METHODS)
def test_prune_writes_the_masks_and_weights_the_python_api_gives(
    method: str, amount: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    ids = token_ids(6, 16)
    save_file({"input_ids": ids}, "calibration.safetensors")
    arguments = ["--calibration", "calibration.safetensors", "--batch-size", "2", "--out", "out"]
    assert main(["prune", "test_prune_command:tiny_mlp", "--method", method, *amount, *arguments]) == 0
    masks, weights = expected(method, tiny_mlp(), list(ids.split(2)), amount)
    assert_same(fxsparse.masks.from_pretrained(tmp_path / "out"), masks)
    state = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert_same({name: state[name] for name in weights}, weights)
    assert torch.equal(state["0.weight"], tiny_mlp().get_parameter("0.weight").detach())  # not selected: as it was
    printed = capsys.readouterr().out
    assert "1.weight" in printed and "3.weight" in printed and "2 masks, no problems" in printed
    assert f"fxsparse prune: 2 masks ({method}, " in printed
    assert "(masks.safetensors, masks_config.json, model.pt)" in printed


@pytest.mark.parametrize(
    "method", ["wanda", pytest.param("sparsegpt", marks=pytest.mark.skipif(not SOLVER, reason=NO_SOLVER))]
)
def test_prune_a_transformers_llama_writes_a_checkpoint_with_its_masks_beside_it(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import LlamaForCausalLM

    monkeypatch.chdir(tmp_path)
    ids = token_ids(4, 16)
    save_file({"input_ids": ids}, "calibration.safetensors")
    command = ["prune", "test_prune_command:tiny_llama", "--method", method, "--pattern", "2:4", "--exclude", "lm_head"]
    assert main([*command, "--calibration", "calibration.safetensors", "--batch-size", "2", "--out", "out"]) == 0
    masks, weights = expected(method, tiny_llama(), list(ids.split(2)), ["--pattern", "2:4"], exclude="lm_head")
    assert len(masks) == 14
    assert_same(fxsparse.masks.from_pretrained(tmp_path / "out"), masks)
    pruned = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert_same({name: pruned.get_parameter(name) for name in weights}, weights)
    assert torch.equal(pruned.lm_head.weight, tiny_llama().lm_head.weight)
    assert fxsparse.check(pruned, masks, pattern="2:4").ok
    printed = capsys.readouterr().out
    assert "config.json" in printed and "model.safetensors" in printed and "14 masks, no problems" in printed


def test_prune_reads_text_through_a_local_tokenizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(tmp_path / "tokenizer")
    text = " ".join(words[1 + (7 * i) % 8] for i in range(37)) + " zebra zebra\n"  # 39 tokens, two unknown
    (tmp_path / "corpus.txt").write_text(text)
    monkeypatch.chdir(tmp_path)
    tokens = [words.index(word) if word in words else 0 for word in text.split()]
    samples = torch.tensor(tokens[:32]).reshape(4, 8)  # 4 samples of 8 tokens; the last 7 tokens left out
    arguments = ["--calibration", "corpus.txt", "--tokenizer", "tokenizer", "--sequence-length", "8"]
    assert main(["prune", "test_prune_command:tiny_mlp", *arguments, "--batch-size", "2", "--out", "out"]) == 0
    masks = fxsparse.masks.wanda(tiny_mlp(), list(samples.split(2)), 0.5)
    assert_same(fxsparse.masks.from_pretrained(tmp_path / "out"), masks)
    assert "calibrating on 2 batches (32 tokens) with wanda" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("stored", "options", "batches"),
    [
        (token_ids(3, 2, 16), [], list(token_ids(3, 2, 16))),  # 3-D: batches as stored
        (token_ids(3, 2, 16), ["--batch-size", "3"], list(token_ids(3, 2, 16).reshape(6, 16).split(3))),
        (token_ids(6, 16), ["--samples", "3"], [token_ids(6, 16)[:3]]),  # first 3 samples, one batch of 8 or less
        (token_ids(6, 16).int(), ["--samples", "5", "--batch-size", "2"], list(token_ids(6, 16)[:5].split(2))),
    ],
    ids=["3-D", "3-D regrouped", "--samples", "int32, ragged last batch"],
)
def test_prune_calibration_file_layouts(
    stored: torch.Tensor, options: list[str], batches: list[torch.Tensor], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    torch.save(stored, "calibration.pt")
    assert (
        main(["prune", "test_prune_command:tiny_mlp", "--calibration", "calibration.pt", *options, "--out", "o"]) == 0
    )
    assert_same(fxsparse.masks.from_pretrained(tmp_path / "o"), fxsparse.masks.wanda(tiny_mlp(), batches, 0.5))


def test_prune_shows_progress_on_a_terminal_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save(token_ids(2, 8), "calibration.pt")
    command = ["prune", "test_prune_command:tiny_mlp", "--calibration", "calibration.pt", "--out", "out"]
    assert main(command) == 0
    assert "calibrating: " not in capsys.readouterr().err
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert main(command) == 0
    assert "\rcalibrating: 2/2 weights (3.weight)" in capsys.readouterr().err


class WritesAMarker:
    """A pickle payload: unpickling it with torch.load(weights_only=False) creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_prune_refuses_a_pt_calibration_file_holding_a_pickle_payload_without_running_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"input_ids": WritesAMarker(tmp_path / "ran")}, "calibration.pt")
    with pytest.raises(SystemExit) as exited:
        main(["prune", "test_prune_command:tiny_mlp", "--calibration", "calibration.pt", "--out", "out"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "--calibration calibration.pt cannot be read as data only (torch.load with weights_only=True" in error
    assert "never loads a calibration file in a way that could run code" in error and "Traceback" not in error
    assert not (tmp_path / "ran").exists()
    assert not (tmp_path / "out").exists()


def _write(path: str, content: Any) -> None:
    if isinstance(content, str):
        Path(path).write_text(content)
    elif path.endswith(".safetensors"):
        save_file(content, path)
    else:
        torch.save(content, path)


@pytest.mark.parametrize(
    ("file", "content", "options", "message"),
    [
        (None, None, [], "--method wanda reads the activations that reach each weight: pass --calibration FILE"),
        ("c.pt", torch.rand(2, 8), [], "--calibration c.pt holds torch.float32 values; token ids are integers"),
        ("c.pt", token_ids(16), [], "holds a tensor of shape (16,); token ids must be 2-D, [samples, sequence], or"),
        ("c.pt", token_ids(1, 2, 2, 8), [], "holds a tensor of shape (1, 2, 2, 8); token ids must be 2-D"),
        ("c.pt", -token_ids(2, 8) - 1, [], "holds a negative token id"),
        ("c.pt", [1, 2, 3], [], "--calibration c.pt holds a list, not a tensor of token ids"),
        ("c.pt", torch.zeros(0, 8, dtype=torch.long), [], "holds no token ids (shape (0, 8))"),
        (
            "c.safetensors",
            {"a": token_ids(2, 8), "b": token_ids(2, 8)},
            [],
            "holds 2 entries ('a', 'b') and none named",
        ),
        ("c.safetensors", "not safetensors", [], "--calibration c.safetensors is not a safetensors file"),
        ("c.txt", "the quick brown fox", [], "is read as text, which needs --tokenizer NAME"),
        ("c.txt", "the fox", ["--tokenizer", "./missing"], "--tokenizer './missing': transformers."),
        ("c.pt", token_ids(2, 8), ["--tokenizer", "t"], "--tokenizer is for a text --calibration file"),
        ("c.pt", token_ids(2, 8), ["--samples", "3"], "--samples 3, but --calibration c.pt holds 2 samples"),
        (
            "c.pt",
            token_ids(2, 8) + VOCABULARY,
            [],
            "running 'test_prune_command:tiny_mlp' on the calibration batches failed: IndexError: index out of range",
        ),
        ("c.pt", token_ids(2, 8), ["--pattern", "2:x"], "--pattern must be N:M with whole numbers"),
        ("c.pt", token_ids(2, 8), ["--sparsity", "1.5"], "--sparsity must be between 0 and 1, got 1.5"),
        ("c.pt", token_ids(2, 8), ["--batch-size", "0"], "--batch-size: must be 1 or more, got 0"),
        ("c.pt", token_ids(2, 8), ["--include", "nothing*"], "no weight selected"),
    ],
)
def test_prune_refuses_bad_calibration_with_a_sentence_and_exit_status_2(
    file: str | None, content: Any, options: list[str], message: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    calibration = []
    if file is not None:
        _write(file, content)
        calibration = ["--calibration", file]
    with pytest.raises(SystemExit) as exited:
        main(["prune", "test_prune_command:tiny_mlp", *calibration, *options, "--out", "out"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_prune_magnitude_needs_no_calibration_and_says_it_reads_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["prune", "test_prune_command:tiny_mlp", "--method", "magnitude", "--out", "a"]) == 0
    torch.save(token_ids(2, 8), "c.pt")
    assert (
        main(["prune", "test_prune_command:tiny_mlp", "--method", "magnitude", "--calibration", "c.pt", "--out", "b"])
        == 0
    )
    assert "--calibration is not read" in capsys.readouterr().err
    assert_same(fxsparse.masks.from_pretrained("a"), fxsparse.masks.magnitude(tiny_mlp(), 0.5))
    assert json.loads((tmp_path / "b" / "masks_config.json").read_text())["parameters"] == {
        "1.weight": [32, 16], "3.weight": [16, 32]
    }  # fmt: skip


def test_prune_on_a_full_disk_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full_disk(*args: object, **kwargs: object) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fxsparse.masks, "save_pretrained", full_disk)
    with pytest.raises(SystemExit) as exited:
        main(["prune", "test_prune_command:tiny_mlp", "--method", "magnitude", "--out", "out"])
    assert exited.value.code == 2
    assert "fxsparse prune: error: cannot write out: OSError: [Errno 28] No space left on device" in (
        capsys.readouterr().err
    )


def test_prune_names_the_flags_that_fix_a_short_last_batch_of_a_model_torch_export_captures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save(token_ids(5, 8), "c.pt")
    with pytest.raises(SystemExit) as exited:
        main(["prune", "test_prune_command:tiny_llama", "--calibration", "c.pt", "--batch-size", "2", "--out", "out"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "calibration batch 2 has input shapes [(1, 8)], the first batch [(2, 8)]" in error
    assert "Here the last batch holds 1 sample and the others 2: pick a --batch-size that divides the 5" in error
