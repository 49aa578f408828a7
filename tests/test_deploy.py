"""Fine-tune, then deploy: freeze of a model captured in train mode, and to_model back into the model's class.

The reference is the model's own class, built afresh, with the fine-tuned weights loaded and
FakeSparsity(mask) on every name of each masked weight, in eval mode: what torch.ao.pruning
users get from the same weights and masks.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.ao.pruning import FakeSparsity
from torch.nn.utils import parametrize

import fxsparse

from hf_zoo import FAMILIES, Family, build, random_masks
from reference import fake_sparsity_on_every_name

MASK = "_mask"


def logits(family: Family, model: Any, emit: str = "graph") -> torch.Tensor:
    inputs = family.inputs(2, 8)
    with torch.no_grad():
        if emit == "onnx":
            return torch.as_tensor(model(**inputs)[0])
        result = (model.module() if emit == "export" else model)(**inputs)
    return result[family.output] if isinstance(result, dict) else getattr(result, family.output)


def fine_tuned(family: Family, steps: int = 3) -> tuple[nn.Module, torch.fx.GraphModule]:
    """The model (train mode) and its output, captured with torch.export in train mode and trained by AdamW."""
    model = build(family).train()
    out = fxsparse.transform(model, random_masks(model), capture="export", example_kwargs=family.inputs(2, 8))
    optimizer = torch.optim.AdamW(out.parameters(), lr=1e-2)
    for step in range(steps):
        torch.manual_seed(step)  # GPT-2's dropout
        logits_now = out(**family.inputs(2, 8))[family.output]
        logits_now.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, out


def eval_reference(family: Family, out: torch.fx.GraphModule) -> nn.Module:
    """A fresh model of the family with ``out``'s weights, FakeSparsity(mask) on each masked weight, in eval mode."""
    state = out.state_dict()
    masks = {key.removesuffix(MASK): value for key, value in state.items() if key.endswith(MASK)}
    reference = build(family)
    reference.load_state_dict({key: value for key, value in state.items() if not key.endswith(MASK)})
    return fake_sparsity_on_every_name(reference, masks).eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tuned(request: pytest.FixtureRequest) -> tuple[Family, nn.Module, torch.fx.GraphModule, dict[str, torch.Tensor]]:
    family = FAMILIES[request.param]
    model, out = fine_tuned(family)
    return family, model, out, {key: value.clone() for key, value in out.state_dict().items()}


def emits(family_name: str) -> list[str]:
    return ["graph", "export", "trace"] + (["onnx"] if family_name == "gpt2" else [])


@pytest.mark.parametrize(("family_name", "emit"), [(name, emit) for name in ("llama", "gpt2") for emit in emits(name)])
def test_freeze_of_an_export_capture_fine_tuned_in_train_mode_makes_the_eval_model(family_name: str, emit: str) -> None:
    family = FAMILIES[family_name]
    _, out = fine_tuned(family)
    state = copy.deepcopy(out.state_dict())
    out.eval()  # as a user does after training; freeze must not need it either (see the test below)
    frozen = fxsparse.freeze(out, emit=emit, example_kwargs=family.inputs(2, 8))
    expected = logits(family, eval_reference(family, out))
    if emit == "onnx":  # onnxruntime's kernels are not torch's: equal within float32 round-off
        torch.testing.assert_close(logits(family, frozen, emit), expected, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(logits(family, frozen, emit), expected)
    if emit == "graph":
        assert not frozen.training
        assert not any(key.endswith(MASK) for key in frozen.state_dict())
    assert all(torch.equal(value, state[key]) for key, value in out.state_dict().items())  # out untouched


def test_freeze_makes_the_eval_model_whatever_mode_out_is_in(tuned: tuple) -> None:
    family, _, out, _ = tuned
    assert out.training
    frozen = fxsparse.freeze(out, example_kwargs=family.inputs(2, 8))
    assert not frozen.training and out.training
    assert torch.equal(logits(family, frozen), logits(family, eval_reference(family, out)))


def test_freeze_of_an_fx_capture_in_train_mode_makes_the_eval_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    masks = {"0.weight": torch.rand(8, 8) > 0.5}
    out = fxsparse.transform(model, masks)
    frozen = fxsparse.freeze(out)
    x = torch.randn(4, 8)
    assert not frozen.training
    reference = fake_sparsity_on_every_name(model, masks).eval()
    assert torch.equal(frozen(x), reference(x))
    traced = fxsparse.freeze(out, emit="trace", example_inputs=(x,))
    assert torch.equal(traced(x), reference(x))


def test_to_model_fold_gives_the_model_class_with_the_frozen_outputs(tuned: tuple, tmp_path: Path) -> None:
    family, model, out, state = tuned
    before = {key: value.clone() for key, value in model.state_dict().items()}
    back = fxsparse.to_model(out, masks="fold")
    assert type(back) is type(model)
    assert sorted(back.state_dict()) == sorted(model.state_dict())  # the model's own keys, no mask
    back.eval()
    frozen = fxsparse.freeze(out, example_kwargs=family.inputs(2, 8))
    assert torch.equal(logits(family, back), logits(family, frozen))
    assert torch.equal(logits(family, back), logits(family, eval_reference(family, out)))
    if family.tied:
        first, second = family.tied
        assert back.get_parameter(first) is back.get_parameter(second)
    back.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(logits(family, loaded), logits(family, back))
    if family.tied:
        assert loaded.get_parameter(family.tied[0]) is loaded.get_parameter(family.tied[1])
    # Nothing shared, nothing changed: out and the model transformed are as they were.
    theirs = {t.untyped_storage().data_ptr() for t in (*out.parameters(), *out.buffers())}
    assert not theirs & {t.untyped_storage().data_ptr() for t in (*back.parameters(), *back.buffers())}
    assert all(torch.equal(value, state[key]) for key, value in out.state_dict().items())
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_to_model_parametrize_is_fake_sparsity_of_the_fine_tuned_weights(tuned: tuple) -> None:
    family, model, out, state = tuned
    back = fxsparse.to_model(out, masks="parametrize")
    assert type(back) is type(model)
    masks = {key.removesuffix(MASK): value for key, value in state.items() if key.endswith(MASK)}
    for name, mask in masks.items():
        owner, _, attribute = name.rpartition(".")
        module = back.get_submodule(owner)
        (fake,) = module.parametrizations[attribute]
        assert isinstance(fake, FakeSparsity) and torch.equal(fake.mask, mask)
        assert torch.equal(module.parametrizations[attribute].original, state[name])
    if family.tied:  # FakeSparsity on both names, over one parameter
        modules = [back.get_submodule(name.rpartition(".")[0]) for name in family.tied]
        assert all(parametrize.is_parametrized(module, "weight") for module in modules)
        assert modules[0].parametrizations.weight.original is modules[1].parametrizations.weight.original
    assert torch.equal(logits(family, back.eval()), logits(family, eval_reference(family, out)))
    again = fxsparse.transform(back, example_kwargs=family.inputs(2, 8))  # takes the FakeSparsity masks back
    taken = fxsparse.masks.of(again)
    one_name = dict([family.tied[::-1]]) if family.tied else {}  # a tied weight goes by either name
    assert {one_name.get(name, name): mask for name, mask in taken.items()}.keys() == masks.keys()
    assert all(torch.equal(mask, masks[one_name.get(name, name)]) for name, mask in taken.items())


def test_to_model_survives_copy_and_pickle() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    out = fxsparse.transform(model, {"0.weight": torch.eye(4)})
    for kept in (copy.deepcopy(out), pickle.loads(pickle.dumps(out))):
        back = fxsparse.to_model(kept)
        assert type(back) is nn.Sequential
        assert torch.equal(back[0].weight, torch.eye(4) * model[0].weight)


def test_an_output_of_a_class_pickle_cannot_find_still_pickles() -> None:
    class Local(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    out = fxsparse.transform(Local(), {"fc.weight": torch.eye(4)})
    assert type(fxsparse.to_model(out)) is Local  # in this process, the class is at hand
    loaded = pickle.loads(pickle.dumps(out))
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), out(x))
    with pytest.raises(fxsparse.EmitError, match="needs the model's own class"):
        fxsparse.to_model(loaded)


def test_to_model_leaves_out_what_export_added() -> None:
    class WithConstant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + torch.tensor([1.0, 2.0, 3.0, 4.0])  # a constant export lifts

    model = WithConstant()
    x = torch.randn(2, 4)
    out = fxsparse.transform(model, {"fc.weight": torch.eye(4)}, capture="export", example_inputs=(x,))
    back = fxsparse.to_model(out)
    assert set(vars(back)) == set(vars(model))
    assert [name for name, _ in back.named_modules()] == [name for name, _ in model.named_modules()]
    assert sorted(back.state_dict()) == sorted(model.state_dict())
    assert torch.equal(back(x), out(x))
