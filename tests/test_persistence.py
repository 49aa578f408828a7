"""Masks survive every save and copy path; state_dicts load both ways."""

from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import fxsparse

from reference import eager, fake_sparsity
from zoo import ZOO, build, inputs, make_masks

CASES = ["seed_model", "tied_embedding_head", "functional_linear", "conv_net"]


def transformed(name: str, emit: str = "graph", kind: str = "random") -> tuple[nn.Module, object, dict, tuple]:
    case = ZOO[name]
    model = build(case)
    masks = make_masks(model, case, kind)
    args = inputs(case)
    return model, fxsparse.transform(model, masks, emit=emit, example_inputs=args), masks, args


def assert_masks_kept(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], model: nn.Module) -> None:
    names = dict(model.named_parameters(remove_duplicate=False))
    for key, mask in masks.items():
        name = key if key in names else f"{key}.weight"
        assert torch.equal(state[f"{name}_mask"], mask), name


@pytest.mark.parametrize("name", CASES)
def test_torch_save_and_load(name: str, tmp_path: Path) -> None:
    model, out, masks, args = transformed(name)
    torch.save(out, tmp_path / "out.pt")
    loaded = torch.load(tmp_path / "out.pt", weights_only=False)
    assert torch.equal(loaded(*args), eager(model, masks, *args))
    assert_masks_kept(loaded.state_dict(), masks, model)


@pytest.mark.parametrize("name", CASES)
def test_pickle_and_deepcopy(name: str) -> None:
    model, out, masks, args = transformed(name)
    for clone in (pickle.loads(pickle.dumps(out)), copy.deepcopy(out)):
        assert torch.equal(clone(*args), eager(model, masks, *args))
        assert_masks_kept(clone.state_dict(), masks, model)
        assert {t.data_ptr() for t in clone.state_dict().values()}.isdisjoint(
            t.data_ptr() for t in out.state_dict().values()
        )
    if ZOO[name].tied:
        clone = copy.deepcopy(out)
        assert clone.embed.weight is clone.lm_head.weight


@pytest.mark.parametrize("emit", ["script", "trace"])
@pytest.mark.parametrize("name", CASES)
def test_jit_save_and_load(name: str, emit: str) -> None:
    model, out, masks, args = transformed(name, emit)
    buffer = io.BytesIO()
    torch.jit.save(out, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    assert torch.equal(loaded(*args), out(*args))
    assert_masks_kept(loaded.state_dict(), masks, model)


@pytest.mark.parametrize("name", CASES)
def test_export_save_and_load(name: str) -> None:
    model, program, masks, args = transformed(name, "export")
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    assert torch.equal(loaded.module()(*args), eager(model, masks, *args))
    assert_masks_kept(loaded.state_dict, masks, model)
    buffers = set(loaded.graph_signature.buffers)
    names = dict(model.named_parameters(remove_duplicate=False))
    assert {(k if k in names else f"{k}.weight") + "_mask" for k in masks} <= buffers


@pytest.mark.parametrize("name", CASES)
def test_state_dict_loads_strictly_into_another_transform(name: str) -> None:
    model, out, _masks, args = transformed(name)
    other = fxsparse.transform(model, make_masks(model, ZOO[name], "ones"))
    assert not torch.equal(other(*args), out(*args))
    other.load_state_dict(out.state_dict(), strict=True)
    assert torch.equal(other(*args), out(*args))


@pytest.mark.parametrize("name", CASES)
def test_plain_state_dict_loads_every_weight(name: str) -> None:
    _model, out, masks, args = transformed(name)
    trained = build(ZOO[name], seed=7)  # same architecture, other weights
    result = out.load_state_dict(trained.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(k for k in out.state_dict() if k.endswith("_mask"))
    for key, value in trained.state_dict().items():
        assert torch.equal(out.state_dict()[key], value)
    assert torch.equal(out(*args), eager(trained, masks, *args))


class TestFakeSparsityGaps:
    """What FakeSparsity cannot do and fxsparse does, on the same masks."""

    def test_scripted_parametrized_model_fails_but_fxsparse_runs(self) -> None:
        model, scripted, masks, args = transformed("seed_model", "script")
        reference = fake_sparsity(model, masks)
        with pytest.raises(Exception, match=r"(?i)parametriz"):
            torch.jit.script(reference)(*args)
        assert torch.equal(scripted(*args), reference(*args))

    def test_state_dict_keeps_masks_and_names(self) -> None:
        model, out, masks, _ = transformed("seed_model")
        reference = fake_sparsity(model, masks)
        assert not any(k.endswith("mask") for k in reference.state_dict())
        assert set(model.state_dict()) <= set(out.state_dict())
        assert_masks_kept(out.state_dict(), masks, model)

    def test_torch_save_of_the_model(self, tmp_path: Path) -> None:
        model, out, masks, args = transformed("seed_model")
        with pytest.raises(RuntimeError):
            torch.save(fake_sparsity(model, masks), tmp_path / "reference.pt")
        torch.save(out, tmp_path / "out.pt")
        assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=False)(*args), out(*args))

    def test_mask_is_visible_in_a_traced_graph(self) -> None:
        model, out, masks, _ = transformed("seed_model")
        assert not any(n.target is torch.mul for n in torch.fx.symbolic_trace(fake_sparsity(model, masks)).graph.nodes)
        assert sum(n.target is torch.mul for n in out.graph.nodes) == len(masks)


def _add_one(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
    return output + 1


class RootState(nn.Module):
    """State on the root module: a plain tensor, a constant made in forward, a non-persistent
    buffer, an unused submodule, a plain attribute and a forward hook."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.scale = torch.tensor(2.0)
        self.register_buffer("offset", torch.arange(4.0), persistent=False)
        self.unused = nn.Linear(2, 2)
        self.num_classes = 4
        self.register_forward_hook(_add_one)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale + torch.ones(4) + self.offset


def _round_trips(out: nn.Module, tmp_path: Path) -> list[nn.Module]:
    torch.save(out, tmp_path / "out.pt")
    return [copy.deepcopy(out), pickle.loads(pickle.dumps(out)), torch.load(tmp_path / "out.pt", weights_only=False)]


def test_root_state_survives_transform_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = RootState()
    masks = {"linear": torch.rand(4, 4) > 0.5}
    x = torch.randn(2, 4)
    out = fxsparse.transform(model, masks)
    assert torch.equal(out(x), fake_sparsity(model, masks)(x))
    assert out.num_classes == 4
    assert set(out.state_dict()) == set(model.state_dict()) | {"linear.weight_mask"}
    for clone in _round_trips(out, tmp_path):
        assert torch.equal(clone(x), out(x))
        assert list(clone.state_dict()) == list(out.state_dict())
        clone.load_state_dict(out.state_dict(), strict=True)
        assert clone.num_classes == 4


@pytest.mark.parametrize("name", ["seed_model", "tied_embedding_head", "subclass_and_hook"])
def test_code_and_node_tags_survive_round_trips(name: str, tmp_path: Path) -> None:
    _model, out, _masks, _args = transformed(name)

    def tags(module: nn.Module) -> list[tuple[str, dict]]:
        return [(n.name, n.meta["fxsparse"]) for n in module.graph.nodes if "fxsparse" in n.meta]  # type: ignore[union-attr]

    assert {tag["role"] for _, tag in tags(out)} >= {"weight", "mask", "masked"}
    for clone in _round_trips(out, tmp_path):
        assert clone.code == out.code  # type: ignore[union-attr]
        assert tags(clone) == tags(out)


def test_loads_what_fxsparse_0_1_0_pickled() -> None:
    """0.1.0 pickled a GraphModule's code (traced again on loading); such files still load, tags restored."""
    loaded = torch.load(Path(__file__).parent / "data" / "fxsparse-0.1.0-seed_model.pt", weights_only=False)
    case = ZOO["seed_model"]
    masks = {name: loaded.get_buffer(f"{name}_mask") for name in ("linear.weight", "seq.0.weight", "seq.1.weight")}
    x = inputs(case)[0]
    assert torch.equal(loaded(x), eager(build(case), masks, x))
    roles = [n.meta.get("fxsparse", {}).get("role") for n in loaded.graph.nodes]
    assert roles.count("masked") == 3


def test_transform_of_a_transform_keeps_the_first_masks_tagged() -> None:
    case = ZOO["seed_model"]
    model = build(case)
    first = fxsparse.transform(model, {"linear": torch.rand(16, 16) > 0.5})
    second = fxsparse.transform(first, {"seq.1": torch.rand(16, 16) > 0.5})
    masked = {
        n.meta["fxsparse"]["param"] for n in second.graph.nodes if n.meta.get("fxsparse", {}).get("role") == "masked"
    }
    assert masked == {"linear.weight", "seq.1.weight"}
    x = inputs(case)[0]
    state = second.state_dict()
    expected = eager(
        model, {"linear.weight": state["linear.weight_mask"], "seq.1.weight": state["seq.1.weight_mask"]}, x
    )
    assert torch.equal(second(x), expected)
