"""Masks in and out of checkpoint directories: ``masks.of``, ``save_pretrained``/``from_pretrained``,
``from_zeros`` and the legacy compressed-tensors sparse formats (written here from their spec)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fxsparse

from hf_zoo import FAMILIES
from reference import fake_sparsity

# ---------------------------------------------------------------- masks.of


def small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def random_masks() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        name: torch.rand(shape, generator=generator) > 0.5
        for name, shape in (("0.weight", (8, 8)), ("2.weight", (4, 8)))
    }


@pytest.mark.parametrize(
    ("emit", "capture"),
    [("graph", "fx"), ("graph", "export"), ("parametrize", "fx"), ("script", "fx"), ("trace", "fx"),
     ("export", "export")],
)  # fmt: skip
def test_masks_of_reads_every_output_form(emit: str, capture: str) -> None:
    model, masks = small(), random_masks()
    out = fxsparse.transform(model, masks, emit=emit, capture=capture, example_inputs=(torch.randn(2, 8),))
    found = fxsparse.masks.of(out)
    assert sorted(found) == sorted(masks)
    assert all(torch.equal(found[name].bool(), masks[name]) for name in masks)
    assert sorted(fxsparse.viz.masks_of(out)) == sorted(masks)  # the old name, the same answer


def test_masks_of_gives_the_buffers_the_output_applies() -> None:
    out = fxsparse.transform(small(), random_masks())
    found = fxsparse.masks.of(out)
    assert found["0.weight"].data_ptr() == out.get_buffer("0.weight_mask").data_ptr()
    assert fxsparse.masks.of(small()) == {}  # a model that applies none


def test_masks_of_refuses_what_holds_no_mask_tensors_naming_it() -> None:
    for thing in (3, object(), "model.pt"):
        expected = rf"^masks\.of takes fxsparse's output .*got {type(thing).__name__}"
        with pytest.raises(fxsparse.MaskError, match=expected):
            fxsparse.masks.of(thing)  # type: ignore[arg-type]


# ---------------------------------------------------------------- save_pretrained / from_pretrained


def test_masks_round_trip_beside_a_checkpoint_by_parameter_name(tmp_path: Path) -> None:
    model, masks = small(), random_masks()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    checkpoint = (tmp_path / "model.safetensors").read_bytes()
    masks["2.weight"] = masks["2.weight"].float()  # a 0/1 float mask is stored as bits too
    assert fxsparse.masks.save_pretrained(masks, tmp_path) == tmp_path
    assert (tmp_path / "model.safetensors").read_bytes() == checkpoint  # the checkpoint is left alone
    config = json.loads((tmp_path / "masks_config.json").read_text())
    assert config == {"format": "fxsparse-masks", "version": 1, "parameters": {"0.weight": [8, 8], "2.weight": [4, 8]}}
    loaded = fxsparse.masks.from_pretrained(tmp_path)
    assert list(loaded) == ["0.weight", "2.weight"]
    assert all(loaded[name].dtype == torch.bool and torch.equal(loaded[name], masks[name].bool()) for name in masks)
    # packed: 8 masks to a byte, so the file is smaller than the masks' element count
    assert (tmp_path / "masks.safetensors").stat().st_size < 8 * 8 + 4 * 8 + 400


def test_save_pretrained_takes_an_output_and_a_transformers_model_loads_back_masked(tmp_path: Path) -> None:
    family = FAMILIES["llama"]
    torch.manual_seed(0)
    model = family.build().eval()
    masks = fxsparse.masks.n_m(model)
    example = family.inputs(2, 8)
    out = fxsparse.transform(model, masks, example_kwargs=example)
    model.save_pretrained(tmp_path)
    fxsparse.masks.save_pretrained(out, tmp_path)

    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    loaded = fxsparse.masks.from_pretrained(tmp_path)
    assert sorted(loaded) == sorted(masks)
    assert all(torch.equal(loaded[name], masks[name]) for name in masks)
    reloaded = fxsparse.transform(again, loaded, example_kwargs=example)
    with torch.no_grad():
        expected = fake_sparsity(model, masks)(**example).logits
        assert torch.equal(reloaded(**example).logits, expected)


def test_from_pretrained_refuses_a_directory_without_masks_and_says_where_else_to_look(tmp_path: Path) -> None:
    with pytest.raises(fxsparse.MaskError, match=r"no fxsparse masks in .*from_zeros.*from_compressed_tensors"):
        fxsparse.masks.from_pretrained(tmp_path)


def test_from_pretrained_refuses_a_masks_file_its_config_does_not_describe(tmp_path: Path) -> None:
    fxsparse.masks.save_pretrained(random_masks(), tmp_path)
    fxsparse.save_masks({"0.weight": torch.ones(8, 8, dtype=torch.bool)}, tmp_path / "masks.safetensors")
    with pytest.raises(fxsparse.MaskError, match=r"does not hold the masks .*missing \['2.weight'\]"):
        fxsparse.masks.from_pretrained(tmp_path)
    fxsparse.save_masks({"0.weight": torch.ones(8, 4), "2.weight": torch.ones(4, 8)}, tmp_path / "masks.safetensors")
    with pytest.raises(fxsparse.MaskError, match=r"mask for '0.weight' .* has shape \(8, 4\), but masks_config"):
        fxsparse.masks.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "masks_config.json").read_text())
    (tmp_path / "masks_config.json").write_text(json.dumps({**config, "version": 2}))
    with pytest.raises(fxsparse.MaskError, match="has version 2; this fxsparse reads version 1"):
        fxsparse.masks.from_pretrained(tmp_path)


def test_save_pretrained_refuses_a_model_that_applies_no_masks(tmp_path: Path) -> None:
    with pytest.raises(fxsparse.MaskError, match="given a Sequential that applies no masks"):
        fxsparse.masks.save_pretrained(small(), tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- from_zeros


def test_from_zeros_reads_pruned_weights_minus_zero_pruned_nan_kept() -> None:
    model = small()
    generator = torch.Generator().manual_seed(5)
    kept = {name: torch.rand(model.get_parameter(name).shape, generator=generator) > 0.5 for name in random_masks()}
    with torch.no_grad():
        for name, mask in kept.items():
            weight = model.get_parameter(name)
            weight.copy_(torch.where(mask, weight.abs() + 0.1, torch.tensor(0.0)))
        first = model.get_parameter("0.weight")
        pruned = (~kept["0.weight"]).nonzero()[0].tolist()
        first[pruned[0], pruned[1]] = -0.0
        kept_at = kept["0.weight"].nonzero()[0].tolist()
        first[kept_at[0], kept_at[1]] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = fxsparse.masks.from_zeros(model)
    assert sorted(found) == sorted(kept)
    assert all(torch.equal(found[name], kept[name]) for name in kept)
    assert all(bits_of(model.state_dict()[k]).equal(bits_of(v)) for k, v in before.items())  # NaN and -0.0 too


def test_from_zeros_selects_linear_like_weights_unless_told() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 2 * 2, 2))
    assert sorted(fxsparse.masks.from_zeros(model)) == ["2.weight"]
    assert sorted(fxsparse.masks.from_zeros(model, include="*")) == ["0.weight", "2.weight"]
    assert sorted(fxsparse.masks.from_zeros(model, include="*", exclude="2")) == ["0.weight"]


def two_four(rows: int, columns: int, seed: int) -> torch.Tensor:
    """A 2:4 mask along the last dimension: two random places of every four kept."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.rand(rows, columns // 4, 4, generator=generator).argsort(dim=-1)
    return (order < 2).reshape(rows, columns)


def test_from_zeros_checks_a_pattern_and_names_every_weight_that_breaks_it() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4))
    with torch.no_grad():
        for index, layer in enumerate(model):
            layer.weight.mul_(two_four(layer.weight.shape[0], 8, seed=index))
        assert fxsparse.masks.from_zeros(model, pattern="2:4")["1.weight"].sum().item() == 32
        model[1].weight[0, :4] = 1.0
        model[2].weight[3, 4:] = 1.0
    with pytest.raises(fxsparse.MaskError, match=r"zeros of 2 weight\(s\) do not follow 2:4: .*'1.weight'.*'2.weight'"):
        fxsparse.masks.from_zeros(model, pattern="2:4")
    with pytest.raises(fxsparse.MaskError, match="pattern must be 'N:M'"):
        fxsparse.masks.from_zeros(model, pattern="2-4")


def test_from_zeros_reads_a_conv1d_pattern_along_its_input_rows() -> None:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(6, 8)  # weight [in=8, out=6]: the input runs down the columns
    with torch.no_grad():
        layer.weight.mul_(two_four(6, 8, seed=1).T)
    assert torch.equal(fxsparse.masks.from_zeros(layer, pattern="2:4")["weight"], layer.weight != 0)


# ---------------------------------------------------------------- compressed-tensors' sparse formats

# The format, as compressed-tensors wrote it (sparse_bitmask.py, sparse_24_bitmask.py before their
# removal): "<module>.shape", "<module>.compressed" (the kept values, row-major), "<module>.bitmask"
# (numpy.packbits along the last dimension, bitorder="little") and, for sparse-bitmask only,
# "<module>.row_offsets". Written here with numpy, independently of fxsparse's reader.


def packed_bits(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(numpy.packbits(mask.numpy(), axis=-1, bitorder="little"))


def bitmask_parts(module: str, weight: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    counts = mask.sum(dim=-1)
    return {
        f"{module}.shape": torch.tensor(list(weight.shape)),
        f"{module}.compressed": weight[mask],
        f"{module}.bitmask": packed_bits(mask),
        f"{module}.row_offsets": torch.cumsum(counts, 0) - counts,
    }


def two_four_parts(module: str, weight: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        f"{module}.shape": torch.tensor(list(weight.shape)).reshape(-1, 1),
        f"{module}.compressed": weight[mask].reshape(weight.shape[0], weight.shape[1] // 2),
        f"{module}.bitmask": packed_bits(mask),
    }


def compressed_config(kind: str, **quantization: object) -> dict[str, object]:
    structure = "2:4" if kind == "sparse-24-bitmask" else "unstructured"
    sparsity = {"format": kind, "global_sparsity": 0.5, "ignore": ["lm_head"], "registry_requires_subclass": False,
                "sparsity_structure": structure, "targets": ["Linear"]}  # fmt: skip
    return {
        "architectures": ["LlamaForCausalLM"],
        "quantization_config": {"quant_method": "compressed-tensors", "format": kind, "sparsity_config": sparsity,
                                "version": "0.9.0", **quantization},
    }  # fmt: skip


def bits_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[tensor.element_size()])


def test_sparse_bitmask_checkpoint_round_trips_masks_and_weights_exactly(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(7)
    weights = {
        "layers.0.q_proj": torch.randn(6, 12, generator=generator),  # 12 columns: the last byte of a row half full
        "layers.0.o_proj": torch.randn(5, 16, generator=generator).to(torch.bfloat16),
    }
    masks = {module: torch.rand(weight.shape, generator=generator) > 0.6 for module, weight in weights.items()}
    first_kept = masks["layers.0.q_proj"].nonzero()[0].tolist()
    weights["layers.0.q_proj"][first_kept[0], first_kept[1]] = -0.0  # a kept -0.0 stays -0.0, bit for bit
    dense = {module: torch.where(masks[module], weight, torch.zeros((), dtype=weight.dtype))
             for module, weight in weights.items()}  # fmt: skip
    tensors = {"embed_tokens.weight": torch.randn(10, 12, generator=generator), "norm.weight": torch.ones(12)}
    for module in weights:
        tensors.update(bitmask_parts(module, weights[module], masks[module]))
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(compressed_config("sparse-bitmask")))

    found = fxsparse.masks.from_compressed_tensors(tmp_path)
    assert sorted(found) == sorted(f"{module}.weight" for module in weights)
    assert all(torch.equal(found[f"{module}.weight"], masks[module]) for module in weights)
    found, state = fxsparse.masks.from_compressed_tensors(tmp_path, weights=True)
    assert sorted(state) == sorted(["embed_tokens.weight", "norm.weight", *(f"{m}.weight" for m in weights)])
    for module in weights:
        restored = state[f"{module}.weight"]
        assert restored.dtype == weights[module].dtype
        assert torch.equal(bits_of(restored), bits_of(dense[module]))
    assert torch.equal(state["embed_tokens.weight"], tensors["embed_tokens.weight"])


def test_sparse_24_bitmask_sharded_checkpoint_round_trips_masks_and_weights_exactly(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(8)
    modules = {"model.layers.0.mlp.up_proj": (16, 8), "model.layers.0.mlp.down_proj": (8, 16)}
    weights = {module: torch.randn(shape, generator=generator) for module, shape in modules.items()}
    masks = {module: two_four(*shape, seed=index) for index, (module, shape) in enumerate(modules.items())}
    row, column = masks["model.layers.0.mlp.up_proj"].nonzero()[0].tolist()
    weights["model.layers.0.mlp.up_proj"][row, column] = 0.0  # kept, and zero: the bitmask still keeps it
    shards = {
        "model-00001-of-00002.safetensors": two_four_parts("model.layers.0.mlp.up_proj", weights["model.layers.0.mlp.up_proj"], masks["model.layers.0.mlp.up_proj"]),  # noqa: E501
        "model-00002-of-00002.safetensors": {
            **two_four_parts("model.layers.0.mlp.down_proj", weights["model.layers.0.mlp.down_proj"],
                             masks["model.layers.0.mlp.down_proj"]),
            "lm_head.weight": torch.randn(4, 8, generator=generator),
        },
    }  # fmt: skip
    # a sharded save splits a weight's parts wherever a shard fills up
    moved = shards["model-00001-of-00002.safetensors"].pop("model.layers.0.mlp.up_proj.bitmask")
    shards["model-00002-of-00002.safetensors"]["model.layers.0.mlp.up_proj.bitmask"] = moved
    for file, tensors in shards.items():
        save_file(tensors, tmp_path / file)
    weight_map = {name: file for file, tensors in shards.items() for name in tensors}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(compressed_config("sparse-24-bitmask")))

    found, state = fxsparse.masks.from_compressed_tensors(tmp_path, weights=True)
    assert all(torch.equal(found[f"{module}.weight"], masks[module]) for module in modules)
    assert all(bool((found[f"{m}.weight"].reshape(-1, 4).sum(dim=1) == 2).all()) for m in modules)
    for module in modules:
        assert torch.equal(state[f"{module}.weight"], torch.where(masks[module], weights[module], 0.0))
    assert sorted(state) == sorted(["lm_head.weight", *(f"{m}.weight" for m in modules)])
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    keyed = {"0.weight": found["model.layers.0.mlp.up_proj.weight"]}
    keyed["2.weight"] = found["model.layers.0.mlp.down_proj.weight"]
    out = fxsparse.transform(model, keyed)
    x = torch.randn(3, 8)
    assert torch.equal(out(x), fake_sparsity(model, keyed)(x))


def write_bitmask_checkpoint(directory: Path, **quantization: object) -> None:
    weight = torch.randn(4, 8)
    mask = weight > 0
    save_file(bitmask_parts("fc", weight, mask), directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(compressed_config("sparse-bitmask", **quantization)))


def test_from_compressed_tensors_refuses_dense_and_unknown_formats(tmp_path: Path) -> None:
    write_bitmask_checkpoint(tmp_path)
    for kind, hint in (("dense", r" \(dense weights with zeros: fxsparse.masks.from_zeros"), ("sparse-24", "$")):
        (tmp_path / "config.json").write_text(json.dumps(compressed_config(kind)))
        with pytest.raises(fxsparse.MaskError, match=rf"its sparsity_config has format '{kind}'{hint}"):
            fxsparse.masks.from_compressed_tensors(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(fxsparse.MaskError, match=r"config\.json has no sparsity_config"):
        fxsparse.masks.from_compressed_tensors(tmp_path)


def test_from_compressed_tensors_refuses_a_shard_outside_the_directory(tmp_path: Path) -> None:
    inside = tmp_path / "model"
    inside.mkdir()
    write_bitmask_checkpoint(tmp_path)  # a checkpoint beside the directory, which its index must not reach
    (inside / "config.json").write_text((tmp_path / "config.json").read_text())
    index = {"weight_map": {"fc.bitmask": "../model.safetensors"}}
    (inside / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(fxsparse.MaskError, match=r"shard '../model.safetensors' is not a file name in"):
        fxsparse.masks.from_compressed_tensors(inside)


def test_from_compressed_tensors_refuses_a_bitmask_that_disagrees_with_its_values(tmp_path: Path) -> None:
    weight, mask = torch.randn(4, 8), torch.rand(4, 8) > 0.5
    parts = bitmask_parts("fc", weight, mask)
    parts["fc.compressed"] = parts["fc.compressed"][:-1]
    save_file(parts, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(compressed_config("sparse-bitmask")))
    kept = int(mask.sum())
    expected = rf"holds {kept - 1} values, but the bitmask of 'fc.weight' keeps {kept}"
    with pytest.raises(fxsparse.MaskError, match=expected):
        fxsparse.masks.from_compressed_tensors(tmp_path)
    parts = bitmask_parts("fc", weight, mask)
    parts["fc.shape"] = torch.tensor([4, 16])
    save_file(parts, tmp_path / "model.safetensors")
    with pytest.raises(fxsparse.MaskError, match=r"'fc.bitmask' for 'fc.weight' of shape \(4, 16\) must be uint8"):
        fxsparse.masks.from_compressed_tensors(tmp_path)


def test_from_compressed_tensors_gives_masks_but_refuses_weights_of_a_quantized_checkpoint(tmp_path: Path) -> None:
    write_bitmask_checkpoint(tmp_path, config_groups={"group_0": {"targets": ["Linear"]}})
    assert sorted(fxsparse.masks.from_compressed_tensors(tmp_path)) == ["fc.weight"]
    with pytest.raises(fxsparse.MaskError, match=r"its weights are quantized \(quantization_config.config_groups\)"):
        fxsparse.masks.from_compressed_tensors(tmp_path, weights=True)


def test_packed_bits_helper_follows_numpy_little_order() -> None:
    """The test's own writer, pinned: bit 0 of byte 0 is the first element of a row."""
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, 0] = mask[0, 9] = True
    assert packed_bits(mask).tolist() == [[1, 2]]
    assert math.ceil(10 / 8) == packed_bits(mask).shape[1]


# ---------------------------------------------------------------- save_masks / load_masks stream


def test_mask_files_are_read_and_written_by_safetensors_itself(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    generator = torch.Generator().manual_seed(0)
    masks = {
        "a.weight": torch.rand(5, 7, generator=generator) > 0.5,
        "b.weight": torch.rand(3, 8, generator=generator).to(torch.bfloat16),
        "c.weight": torch.rand(4, generator=generator),
        "empty.weight": torch.zeros(0, 3, dtype=torch.bool),
        "scalar": torch.tensor(2, dtype=torch.int64),
    }
    path = fxsparse.save_masks(masks, tmp_path / "ours.safetensors")
    theirs = load_file(path)
    assert theirs.keys() == masks.keys() and all(torch.equal(theirs[k], masks[k]) for k in masks)
    save_file(masks, tmp_path / "theirs.safetensors", metadata={"format": "other"})
    for name in ("ours", "theirs"):
        loaded = fxsparse.load_masks(tmp_path / f"{name}.safetensors")
        assert loaded.keys() == masks.keys() and all(torch.equal(loaded[k], masks[k]) for k in masks)
        assert all(loaded[k].dtype == masks[k].dtype for k in masks)


def test_mask_files_stream_and_never_hold_the_file_in_memory(tmp_path: Path) -> None:
    """A 7B model's bool masks are 6.6 GB: saving or loading them must not hold them twice."""
    import tracemalloc

    masks = {"big.weight": torch.ones(4096, 8192, dtype=torch.bool)}  # 32 MiB
    tracemalloc.start()
    try:
        path = fxsparse.save_masks(masks, tmp_path / "masks.safetensors")
        saving = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        loaded = fxsparse.load_masks(path)
        loading = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert torch.equal(loaded["big.weight"], masks["big.weight"])
    assert saving < 4 * 2**20 and loading < 4 * 2**20, (saving, loading)


@pytest.mark.parametrize(
    "damage",
    ["header longer than the file", "tensor past the end", "gap between tensors", "unknown dtype", "shape mismatch"],
)
def test_malformed_mask_files_are_refused_before_any_tensor_is_made(tmp_path: Path, damage: str) -> None:
    def write(header: dict[str, object], data: bytes, length: int | None = None) -> Path:
        text = json.dumps(header).encode()
        path = tmp_path / "bad.safetensors"
        path.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + data)
        return path

    entry = {"dtype": "BOOL", "shape": [2, 2], "data_offsets": [0, 4]}
    cases = {
        "header longer than the file": ({"w": entry}, b"\1" * 4, 2**40),
        "tensor past the end": ({"w": {**entry, "shape": [2, 4], "data_offsets": [0, 8]}}, b"\1" * 4, None),
        "gap between tensors": ({"w": {**entry, "data_offsets": [4, 8]}}, b"\1" * 8, None),
        "unknown dtype": ({"w": {**entry, "dtype": "Q4"}}, b"\1" * 4, None),
        "shape mismatch": ({"w": {**entry, "shape": [3, 2]}}, b"\1" * 4, None),
    }
    path = write(*cases[damage])
    with pytest.raises(fxsparse.MaskError, match="corrupt or truncated"):
        fxsparse.load_masks(path)
