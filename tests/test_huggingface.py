"""Hugging Face transformers models (tiny configs, random weights) through transform, against FakeSparsity.

Every linear-like weight is masked: nn.Linear, GPT-2's Conv1D (read through addmm) and
the output heads, which GPT-2 and T5 tie to their input embeddings. None of these
models is traceable by torch.fx, so capture="auto" takes torch.export.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import fxsparse

from hf_zoo import FAMILIES, Family, build, dynamic_shapes, linear_like, random_masks
from reference import fake_sparsity_on_every_name

SHAPES = [(2, 8), (3, 5)]  # the example's shape, and another one through the dynamic dimensions


def output(family: Family, model: object, batch: int, sequence: int) -> torch.Tensor:
    with torch.no_grad():
        result = model(**family.inputs(batch, sequence))  # type: ignore[operator]
    return result[family.output] if isinstance(result, dict) else getattr(result, family.output)


@pytest.fixture(scope="module", params=list(FAMILIES))
def pruned(request: pytest.FixtureRequest) -> tuple[Family, nn.Module, dict[str, torch.Tensor], nn.Module]:
    family = FAMILIES[request.param]
    model = build(family)
    masks = random_masks(model)
    example = family.inputs(*SHAPES[0])
    out = fxsparse.transform(model, masks, example_kwargs=example, dynamic_shapes=dynamic_shapes(example))
    return family, model, masks, out


def test_every_linear_like_weight_is_masked(pruned: tuple) -> None:
    family, model, masks, out = pruned
    assert out.meta["fxsparse"] == {"capture": "export"}  # torch.fx cannot trace any of them
    products = [n for n in out.graph.nodes if n.meta.get("fxsparse", {}).get("role") == "masked"]
    assert sorted(n.meta["fxsparse"]["param"] for n in products) == sorted(masks)
    if family.name == "gpt2":
        from transformers.pytorch_utils import Conv1D

        assert sum(isinstance(m, Conv1D) for m in model.modules()) == len(masks) - 1  # and the tied head
        readers = {str(u.target) for n in products for u in n.users}
        assert "aten.addmm.default" in readers


@pytest.mark.parametrize(("batch", "sequence"), SHAPES)
def test_output_equals_fake_sparsity(pruned: tuple, batch: int, sequence: int) -> None:
    family, model, masks, out = pruned
    reference = fake_sparsity_on_every_name(model, masks)
    assert torch.equal(output(family, out, batch, sequence), output(family, reference, batch, sequence))


def test_input_model_untouched(pruned: tuple) -> None:
    family, model, _, _ = pruned
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert torch.equal(output(family, model, 2, 8), output(family, build(family), 2, 8))


def test_state_dict_round_trip(pruned: tuple) -> None:
    family, model, masks, out = pruned
    state = out.state_dict()
    assert set(state) == set(model.state_dict()) | {f"{name}_mask" for name in masks}
    for name, mask in masks.items():
        assert torch.equal(state[f"{name}_mask"], mask)
    # Into a transform of a differently initialized model: it becomes the same model.
    other = build(family, seed=1)
    example = family.inputs(*SHAPES[0])
    fresh = fxsparse.transform(other, random_masks(other, seed=1), example_kwargs=example)
    fresh.load_state_dict(state)
    assert torch.equal(output(family, fresh, 2, 8), output(family, out, 2, 8))
    # And the weights back into a plain model, the masks left out.
    plain = build(family, seed=1)
    plain.load_state_dict({k: v for k, v in state.items() if not k.endswith("_mask")})
    assert torch.equal(output(family, plain, 2, 8), output(family, model, 2, 8))


def test_tie_is_kept(pruned: tuple) -> None:
    family, model, masks, out = pruned
    if family.tied is None:  # nor is a tie made up: every masked weight stays its own parameter
        assert len({id(out.get_parameter(name)) for name in masks}) == len(masks)
        return
    head, embedding = family.tied
    assert model.get_parameter(head) is model.get_parameter(embedding)
    assert out.get_parameter(head) is out.get_parameter(embedding)
    assert [name for name in masks if name in family.tied] == [head]  # one mask for the one parameter
    (product,) = [n for n in out.graph.nodes if n.meta.get("fxsparse", {}).get("param") == head
                  and n.meta["fxsparse"]["role"] == "masked"]  # fmt: skip
    assert {str(u.target) for u in product.users} == {"aten.embedding.default", "aten.linear.default"}


def test_emit_export_saved_and_loaded(pruned: tuple) -> None:
    family, model, masks, _ = pruned
    example = family.inputs(*SHAPES[0])
    program = fxsparse.transform(
        model, masks, emit="export", example_kwargs=example, dynamic_shapes=dynamic_shapes(example)
    )
    assert {f"{name}_mask" for name in masks} <= set(program.state_dict)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    reference = fake_sparsity_on_every_name(model, masks)
    for batch, sequence in SHAPES:
        assert torch.equal(output(family, loaded, batch, sequence), output(family, reference, batch, sequence))


def test_torch_save_of_the_graph(pruned: tuple) -> None:
    family, _, _, out = pruned
    buffer = io.BytesIO()
    torch.save(out, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded(**family.inputs(2, 8))) is type(out(**family.inputs(2, 8)))  # a ModelOutput, as before
    assert torch.equal(output(family, loaded, 3, 5), output(family, out, 3, 5))


def test_other_emits_on_gpt2() -> None:
    family = FAMILIES["gpt2"]
    model = build(family)
    masks = random_masks(model)
    example = family.inputs(*SHAPES[0])
    reference = fake_sparsity_on_every_name(model, masks)
    traced = fxsparse.transform(model, masks, emit="trace", example_kwargs=example)
    assert torch.equal(output(family, traced, 2, 8), output(family, reference, 2, 8))
    parametrized = fxsparse.transform(model, masks, emit="parametrize")
    assert torch.equal(output(family, parametrized, 3, 5), output(family, reference, 3, 5))
    with pytest.raises(fxsparse.EmitError, match="emit='script' is not available"):
        fxsparse.transform(model, masks, emit="script", example_kwargs=example)


def test_masks_by_module_name_and_tied_alias() -> None:
    family = FAMILIES["gpt2"]
    model = build(family)
    masks = random_masks(model)
    by_module = {name.removesuffix(".weight"): mask for name, mask in masks.items()}
    by_module["transformer.wte.weight"] = by_module.pop("lm_head")  # the other name of the tied head
    out = fxsparse.transform(model, by_module, example_kwargs=family.inputs(2, 8))
    reference = fake_sparsity_on_every_name(model, masks)
    assert torch.equal(output(family, out, 2, 8), output(family, reference, 2, 8))
    assert "transformer.wte.weight_mask" in out.state_dict()


def test_linear_like_finds_every_projection() -> None:
    counts = {name: len(linear_like(build(family))) for name, family in FAMILIES.items()}
    # BERT: 2 layers x (q, k, v, o, up, down) + pooler; GPT-2: 2 x (c_attn, c_proj, c_fc, c_proj) + head;
    # T5: encoder 2 x (q, k, v, o, wi, wo), decoder 2 x (self q, k, v, o, cross q, k, v, o, wi, wo) + head;
    # Llama: 2 x (q, k, v, o, gate, up, down) + head.
    assert counts == {"bert": 13, "gpt2": 9, "t5": 33, "llama": 15}


def test_a_decoder_captured_with_use_cache_on_is_told_to_turn_it_off() -> None:
    family = FAMILIES["llama"]
    model = build(family)
    model.config.use_cache = True
    with pytest.raises(fxsparse.TraceError, match=r"(?s)DynamicCache.*pass use_cache=False in example_kwargs"):
        fxsparse.transform(model, {}, capture="export", example_kwargs=family.inputs(2, 8))
