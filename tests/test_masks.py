"""fxsparse.masks: generators, selection, importers/exporters, mask files, check, update_masks, CLI."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.pruning import FakeSparsity
from torch.ao.pruning.sparsifier.weight_norm_sparsifier import WeightNormSparsifier
from torch.nn.utils import parametrize, prune

import fxsparse
from fxsparse._cli import main


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.conv = nn.Conv1d(16, 8, 1)
        self.head = nn.Linear(16, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder(x)
        return self.head(x) + self.conv(x[..., None]).sum()


def weights_of(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: model.get_parameter(name).detach() for name in masks}


# -- selection --------------------------------------------------------------------------


def test_select_defaults_globs_and_filters() -> None:
    model = Net()
    assert fxsparse.masks.select(model) == ["encoder.0.weight", "encoder.2.weight", "head.weight"]
    assert fxsparse.masks.select(model, include="encoder.*") == ["encoder.0.weight", "encoder.2.weight"]
    assert fxsparse.masks.select(model, exclude=["head"]) == ["encoder.0.weight", "encoder.2.weight"]
    convs = fxsparse.masks.select(model, filter_fn=lambda module, name: isinstance(module, nn.Conv1d))
    assert convs == ["conv.weight"]
    assert fxsparse.masks.select(model, include="*", filter_fn=lambda m, n: n.startswith("h")) == ["head.weight"]


def test_a_selection_that_picks_no_weight_is_refused_naming_the_modules() -> None:
    # A filter_fn written as (name, module) or a glob with a typo gave no masks at all, silently:
    # the "pruned" model was the dense one.
    model = Net()
    with pytest.raises(fxsparse.MaskError, match=r"filter_fn is called as filter_fn\(module, name\)") as raised:
        fxsparse.masks.magnitude(model, 0.5, filter_fn=lambda name, module: isinstance(module, nn.Linear))
    assert "'encoder.0', 'encoder.2'" in str(raised.value)
    with pytest.raises(fxsparse.MaskError, match=r"no weight selected: include='\*mlp\*' picks none"):
        fxsparse.masks.n_m(model, include="*mlp*")
    assert fxsparse.masks.select(nn.Sequential(nn.ReLU())) == []  # nothing asked for, nothing to refuse


def test_the_masks_command_says_a_sparsity_is_a_fraction(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["masks", "test_masks:Net", "--sparsity", "50", "--out", "unused.safetensors"])
    assert "got 50.0: a fraction, so 0.5 for 50 %" in capsys.readouterr().err


def test_a_tied_weight_is_selected_once() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    assert fxsparse.masks.select(model) == ["0.weight"]


# -- magnitude --------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_magnitude_prunes_exactly_the_smallest(sparsity: float) -> None:
    model = Net()
    masks = fxsparse.masks.magnitude(model, sparsity)
    for name, mask in masks.items():
        weight = model.get_parameter(name).detach().abs()
        assert mask.dtype == torch.bool and mask.shape == weight.shape
        pruned = int((~mask).sum())
        assert pruned == math.floor(sparsity * weight.numel() + 1e-9)
        if 0 < pruned < weight.numel():
            assert weight[~mask].max() <= weight[mask].min()


def test_magnitude_ties_prune_the_earlier_weights() -> None:
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.weight[1, 3] = 0.0  # an all-equal weight but for one zero
    mask = fxsparse.masks.magnitude(model, 0.5, include="*")["weight"]
    assert mask.tolist() == [[False, False, False, True], [True, True, True, False]]


def test_magnitude_all_zero_rows_and_nan() -> None:
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0, 0, 0], [1, 2, 3, 4], [float("nan"), -9, 0.5, 0.1]]))
    mask = fxsparse.masks.magnitude(model, 0.5, include="*")["weight"]
    assert not mask[0].any()  # the zero row goes first
    assert mask[2, 0]  # a NaN weight counts as the largest: kept


def test_magnitude_per_layer_levels_and_global_scope() -> None:
    model = Net()
    masks = fxsparse.masks.magnitude(model, {"encoder.0": 0.75, "encoder.*": 0.25})
    assert sorted(masks) == ["encoder.0.weight", "encoder.2.weight"]  # head: no glob matched
    assert float((~masks["encoder.0.weight"]).float().mean()) == 0.75
    assert float((~masks["encoder.2.weight"]).float().mean()) == 0.25
    global_masks = fxsparse.masks.magnitude(model, 0.5, scope="global")
    scores = torch.cat([w.abs().flatten() for w in weights_of(model, global_masks).values()])
    cut = scores.sort().values[scores.numel() // 2 - 1]
    for name, mask in global_masks.items():
        assert torch.equal(mask, model.get_parameter(name).detach().abs() > cut)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda m: fxsparse.masks.magnitude(m, 1.5),
            "sparsity for 'encoder.0.weight' must be a number between 0 and 1",
        ),
        (lambda m: fxsparse.masks.magnitude(m, 0.5, scope="row"), "scope must be 'layer' or 'global'"),
        (lambda m: fxsparse.masks.magnitude(m, {"*": 0.5}, scope="global"), "takes one sparsity"),
        (lambda m: fxsparse.masks.n_m(m, 3, 2), "n:m must be whole numbers with 0 <= n <= m"),
        (lambda m: fxsparse.masks.n_m(m, 2, 5), r"encoder.0.weight: its input dimension \(16"),
        (lambda m: fxsparse.masks.weight_norm(m, 0.5, (1, 4), 5), "zeros_per_block must be between 0 and 4"),
        (lambda m: fxsparse.masks.select(m, include=[3]), "include takes module-name globs"),
    ],
)
def test_generators_name_bad_arguments(call: object, message: str) -> None:
    with pytest.raises(fxsparse.MaskError, match=message):
        call(Net())  # type: ignore[operator]


# -- N:M --------------------------------------------------------------------------------


def test_two_of_four_along_the_input() -> None:
    model = Net()
    masks = fxsparse.masks.n_m(model)
    for name, mask in masks.items():
        groups = mask.reshape(mask.shape[0], -1, 4)
        assert bool((groups.sum(dim=2) == 2).all())
        weight = model.get_parameter(name).detach().abs().reshape(groups.shape)
        assert bool((weight.masked_fill(~groups, math.inf).min(dim=2).values
                     >= weight.masked_fill(groups, -1).max(dim=2).values).all())  # fmt: skip
        assert fxsparse.viz.pattern_of(mask) == "2:4"


def test_n_m_of_a_convolution_runs_along_input_channels() -> None:
    conv = nn.Conv2d(8, 4, 3)
    mask = fxsparse.masks.n_m(conv, include="*")["weight"]  # [4, 8, 3, 3]
    per_group = mask.movedim(1, -1).reshape(-1, 4).sum(dim=1)
    assert bool((per_group == 2).all())


def test_n_m_of_a_conv1d_reads_dimension_zero() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    layer = transformers.pytorch_utils.Conv1D(6, 8)  # weight [in 8, out 6]
    mask = fxsparse.masks.n_m(layer, include="*")["weight"]
    assert bool((mask.T.reshape(6, 2, 4).sum(dim=2) == 2).all())


def test_n_m_ties_keep_the_earlier_weights_and_edges() -> None:
    model = nn.Linear(8, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 1, 1, 1, 0, 0, 0, 0]]))
    assert fxsparse.masks.n_m(model, include="*")["weight"].int().tolist() == [[1, 1, 0, 0, 1, 1, 0, 0]]
    assert not fxsparse.masks.n_m(model, 0, 4, include="*")["weight"].any()
    assert fxsparse.masks.n_m(model, 4, 4, include="*")["weight"].all()


# -- blocks and WeightNormSparsifier ---------------------------------------------------------


CONFIGS = [
    {"sparsity_level": 0.5, "sparse_block_shape": (1, 4)},
    {"sparsity_level": 0.3, "sparse_block_shape": (2, 2)},
    {"sparsity_level": 0.5, "sparse_block_shape": (3, 3)},  # blocks cut short at the edges
    {"sparsity_level": 0.9, "sparse_block_shape": (1, 1)},
    {"sparsity_level": 0.6, "sparse_block_shape": (1, 4), "zeros_per_block": 2},
    {"sparsity_level": 0.5, "sparse_block_shape": (4, 4), "zeros_per_block": 10},
    {"sparsity_level": 1.0, "sparse_block_shape": (1, 4)},
    {"sparsity_level": 0.0, "sparse_block_shape": (2, 4)},
]


def _assert_weight_norm_equals_the_sparsifier(model: nn.Module, config: dict[str, object]) -> None:
    """``masks.weight_norm(model, **config)`` against the masks WeightNormSparsifier(**config) makes."""
    prepared = copy.deepcopy(model)
    sparsifier = WeightNormSparsifier(**config)  # type: ignore[arg-type]
    sparsifier.prepare(prepared, config=None)
    sparsifier.step()
    expected = fxsparse.masks.from_sparsifier(sparsifier)
    ours = fxsparse.masks.weight_norm(model, **config)  # type: ignore[arg-type]
    assert sorted(ours) == sorted(expected) == ["0.weight", "2.weight"]
    for name in expected:
        assert torch.equal(ours[name], expected[name].bool()), name


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_weight_norm_equals_the_sparsifier(config: dict[str, object]) -> None:
    torch.manual_seed(1)
    divisible = "zeros_per_block" in config  # the sparsifier itself fails on cut blocks with zeros_per_block
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8 if divisible else 10))
    _assert_weight_norm_equals_the_sparsifier(model, config)


def test_block_masks_prune_whole_blocks() -> None:
    model = nn.Linear(16, 8)
    mask = fxsparse.masks.block(model, 0.5, (4, 4), include="*")["weight"]
    blocks = mask.reshape(2, 4, 4, 4).permute(0, 2, 1, 3).reshape(8, 16)
    assert sorted(blocks.sum(dim=1).tolist()) == [0, 0, 0, 0, 16, 16, 16, 16]
    assert fxsparse.viz.pattern_of(mask) == "block 4x4"


# -- to and from torch's pruning tools ---------------------------------------------------------


def test_sparsifier_round_trip() -> None:
    model = Net()
    masks = fxsparse.masks.n_m(model)
    sparsifier = fxsparse.masks.to_sparsifier(model, masks)
    assert not parametrize.is_parametrized(model.head)  # the model itself is untouched
    back = fxsparse.masks.from_sparsifier(sparsifier)
    assert sorted(back) == sorted(masks) and all(torch.equal(back[k].bool(), masks[k]) for k in masks)
    sparsifier.step()  # and it goes on
    sparsifier.squash_mask()


def test_masks_from_a_parametrized_model_and_from_prune() -> None:
    model = Net()
    masks = fxsparse.masks.magnitude(model, 0.5)
    reference = fxsparse.transform(model, masks, emit="parametrize")
    found = fxsparse.masks.from_parametrized(reference)
    assert sorted(found) == sorted(masks) and all(torch.equal(found[k].bool(), masks[k]) for k in masks)

    pruned = copy.deepcopy(model)
    prune.l1_unstructured(pruned.encoder[0], "weight", amount=0.5)
    prune.random_unstructured(pruned.head, "weight", amount=0.3)
    imported = fxsparse.masks.from_prune(pruned)
    assert sorted(imported) == ["encoder.0.weight", "head.weight"]
    out = fxsparse.transform(model, imported)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(out(x), pruned(x))  # prune's weight_orig * weight_mask, bit for bit


# -- files --------------------------------------------------------------------------------


def test_mask_files_round_trip(tmp_path: Path) -> None:
    masks = fxsparse.masks.magnitude(Net(), 0.5)
    masks["soft"] = torch.rand(3, 3)
    for suffix in (".safetensors", ".pt"):
        path = fxsparse.save_masks(masks, tmp_path / f"m{suffix}")
        loaded = fxsparse.load_masks(path)
        assert sorted(loaded) == sorted(masks)
        assert all(loaded[k].dtype == masks[k].dtype and torch.equal(loaded[k], masks[k]) for k in masks)
    weights = sum(m.numel() for m in masks.values())
    assert (tmp_path / "m.safetensors").stat().st_size < weights * 1.1 + 2000  # bool stays 1 byte


def test_mask_files_write_the_values_of_a_conjugate_view(tmp_path: Path) -> None:
    # safetensors files are written from each tensor's memory: a conjugate view's memory holds the
    # unconjugated values (torch conjugates lazily), which loaded back as other masks, silently.
    mask = torch.tensor([[1 + 1j, 0j], [0j, 1 - 1j]], dtype=torch.complex64).conj()
    loaded = fxsparse.load_masks(fxsparse.save_masks({"w": mask}, tmp_path / "m.safetensors"))
    assert torch.equal(loaded["w"], torch.tensor([[1 - 1j, 0j], [0j, 1 + 1j]], dtype=torch.complex64))


class RunsCode:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, ("open('ran.txt', 'w').write('code ran')",))


def test_a_mask_file_never_runs_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"weight": RunsCode()}, "evil.pt")
    with pytest.raises(fxsparse.MaskError, match=r"torch.load\(weights_only=True\) refused it"):
        fxsparse.load_masks("evil.pt")
    assert not Path("ran.txt").exists()


def test_corrupt_and_truncated_files(tmp_path: Path) -> None:
    path = fxsparse.save_masks({"w": torch.ones(64, 64, dtype=torch.bool)}, tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(fxsparse.MaskError, match="corrupt or truncated"):
        fxsparse.load_masks(path)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(fxsparse.MaskError, match="cannot read"):
        fxsparse.load_masks(tmp_path / "junk.pt")
    with pytest.raises(fxsparse.MaskError, match="no mask file at"):
        fxsparse.load_masks(tmp_path / "missing.safetensors")


def test_an_interrupted_save_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fxsparse.masks import _files

    path = fxsparse.save_masks({"w": torch.ones(2, 2, dtype=torch.bool)}, tmp_path / "m.safetensors")
    write = _files._write_safetensors

    def torn(tensors: dict[str, torch.Tensor], metadata: dict[str, str], temporary: str) -> None:
        write(tensors, metadata, temporary)
        data = Path(temporary).read_bytes()
        Path(temporary).write_bytes(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(_files, "_write_safetensors", torn)
    with pytest.raises(OSError, match="disk full"):
        fxsparse.save_masks({"w": torch.zeros(2, 2, dtype=torch.bool)}, path)
    assert fxsparse.load_masks(path)["w"].all() and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# -- update_masks ----------------------------------------------------------------------------


@pytest.mark.parametrize("emit", ["graph", "parametrize"])
def test_update_masks_in_place_equals_fake_sparsity(emit: str) -> None:
    model = Net()
    first, second = fxsparse.masks.magnitude(model, 0.3), fxsparse.masks.magnitude(model, 0.7)
    out = fxsparse.transform(model, first, emit=emit)
    buffers = {name: mask.data_ptr() for name, mask in fxsparse.viz.masks_of(out).items()}
    x = torch.randn(5, 16)
    for masks in (second, first, second):
        fxsparse.update_masks(out, masks)
        reference = copy.deepcopy(model)
        for name, mask in masks.items():
            owner, _, tensor = name.rpartition(".")
            parametrize.register_parametrization(reference.get_submodule(owner), tensor, FakeSparsity(mask))
        with torch.no_grad():
            assert torch.equal(out(x), reference(x))
    assert {name: mask.data_ptr() for name, mask in fxsparse.viz.masks_of(out).items()} == buffers


def test_update_masks_checks_everything_before_writing() -> None:
    model = Net()
    masks = fxsparse.masks.magnitude(model, 0.5)
    out = fxsparse.transform(model, masks)
    before = {k: v.clone() for k, v in fxsparse.viz.masks_of(out).items()}
    bad = [
        ({"encoder.0": torch.zeros(32, 16, dtype=torch.bool), "head": torch.ones(3, 3)}, r"has shape \(3, 3\)"),
        ({"encoder.0": torch.full((32, 16), 0.5)}, "values other than 0 and 1, but this model's mask is bool"),
        ({"conv": torch.ones(8, 16, 1)}, "'conv.weight' is not masked in this model"),
        ({"nope": torch.ones(1)}, "mask key 'nope' names no parameter or module"),
        ({"head": torch.full((12, 16), float("nan"))}, "NaN or infinite"),
    ]
    for masks_given, message in bad:
        with pytest.raises(fxsparse.MaskError, match=message):
            fxsparse.update_masks(out, masks_given)
        assert all(torch.equal(fxsparse.viz.masks_of(out)[k], v) for k, v in before.items())


# -- check ------------------------------------------------------------------------------------


def test_check_reports_every_problem_at_once() -> None:
    model = Net()
    masks = {
        "encoder.0.weight": fxsparse.masks.n_m(model)["encoder.0.weight"],
        "head": torch.ones(12, 16),
        "conv": torch.ones(3, 3),
        "encodr.2.weight": torch.ones(16, 32),
        "encoder.2.weight": torch.full((16, 32), float("nan")),
    }
    report = fxsparse.check(model, masks, pattern="2:4")
    assert not report.ok and len(report.problems) == 4
    assert report.masks[0].pattern == "2:4" and report.masks[0].binary and report.masks[0].density == 0.5
    text = str(report)
    assert "5 masks, 4 problems:" in text and "'conv.weight' (key 'conv') has shape (3, 3)" in text
    assert "mask key 'encodr.2.weight'" in text and "NaN" in text
    assert "mask for 'head.weight' does not follow 2:4 (it is dense)" in text
    assert fxsparse.check(fxsparse.transform(model, {"head": torch.ones(12, 16)})).ok


def test_check_table_shows_each_mask_under_the_header() -> None:
    model = Net()
    report = fxsparse.check(model, {"head": torch.ones(12, 16)})
    header, row = str(report).splitlines()[:2]
    expected = {"parameter": "head.weight", "shape": "12×16", "dtype": "float32", "device": "cpu", "density": "1.000"}
    assert header.split()[:5] == list(expected) and row.split()[:5] == list(expected.values())
    for column in ("dtype", "device"):  # each value starts under its column's title
        assert row[header.index(column) :].startswith(expected[column])


# -- command line -------------------------------------------------------------------------------


def test_masks_and_check_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["masks", "test_masks:Net", "--recipe", "2:4", "--out", "m.safetensors"]) == 0
    assert "3 masks (2:4, density 0.500)" in capsys.readouterr().out
    assert main(["check", "test_masks:Net", "--masks", "m.safetensors", "--pattern", "2:4"]) == 0
    assert "3 masks, no problems" in capsys.readouterr().out
    assert (
        main(["masks", "test_masks:Net", "--recipe", "block", "--block", "4x4", "--include", "*", "--out", "b.pt"]) == 0
    )
    assert main(["check", "test_masks:Net", "--masks", "b.pt", "--pattern", "2:4"]) == 1
    assert "does not follow 2:4" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["masks", "test_masks:Net", "--recipe", "3:8:1"])
    assert "--recipe must be magnitude, N:M" in capsys.readouterr().err


def test_generators_leave_the_model_alone() -> None:
    model = Net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fxsparse.masks.magnitude(model, 0.5, scope="global")
    fxsparse.masks.n_m(model)
    fxsparse.masks.block(model, 0.5, include="*")
    fxsparse.masks.to_sparsifier(model, fxsparse.masks.magnitude(model, 0.5))
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


@pytest.mark.parametrize("emit", ["script", "trace"])
def test_update_masks_of_torchscript_outputs(emit: str) -> None:
    model = Net()
    x = torch.randn(2, 16)
    out = fxsparse.transform(model, fxsparse.masks.magnitude(model, 0.3), emit=emit, example_inputs=(x,))
    new = fxsparse.masks.magnitude(model, 0.8)
    fxsparse.update_masks(out, new)
    with torch.no_grad():
        assert torch.equal(out(x), fxsparse.transform(model, new, emit="parametrize")(x))


def test_packed_mask_files(tmp_path: Path) -> None:
    masks = {"w": torch.rand(37, 11) > 0.5, "scalar": torch.tensor(True), "soft": torch.rand(2, 3)}
    path = fxsparse.save_masks(masks, tmp_path / "p.safetensors", packed=True)
    loaded = fxsparse.load_masks(path)
    assert all(loaded[k].dtype == masks[k].dtype and torch.equal(loaded[k], masks[k]) for k in masks)
    plain = fxsparse.save_masks({"w": torch.ones(256, 256, dtype=torch.bool)}, tmp_path / "b.safetensors")
    bits = fxsparse.save_masks({"w": torch.ones(256, 256, dtype=torch.bool)}, tmp_path / "c.safetensors", packed=True)
    assert bits.stat().st_size * 7 < plain.stat().st_size  # 8 to a byte
    with pytest.raises(fxsparse.MaskError, match="packed masks are written to safetensors files"):
        fxsparse.save_masks(masks, tmp_path / "p.pt", packed=True)


def test_a_packed_file_that_lies_about_its_shape(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2, dtype=torch.uint8)}, str(tmp_path / "x.safetensors"),
              metadata={"fxsparse.packed": '{"w": [64, 64]}'})  # fmt: skip
    with pytest.raises(fxsparse.MaskError, match="needs 512 bytes, found 2"):
        fxsparse.load_masks(tmp_path / "x.safetensors")


# -- from the review -------------------------------------------------------------------------


def test_generators_read_parametrized_models() -> None:
    model = Net()
    prepared = fxsparse.masks.to_sparsifier(model, fxsparse.masks.magnitude(model, 0.5)).model
    assert fxsparse.masks.select(prepared) == fxsparse.masks.select(model)
    again = fxsparse.masks.magnitude(prepared, 0.75)  # ranks the masked weights, as a schedule steps
    assert all(float((~mask).float().mean()) == 0.75 for mask in again.values())
    with pytest.raises(fxsparse.MaskError, match="before scripting"):
        fxsparse.masks.magnitude(fxsparse.transform(model, {}, emit="script"), 0.5)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_tied_weights_round_trip() -> None:
    model, x = Tied(), torch.randn(2, 8)
    masks = fxsparse.masks.magnitude(model, 0.5)
    assert sorted(masks) == ["a.weight"]
    reference = fxsparse.transform(model, masks)
    assert sorted(fxsparse.masks.from_parametrized(fxsparse.transform(model, masks, emit="parametrize"))) == [
        "a.weight"
    ]
    sparsifier = fxsparse.masks.to_sparsifier(model, masks)
    with torch.no_grad():
        assert torch.equal(sparsifier.model(x), reference(x))  # masked at both uses
    assert sorted(fxsparse.masks.from_sparsifier(sparsifier)) == ["a.weight"]


def test_check_takes_block_masks_of_any_shape_and_validates_patterns() -> None:
    conv = nn.Conv2d(8, 16, 3)
    assert fxsparse.check(conv, fxsparse.masks.block(conv, 0.5, include="*"), pattern="block 4x4").ok
    small = nn.Linear(6, 6)
    assert fxsparse.check(small, fxsparse.masks.block(small, 0.5, include="*"), pattern="block 4x4").ok
    for bad in ("2:0", "8:4", "block 0x0", "2-4"):
        with pytest.raises(fxsparse.MaskError, match="pattern must be 'N:M'"):
            fxsparse.check(small, {"weight": torch.ones(6, 6)}, pattern=bad)
    report = fxsparse.check(small, {"bias": torch.ones(6)}, pattern="2:4")
    assert report.problems == ("mask for 'bias' is 1-D: 2:4 applies to weights of 2 or more",)


def test_update_masks_refuses_what_transform_refuses() -> None:
    model = Net()
    out = fxsparse.transform(model, fxsparse.masks.magnitude(model, 0.5))
    ones = torch.ones(32, 16, dtype=torch.bool)
    with pytest.raises(fxsparse.MaskError, match=r"name the same parameter 'encoder\.0\.weight'"):
        fxsparse.update_masks(out, {"encoder.0.weight": ones, "encoder.0": ones})
    with pytest.raises(fxsparse.MaskError, match="is on the meta device and holds no values"):
        fxsparse.update_masks(out, {"encoder.0": torch.ones(32, 16, device="meta")})
    program = fxsparse.transform(
        model, {"head": torch.ones(12, 16)}, emit="export", example_inputs=(torch.randn(2, 16),)
    )
    with pytest.raises(fxsparse.MaskError, match="constants of the program"):
        fxsparse.update_masks(program, {"head": torch.ones(12, 16)})  # type: ignore[arg-type]


def test_odd_weights_get_mask_errors() -> None:
    lazy = nn.LazyLinear(4)
    with pytest.raises(fxsparse.MaskError, match="not initialised yet"):
        fxsparse.masks.magnitude(lazy, 0.5)
    with torch.device("meta"):
        meta = nn.Linear(4, 4)
    with pytest.raises(fxsparse.MaskError, match="meta device"):
        fxsparse.masks.n_m(meta)
    empty = nn.Linear(4, 4)
    empty.weight = nn.Parameter(torch.empty(4, 0))
    assert fxsparse.masks.block(empty, 0.5, include="*")["weight"].shape == (4, 0)
    for shape in ((-1, 4), (0, 4), (1.5, 4)):
        with pytest.raises(fxsparse.MaskError, match="a block shape is two whole numbers above 0"):
            fxsparse.masks.block(nn.Linear(8, 8), 0.5, shape, include="*")  # type: ignore[arg-type]
    with pytest.raises(fxsparse.MaskError, match="names no parameter"):
        fxsparse.masks.to_sparsifier(Net(), {"nine.weight": torch.ones(2)})


def test_global_scope_keeps_float64_precision() -> None:
    model = nn.Linear(2, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1 + 1e-10, 1.0]], dtype=torch.float64))
    assert fxsparse.masks.magnitude(model, 0.5, scope="global", include="*")["weight"].tolist() == [[True, False]]


def test_mask_files_refuse_bombs_and_lies(tmp_path: Path) -> None:
    import zipfile

    from safetensors.torch import save_file

    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(256, 256)}, plain)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as target:
        for entry in source.infolist():
            target.writestr(entry.filename, source.read(entry))
    with pytest.raises(fxsparse.MaskError, match="compressed entries"):
        fxsparse.load_masks(bomb)
    for metadata in ('{"a": 5}', "[1]", "null", '{"a": [2.5, 4]}'):
        save_file({"a": torch.zeros(2, dtype=torch.uint8)}, str(tmp_path / "x.safetensors"),
                  metadata={"fxsparse.packed": metadata})  # fmt: skip
        with pytest.raises(fxsparse.MaskError, match="cannot read"):
            fxsparse.load_masks(tmp_path / "x.safetensors")
    shared = torch.ones(4, dtype=torch.bool)
    path = fxsparse.save_masks({"a": shared, "b": shared}, tmp_path / "s.safetensors")
    assert sorted(fxsparse.load_masks(path)) == ["a", "b"]


# -- issue 13 ------------------------------------------------------------------------------------


class Conv1D(nn.Module):
    """A user's own layer that happens to share transformers' class name: weight [out, in], F.linear."""

    def __init__(self, features_in: int, features_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features_out, features_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)


def test_a_users_own_conv1d_is_read_along_its_real_input_axis() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(8, 12))  # weight [out 12, in 8]: 12 is a multiple of 4 too, 8 the input
    mask = fxsparse.masks.n_m(model, include="*")["0.weight"]
    weight = model[0].weight.detach().abs()
    groups, magnitudes = mask.reshape(12, 2, 4), weight.reshape(12, 2, 4)  # groups of 4 along dimension 1
    expected = torch.zeros_like(groups).scatter_(2, magnitudes.topk(2, dim=2).indices, True)
    assert torch.equal(groups, expected)
    (entry,) = fxsparse.viz.summarize({"0.weight": mask}, model)
    assert entry.pattern == "2:4"
    assert fxsparse.check(model, {"0.weight": mask}, pattern="2:4").ok
    transposed_groups = mask.T.reshape(8, 3, 4).sum(dim=2)  # what reading it as [in, out] would see
    assert not bool((transposed_groups <= 2).all())


def test_transformers_conv1d_and_its_subclasses_stay_transposed() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D as HuggingFaceConv1D

    class Projection(HuggingFaceConv1D):  # type: ignore[misc]
        pass

    torch.manual_seed(0)
    for layer in (HuggingFaceConv1D(12, 8), Projection(12, 8)):  # weight [in 8, out 12]
        assert fxsparse.masks.select(layer) == ["weight"]
        mask = fxsparse.masks.n_m(layer)["weight"]
        assert bool((mask.T.reshape(12, 2, 4).sum(dim=2) == 2).all())
        assert fxsparse.viz.summarize({"weight": mask}, layer)[0].pattern == "2:4"
        assert fxsparse.check(layer, {"weight": mask}, pattern="2:4").ok
    assert transformers is not None


@pytest.mark.parametrize("level", [-1.0, -math.inf, 0, 0.0, 0.5, 1, 1.0, 1.5, 2.0, math.inf])
@pytest.mark.parametrize(
    "blocks", [{"sparse_block_shape": (1, 4)}, {"sparse_block_shape": (2, 2), "zeros_per_block": 2},
               {"sparse_block_shape": (1, 4), "zeros_per_block": 0}, {"sparse_block_shape": (3, 3)}],
    ids=["whole-blocks", "two-of-four", "no-zeros", "cut-blocks"],
)  # fmt: skip
def test_weight_norm_takes_every_level_the_sparsifier_takes(level: float, blocks: dict[str, object]) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    config = {"sparsity_level": level, **blocks}
    _assert_weight_norm_equals_the_sparsifier(model, config)


def test_weight_norm_refuses_a_level_the_sparsifier_cannot_rank_by() -> None:
    with pytest.raises(fxsparse.MaskError, match=r"sparsity_level for '0.weight' must be a number \(not NaN\)"):
        fxsparse.masks.weight_norm(nn.Sequential(nn.Linear(8, 4)), math.nan)


def test_check_plans_the_model_once_however_many_masks() -> None:
    from unittest import mock

    import fxsparse.masks._check

    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(50)])
    masks: dict[str, torch.Tensor] = {f"{i}.weight": torch.ones(4, 4, dtype=torch.bool) for i in range(50)}
    with mock.patch.object(fxsparse.masks._check, "build_plan", wraps=fxsparse.masks._check.build_plan) as planned:
        assert fxsparse.check(model, masks).ok
    assert planned.call_count <= 1  # a plan per key walked the whole model per key: quadratic
    tied = Tied()
    report = fxsparse.check(tied, {"a.weight": torch.ones(8, 8), "b": torch.ones(8, 8), "c": torch.ones(8, 8)})
    assert report.problems[0].startswith("mask key 'c' names no parameter or module")
    assert "mask keys 'a.weight' and 'b' name the same parameter 'a.weight'" in report.problems[1]


def test_check_searches_closest_names_a_bounded_number_of_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys naming nothing, many of them: a fuzzy search of every name per key cost keys x layers
    (100k keys against 1,500 layers did not finish in 120 s); the names are indexed once."""
    import difflib

    import fxsparse._plan

    compared = 0
    close_matches = difflib.get_close_matches

    def counted(word: str, possibilities: list[str], *args: object, **kwargs: object) -> list[str]:
        nonlocal compared
        compared += len(possibilities)
        return close_matches(word, possibilities, *args, **kwargs)  # type: ignore[arg-type]

    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(300)])
    masks = {f"blocks.{i}.wieght": torch.ones(2, 2) for i in range(2000)} | {"7.wieght": torch.ones(2, 2)}
    monkeypatch.setattr(fxsparse._plan.difflib, "get_close_matches", counted)
    report = fxsparse.check(model, masks)
    names = 3 * 300  # each layer's weight and bias, and the layer itself (its weight)
    assert compared <= 10 * names + 64 * len(masks)  # the first keys searched in full, then their own module's
    assert len(report.problems) == len(masks)
    assert "names no parameter or module of the model; closest valid names: '0.weight', " in report.problems[0]
    assert report.problems[-1].endswith("closest valid names: '7.weight'")  # its own module's, searched at any count
    assert "(closest names are searched for the first 10 such keys only)" in report.problems[-2]


@pytest.mark.parametrize(
    "dtype",
    [torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz, torch.float8_e8m0fnu,
     torch.uint16, torch.uint32, torch.uint64, torch.int8, torch.bfloat16],
    ids=str,
)  # fmt: skip
def test_check_reads_every_mask_dtype_transform_takes(dtype: torch.dtype) -> None:
    """check never raises for a mask transform accepts (float8 and wide unsigned masks raised
    NotImplementedError): the same density, binary and pattern as the mask's bool form."""
    layer = nn.Linear(8, 4)
    kept = torch.tensor(
        [[1, 1, 0, 0, 0, 1, 0, 1], [0, 1, 1, 0, 1, 0, 1, 0], [1, 0, 1, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1, 0, 0]],
        dtype=torch.bool,
    )  # two kept of every four along the input, in no simpler pattern
    if dtype == torch.float8_e8m0fnu:  # powers of two only, no 0: a mask of ones
        kept = torch.ones(4, 8, dtype=torch.bool)
        assert fxsparse.check(layer, {"weight": kept.to(dtype)}).masks[0].pattern == "dense"
        return
    (entry,) = fxsparse.check(layer, {"weight": kept.to(dtype)}, pattern="2:4").masks
    assert entry.problems == () and entry.dtype == str(dtype).removeprefix("torch.")
    assert (entry.density, entry.binary, entry.pattern) == (0.5, True, "2:4")
    assert torch.equal(fxsparse.transform(layer, {"weight": kept.to(dtype)}).get_buffer("weight_mask"), kept.float())
    if dtype.is_floating_point:
        soft = torch.full((4, 8), 0.5).to(dtype)
        assert fxsparse.check(layer, {"weight": soft}).masks[0].pattern == "soft"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: torch.quantize_per_tensor(torch.ones(4, 8), 1.0, 0, torch.quint8), "is a quantized tensor"),
        (lambda: torch.full((4, 8), float("nan")).to(torch.float8_e4m3fn), "holds NaN or infinite values"),
        (lambda: torch.empty(4, 8, dtype=torch.bits8), "must be bool, integer or floating, got torch.bits8"),
        (lambda: torch.empty(4, 8, dtype=torch.uint4), "must be bool, integer or floating, got torch.uint4"),
    ],
    ids=["quantized", "float8 NaN", "bits8", "uint4"],
)
def test_check_and_transform_give_a_reason_for_masks_torch_cannot_convert(
    make: Callable[[], torch.Tensor], reason: str
) -> None:
    layer = nn.Linear(8, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch 2.13 deprecates quantized tensors
        mask = make()
    report = fxsparse.check(layer, {"weight": mask})
    assert len(report.problems) == 1 and report.problems[0].startswith("mask for 'weight' ")
    assert reason in report.problems[0]
    with pytest.raises(fxsparse.MaskError, match=reason.replace("(", r"\(")):
        fxsparse.transform(layer, {"weight": mask})


def test_save_masks_looks_each_storage_up_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = 0
    untyped_storage = torch.Tensor.untyped_storage

    def counted(self: torch.Tensor) -> torch.UntypedStorage:
        nonlocal reads
        reads += 1
        return untyped_storage(self)

    shared = torch.ones(2, 2, dtype=torch.bool)
    masks = {f"m{i}": torch.ones(2, 2, dtype=torch.bool) for i in range(300)} | {"x": shared, "y": shared}
    monkeypatch.setattr(torch.Tensor, "untyped_storage", counted)
    path = fxsparse.save_masks(masks, tmp_path / "m.safetensors")
    monkeypatch.undo()
    assert reads <= 10 * len(masks)  # comparing with every earlier mask read 300 * 299 storages
    loaded = fxsparse.load_masks(path)
    assert sorted(loaded) == sorted(masks) and all(torch.equal(loaded[k], masks[k]) for k in masks)


def saliency_pruned(model: nn.Module, groups: list[dict[str, object]]) -> object:
    from torch.ao.pruning._experimental.pruner import SaliencyPruner

    pruner = SaliencyPruner({"sparsity_level": 0.5})
    pruner.prepare(model, groups)
    pruner.step()
    return pruner


@pytest.mark.parametrize(
    ("layer", "x"),
    [(nn.Linear(8, 6, bias=False), torch.randn(3, 8)), (nn.Conv2d(6, 4, 3, bias=False), torch.randn(2, 6, 5, 5))],
    ids=["linear", "conv2d"],
)
def test_structured_pruner_masks_expand_to_whole_rows_as_the_pruner_applies_them(
    layer: nn.Module, x: torch.Tensor
) -> None:
    torch.manual_seed(0)
    original = nn.Sequential(copy.deepcopy(layer))
    torch.nn.init.normal_(original[0].weight)
    prepared = copy.deepcopy(original)
    pruner = saliency_pruned(prepared, [{"tensor_fqn": "0.weight"}])
    masks = fxsparse.masks.from_sparsifier(pruner)
    rows = prepared[0].parametrizations.weight[0].mask
    assert sorted(masks) == ["0.weight"] and not bool(rows.all()) and bool(rows.any())
    shape = original[0].weight.shape
    assert torch.equal(masks["0.weight"], rows.reshape(-1, *[1] * (len(shape) - 1)).expand(shape))
    with torch.no_grad():
        assert torch.equal(fxsparse.transform(original, masks)(x), prepared(x))


def test_structured_pruner_masks_the_bias_of_pruned_rows_where_it_prunes_biases() -> None:
    torch.manual_seed(0)
    original, x = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)), torch.randn(3, 8)
    prepared = copy.deepcopy(original)
    pruner = saliency_pruned(prepared, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight", "prune_bias": False}])
    masks = fxsparse.masks.from_sparsifier(pruner)
    assert sorted(masks) == ["0.bias", "0.weight", "2.weight"]
    rows = prepared[0].parametrizations.weight[0].mask
    assert torch.equal(masks["0.bias"], rows)
    with torch.no_grad():
        ours = fxsparse.transform(original, masks)(x)
        theirs = prepared(x)  # its hook adds the (row-masked) bias after the product: rounding may differ
        hidden = torch.relu(F.linear(x, original[0].weight * masks["0.weight"], original[0].bias * rows))
        assert torch.equal(ours, F.linear(hidden, original[2].weight * masks["2.weight"], original[2].bias))
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_from_sparsifier_refuses_a_data_sparsifier_and_an_unprepared_one() -> None:
    from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier

    data = DataNormSparsifier(sparsity_level=0.5)
    data.add_data("first", nn.Linear(8, 4).weight)
    data.step()
    with pytest.raises(fxsparse.MaskError, match=r"DataNormSparsifier is a data sparsifier, whose data \('first'\)"):
        fxsparse.masks.from_sparsifier(data)
    with pytest.raises(fxsparse.MaskError, match="this WeightNormSparsifier has no groups"):
        fxsparse.masks.from_sparsifier(WeightNormSparsifier())


@pytest.mark.parametrize("emit", ["graph", "parametrize", "script", "trace"])
def test_update_masks_refuses_different_masks_for_tied_aliases(emit: str) -> None:
    torch.manual_seed(0)
    model, x = Tied(), torch.randn(2, 8)
    first = torch.rand(8, 8) > 0.5
    out = fxsparse.transform(model, {"a.weight": first}, emit=emit, example_inputs=(x,))
    with torch.no_grad():
        before = out(x)
    new = torch.rand(8, 8) > 0.5
    with pytest.raises(fxsparse.MaskError) as raised:
        fxsparse.update_masks(out, {"a.weight": new, "b.weight": ~new})
    # A scripted graph holds the parameter under the name the graph reads it by only.
    named = "'b.weight'" if emit == "script" else "mask keys 'a.weight' and 'b.weight' name the same parameter"
    assert named in str(raised.value)
    with torch.no_grad():
        assert torch.equal(out(x), before)  # nothing written
    if emit != "script":
        fxsparse.update_masks(out, {"b.weight": new})  # either alias: one mask, at both uses
        with torch.no_grad():
            assert torch.equal(out(x), fxsparse.transform(model, {"a.weight": new}, emit="parametrize")(x))


# -- issue 14: mask files --------------------------------------------------------------------------


def run_child(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh Python with this fxsparse: what a crash or a signal does, it does there."""
    root = Path(fxsparse.__file__).parent.parent
    environment = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=environment, timeout=300
    )


EDITS_THEN_TRUNCATES = """
import os, sys
import fxsparse
path = sys.argv[1]
masks = fxsparse.load_masks(path)
size = os.path.getsize(path)
with open(path, "r+b") as file:  # in place, as an editor or a second writer would: all-kept to all-pruned
    file.seek(size - 4096)
    file.write(bytes(4096))
print(int(masks["w"].sum()), flush=True)
os.truncate(path, 0)  # a memory-mapped mask now dies of SIGBUS on its next read
print(int(masks["w"].sum()), flush=True)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="a file cannot be truncated while Windows maps it")
def test_loaded_masks_own_their_memory_whatever_happens_to_the_file(tmp_path: Path) -> None:
    path = fxsparse.save_masks({"w": torch.ones(64, 64, dtype=torch.bool)}, tmp_path / "m.safetensors")
    child = run_child(EDITS_THEN_TRUNCATES, str(path))
    assert (child.returncode, child.stdout.split()) == (0, ["4096", "4096"]), child.stderr


def test_packed_masks_unpack_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fxsparse.masks._files as files

    monkeypatch.setattr(files, "_UNPACK_CHUNK", 3)  # 24 bits a chunk: 13 chunks, the last one cut short
    mask = torch.rand(5, 61) > 0.5  # 305 bits: not a whole number of bytes
    path = fxsparse.save_masks({"w": mask}, tmp_path / "p.safetensors", packed=True)
    assert torch.equal(fxsparse.load_masks(path)["w"], mask)


PEAK_OF_A_LOAD = """
import json, sys
from pathlib import Path
import fxsparse

def peak_kib(reset=False):
    if reset:
        Path("/proc/self/clear_refs").write_text("5")  # the peak is now what is resident
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])

fxsparse.load_masks(sys.argv[2])  # torch's first operations allocate what they keep
before = peak_kib(reset=True)
masks = fxsparse.load_masks(sys.argv[1])
print(json.dumps({"peak": (peak_kib() - before) * 1024, "masks": masks["w"].numel()}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures Linux's peak resident memory")
def test_a_packed_mask_file_loads_within_its_masks_and_a_few_times_its_size(tmp_path: Path) -> None:
    import json

    from safetensors.torch import save_file

    size = 32 << 20  # 32 MiB of bits, 256 MiB of bool masks; unpacking at once peaked at 9 times the file above them
    bits = torch.randint(0, 256, (size,), dtype=torch.uint8)
    save_file({"w": bits}, str(tmp_path / "p.safetensors"), metadata={"fxsparse.packed": json.dumps({"w": [size * 8]})})
    small = fxsparse.save_masks({"w": torch.ones(100, dtype=torch.bool)}, tmp_path / "s.safetensors", packed=True)
    child = run_child(PEAK_OF_A_LOAD, str(tmp_path / "p.safetensors"), str(small))
    assert child.returncode == 0, child.stderr
    measured = json.loads(child.stdout)
    assert measured["masks"] == size * 8
    assert measured["peak"] - size * 8 < 4 * size  # the masks, plus the file read and its tensor (about 2x)


KILLED_WHILE_SAVING = """
import os, resource, signal, sys
import torch
import fxsparse
path, when = sys.argv[1], sys.argv[2]
if when == "while writing":  # the kernel kills it halfway through the file, as kill -9 would
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores SIGXFSZ; its default action kills
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
else:  # the file written, not yet renamed into place
    os.replace = lambda source, target: os.kill(os.getpid(), signal.SIGKILL)
fxsparse.save_masks({"w": torch.zeros(8 << 20, dtype=torch.bool)}, path)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals and resource limits")
@pytest.mark.parametrize("when", ["while writing", "before the rename"])
def test_a_killed_save_leaves_the_old_file_and_nothing_a_glob_or_load_would_take(when: str, tmp_path: Path) -> None:
    path = fxsparse.save_masks({"w": torch.ones(4, dtype=torch.bool)}, tmp_path / "m.safetensors")
    before = path.read_bytes()
    child = run_child(KILLED_WHILE_SAVING, str(path), when)
    assert child.returncode < 0, (child.returncode, child.stderr)  # killed by a signal, cleaning up nothing
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["m.safetensors"]
    left = [p.name for p in tmp_path.iterdir() if p != path]
    assert len(left) == 1 and left[0].startswith(".m.safetensors.fxsparse-tmp-"), left  # fxsparse's only
    fxsparse.save_masks({"w": torch.zeros(4, dtype=torch.bool)}, path)  # the next save removes it
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert not fxsparse.load_masks(path)["w"].any()
