"""Structured pruning: groups found on the captured graph, channel masks, and shrinking.

Every shrunk model is compared with the FakeSparsity-masked model (tests/reference.py) on the
same inputs; the groups are compared with what the layers' shapes say by hand.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.ao.pruning import FakeSparsity
from torch.nn import functional as F

import fxsparse

import hf_zoo
from reference import fake_sparsity_on_every_name
from zoo import TiedEmbeddingHead


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 3))


class ResidualMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(6, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.fc3 = nn.Linear(16, 32)
        self.fc4 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        h = h + self.fc4(torch.relu(self.fc3(h)))
        return self.head(h)  # type: ignore[no-any-return]


class GroupedCNN(nn.Module):
    """Conv + BatchNorm, a grouped conv (4 groups), a depthwise conv, pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(16)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.conv3 = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        h = torch.relu(self.conv3(torch.relu(self.depthwise(h))))
        return self.head(h.mean(dim=(2, 3)))  # type: ignore[no-any-return]


class Flipped(nn.Module):
    """An op fxsparse does not know (flip) between two layers: pruning index i of fc1 is not column i of fc2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.flip(self.fc1(x), [-1]))  # type: ignore[no-any-return]


class HardCodedHeads(nn.Module):
    """A forward that writes its head count into its code (view(-1, 2, 4)): shrinking cannot follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = torch.relu(self.fc1(x).view(-1, 2, 4))
        return self.fc2(heads.reshape(-1, 8))  # type: ignore[no-any-return]


def by_name(groups: fxsparse.Groups) -> dict[str, fxsparse.Group]:
    return {group.name: group for group in groups}


def members(group: fxsparse.Group) -> set[tuple[str, int]]:
    return {(member.tensor, member.dim) for member in group.members}


def reference_output(model: nn.Module, masks: dict[str, torch.Tensor], *args: torch.Tensor, **kwargs: torch.Tensor):  # type: ignore[no-untyped-def]
    reference = fake_sparsity_on_every_name(model, masks).eval()
    with torch.no_grad():
        return reference(*args, **kwargs)


def test_groups_of_an_mlp_couple_rows_bias_and_the_next_columns() -> None:
    model = mlp()
    found = by_name(fxsparse.groups(model, example_inputs=(torch.randn(2, 6),)))
    assert members(found["0.weight[0]"]) == {("0.weight", 0), ("0.bias", 0), ("2.weight", 1)}
    assert members(found["2.weight[0]"]) == {("2.weight", 0), ("2.bias", 0), ("4.weight", 1)}
    assert found["0.weight[0]"].units == 16 and found["0.weight[0]"].prunable and found["0.weight[0]"].exact
    assert all(len(unit) == 1 for member in found["0.weight[0]"].members for unit in member.indices)
    assert found["0.weight[1]"].blocked == "a model input"
    assert found["4.weight[0]"].blocked == "a model output"


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_shrunk_mlp_equals_the_fake_sparsity_masked_model(sparsity: float) -> None:
    model, x = mlp(), torch.randn(5, 6)
    masks = fxsparse.masks.channels(model, sparsity, example_inputs=(x,))
    out = fxsparse.transform(model, masks)
    small = fxsparse.shrink(out, example_inputs=(x,))
    kept = 16 - int(sparsity * 16)
    assert small[0].weight.shape == (kept, 6) and small[2].weight.shape == (12 - int(sparsity * 12), kept)
    assert small[0].out_features == kept
    expected = reference_output(model, masks, x)
    assert torch.equal(out(x), expected)  # masks: exactly FakeSparsity's
    torch.testing.assert_close(small(x), expected, rtol=1e-5, atol=1e-6)  # fewer zero terms: round-off only


def test_channels_masks_whole_units_in_every_coupled_parameter() -> None:
    model = mlp()
    masks = fxsparse.masks.channels(model, 0.5, example_inputs=(torch.randn(2, 6),))
    rows = masks["0.weight"].all(dim=1)
    assert torch.equal(masks["0.weight"], rows[:, None].expand(16, 6))
    assert torch.equal(masks["0.bias"], rows)
    assert torch.equal(masks["2.weight"].any(dim=0), rows)  # its own rows are another group's
    # L2 score: the kept rows are the largest coupled norms (row of 0.weight, its bias, column of 2.weight)
    norms = model[0].weight.pow(2).sum(1) + model[0].bias.pow(2) + model[2].weight.pow(2).sum(0)
    assert set(norms.topk(8).indices.tolist()) == set(rows.nonzero().flatten().tolist())


def test_channels_round_to_keeps_a_multiple_and_exclude_leaves_a_group() -> None:
    model = mlp()
    masks = fxsparse.masks.channels(model, 0.4, example_inputs=(torch.randn(2, 6),), round_to=8, exclude="4.*")
    assert masks["0.weight"].all(dim=1).sum() == 8  # keeps 16 - floor(6.4) = 10, to the nearest multiple: 8
    assert "4.weight" not in masks and masks["2.weight"].any(dim=1).all()  # layer 2's outputs reach 4.weight


def test_residual_mlp_couples_the_stream_and_shrinks_to_the_masked_output() -> None:
    model, x = ResidualMLP(), torch.randn(4, 6)
    found = by_name(fxsparse.groups(model, example_inputs=(x,)))
    stream = {("proj_in.weight", 0), ("proj_in.bias", 0), ("fc1.weight", 1), ("fc2.weight", 0), ("fc2.bias", 0)}
    stream |= {("fc3.weight", 1), ("fc4.weight", 0), ("fc4.bias", 0), ("head.weight", 1)}
    assert members(found["proj_in.weight[0]"]) == stream
    assert found["proj_in.weight[0]"].prunable and found["proj_in.weight[0]"].exact
    masks = fxsparse.masks.channels(model, 0.5, example_inputs=(x,))
    small = fxsparse.shrink(fxsparse.transform(model, masks), example_inputs=(x,))
    assert small.proj_in.out_features == 8 and small.fc1.in_features == 8 and small.fc1.out_features == 16
    torch.testing.assert_close(small(x), reference_output(model, masks, x), rtol=1e-5, atol=1e-6)


def test_cnn_with_batchnorm_and_grouped_convolutions_shrinks_to_the_masked_output() -> None:
    torch.manual_seed(0)
    model, x = GroupedCNN().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):  # running statistics that are not the identity
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    found = by_name(fxsparse.groups(model, example_inputs=(x,)))
    # conv2 has 4 groups of 4 channels: a unit is one whole group, its 4 input channels (conv1's outputs)
    # with its 4 outputs; the depthwise conv keeps each channel to itself, so conv3's columns follow.
    group = found["conv1.weight[0]"]
    assert group.units == 4 and {len(u) for m in group.members for u in m.indices} == {4}
    assert members(group) == {
        ("conv1.weight", 0), ("conv1.bias", 0), ("bn1.weight", 0), ("bn1.bias", 0), ("bn1.running_mean", 0),
        ("bn1.running_var", 0), ("conv2.weight", 0), ("conv2.bias", 0), ("bn2.weight", 0), ("bn2.bias", 0),
        ("bn2.running_mean", 0), ("bn2.running_var", 0), ("depthwise.weight", 0), ("depthwise.bias", 0),
        ("conv3.weight", 1),
    }  # fmt: skip
    assert group.prunable and group.exact
    masks = fxsparse.masks.channels(model, 0.5, example_inputs=(x,))
    small = fxsparse.shrink(fxsparse.transform(model, masks), example_inputs=(x,))
    assert small.conv2.groups == 2 and small.depthwise.groups == 8 and small.bn2.num_features == 8
    torch.testing.assert_close(small(x), reference_output(model, masks, x), rtol=1e-5, atol=1e-5)


def test_an_unknown_op_blocks_its_group_with_the_reason() -> None:
    found = by_name(fxsparse.groups(Flipped(), example_inputs=(torch.randn(2, 4),)))
    group = found["fc1.weight[0]"]
    assert not group.prunable
    assert "flip" in str(group.blocked) and "does not know" in str(group.blocked)
    assert fxsparse.masks.channels(Flipped(), 0.5, example_inputs=(torch.randn(2, 4),)) == {}


def test_tied_embedding_and_head_make_one_group_through_the_tie() -> None:
    torch.manual_seed(0)
    model, ids = TiedEmbeddingHead(), torch.randint(0, 20, (2, 5))
    found = by_name(fxsparse.groups(model, example_inputs=(ids,)))
    # embed.weight's columns are both the embedding's output (hidden's input) and the head's input
    # (hidden's output): one tied tensor, so hidden's rows and columns go together.
    group = found["hidden.weight[0]"]
    assert members(group) == {("hidden.weight", 0), ("hidden.weight", 1), ("hidden.bias", 0), ("embed.weight", 1)}
    assert group.prunable and group.units == 8
    masks = fxsparse.masks.channels(model, 0.5, example_inputs=(ids,))
    assert set(masks) == {"embed.weight", "hidden.weight", "hidden.bias"}  # one key for the tied pair
    small = fxsparse.shrink(fxsparse.transform(model, masks), example_inputs=(ids,))
    assert small.lm_head.weight is small.embed.weight and small.embed.weight.shape == (20, 4)
    torch.testing.assert_close(small(ids), reference_output(model, masks, ids), rtol=1e-5, atol=1e-6)


def test_shrink_refuses_a_forward_that_writes_a_width_into_its_code() -> None:
    model, x = HardCodedHeads(), torch.randn(3, 4)
    masks = fxsparse.masks.channels(model, 0.5, example_inputs=(x,))
    assert masks  # fc1's rows go by blocks of 4 (view(-1, 2, 4) splits them)
    with pytest.raises(fxsparse.MaskError, match="no longer runs with its smaller weights"):
        fxsparse.shrink(fxsparse.transform(model, masks), example_inputs=(x,))


def test_groups_and_channels_leave_the_model_as_it_was() -> None:
    model, x = mlp(), torch.randn(2, 6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = fxsparse.transform(model, fxsparse.masks.channels(model, 0.5, example_inputs=(x,)))
    before = {k: v.clone() for k, v in out.state_dict().items()}
    fxsparse.shrink(out, example_inputs=(x,))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert all(torch.equal(out.state_dict()[k], v) for k, v in before.items())  # nor the output it shrinks
    assert model[0].weight.shape == (16, 6)


# ------------------------------------------------------------------------------------------------
# transformers


def test_llama_gqa_group_removes_a_key_value_head_with_its_query_heads() -> None:
    family = hf_zoo.FAMILIES["llama"]
    model = hf_zoo.build(family)
    found = by_name(fxsparse.groups(model, example_kwargs=family.inputs(1, 5)))
    heads = found["model.layers.0.self_attn.q_proj.weight[0]"]
    assert heads.units == 2  # num_key_value_heads
    q = next(m for m in heads.members if m.tensor.endswith("q_proj.weight"))
    k = next(m for m in heads.members if m.tensor.endswith("k_proj.weight"))
    assert q.indices[1] == tuple(range(16, 32))  # two query heads of 8 per key/value head
    assert k.indices[1] == tuple(range(8, 16))
    hidden = next(g for g in found.values() if ("model.norm.weight", 0) in members(g))
    assert hidden.prunable and not hidden.exact and "mean" in str(hidden.inexact)
    assert found["lm_head.weight[0]"].blocked == "a model output"


def test_channels_leaves_out_inexact_groups_unless_asked() -> None:
    family = hf_zoo.FAMILIES["llama"]
    model, inputs = hf_zoo.build(family), family.inputs(1, 5)
    exact = fxsparse.masks.channels(model, 0.5, example_kwargs=inputs)
    assert "model.norm.weight" not in exact and "model.embed_tokens.weight" not in exact
    loose = fxsparse.masks.channels(model, 0.5, example_kwargs=inputs, exact=False)
    assert loose["model.norm.weight"].sum() == 16


def test_shrunk_llama_equals_the_masked_model_and_reloads_with_from_pretrained(tmp_path: Path) -> None:
    family = hf_zoo.FAMILIES["llama"]
    model, inputs = hf_zoo.build(family), family.inputs(2, 6)
    masks = fxsparse.masks.channels(model, 0.5, example_kwargs=inputs)
    out = fxsparse.transform(model, masks, example_kwargs=inputs)
    small = fxsparse.shrink(out)
    assert type(small) is type(model)
    assert (small.config.intermediate_size, small.config.num_attention_heads) == (32, 2)
    assert (small.config.num_key_value_heads, small.config.hidden_size, small.config.head_dim) == (1, 32, 8)
    expected = reference_output(model, masks, **inputs).logits
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    small.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, small(**inputs).logits)


@pytest.mark.parametrize(("family_name", "include"), [("bert", "*intermediate*"), ("gpt2", "*mlp*")])
def test_shrunk_bert_and_gpt2_equal_the_masked_model(family_name: str, include: str | None) -> None:
    family = hf_zoo.FAMILIES[family_name]
    model, inputs = hf_zoo.build(family), family.inputs(2, 6)
    masks = fxsparse.masks.channels(model, 0.5, example_kwargs=inputs, include=include)
    small = fxsparse.shrink(fxsparse.transform(model, masks, example_kwargs=inputs))
    assert type(small) is type(model)
    expected = getattr(reference_output(model, masks, **inputs), family.output)
    with torch.no_grad():
        torch.testing.assert_close(getattr(small(**inputs), family.output), expected, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_emit_forms_work_on_a_shrunk_model() -> None:
    model, x = mlp(), torch.randn(3, 6)
    small = fxsparse.shrink(
        fxsparse.transform(model, fxsparse.masks.channels(model, 0.5, example_inputs=(x,))), example_inputs=(x,)
    )
    masks = {"0.weight": torch.ones_like(small[0].weight, dtype=torch.bool)}
    for emit in ("script", "trace", "export"):
        emitted = fxsparse.transform(small, masks, emit=emit, example_inputs=(x,))
        result = emitted.module()(x) if emit == "export" else emitted(x)
        torch.testing.assert_close(result, small(x))


def test_shrink_refuses_heads_a_config_cannot_express() -> None:
    family = hf_zoo.FAMILIES["gpt2"]  # GPT-2 derives its head width from n_embd // n_head
    model, inputs = hf_zoo.build(family), family.inputs(1, 4)
    masks = fxsparse.masks.channels(model, 0.5, example_kwargs=inputs, include="*attn*")
    with pytest.raises(fxsparse.MaskError, match="GPT2LMHeadModel built from the updated config"):
        fxsparse.shrink(fxsparse.transform(model, masks, example_kwargs=inputs))


def test_shrink_warns_when_unstructured_masks_remove_nothing() -> None:
    model, x = mlp(), torch.randn(4, 6)
    out = fxsparse.transform(model, fxsparse.masks.magnitude(model, 0.5))
    with pytest.warns(UserWarning, match="shrink removed nothing.*fxsparse.masks.channels makes such masks"):
        small = fxsparse.shrink(out, example_inputs=(x,))
    assert [p.shape for p in small.parameters()] == [p.shape for p in model.parameters()]
    assert torch.equal(small(x), out(x))  # still the masked model, at full size


def test_shrink_of_a_frozen_output_says_to_shrink_before_freezing() -> None:
    model, x = mlp(), torch.randn(4, 6)
    out = fxsparse.transform(model, fxsparse.masks.channels(model, 0.5, example_inputs=(x,)))
    with pytest.raises(fxsparse.MaskError, match=r"applies no mask .*shrink before freezing"):
        fxsparse.shrink(fxsparse.freeze(out), example_inputs=(x,))


def test_shrink_warns_that_exact_false_removes_units_of_inexact_groups() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    x = torch.randn(4, 6)
    masks = fxsparse.masks.channels(model, 0.5, example_inputs=(x,), exact=False)
    with pytest.warns(UserWarning, match="the masks zero 4 unit.*which exact=False removes"):
        fxsparse.shrink(fxsparse.transform(model, masks), example_inputs=(x,))


# ------------------------------------------------------------------------------------------------
# command line


def test_check_groups_lists_the_groups_and_shrink_writes_a_smaller_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fxsparse._cli import main

    assert main(["check", "test_structured:mlp", "--groups", "--input-shape", "2x6"]) == 0
    listed = capsys.readouterr().out
    assert "0.weight[0]: 16 units (channel), prunable" in listed and "blocked: a model input" in listed
    assert (
        main(["shrink", "test_structured:mlp", "--input-shape", "2x6", "--sparsity", "0.5", "--out", str(tmp_path)])
        == 0
    )
    state = torch.load(tmp_path / "model.pt")
    assert state["0.weight"].shape == (8, 6) and state["2.weight"].shape == (6, 8)
    assert "checked against the masked model" in capsys.readouterr().out


def test_shrink_command_needs_example_inputs(capsys: pytest.CaptureFixture[str]) -> None:
    from fxsparse._cli import main

    with pytest.raises(SystemExit) as exit_status:
        main(["shrink", "test_structured:mlp", "--out", "unused"])
    assert exit_status.value.code == 2
    assert "pass --input-shape or --token-ids" in capsys.readouterr().err


class PaddedTokens(nn.Module):
    """Token ids through an embedding whose token 0 is padding (a zero vector), then an MLP without biases."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8, padding_idx=0)
        self.up, self.down = nn.Linear(8, 16, bias=False), nn.Linear(16, 4, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.embed(input_ids))))  # type: ignore[no-any-return]


def padded_tokens() -> nn.Module:
    torch.manual_seed(0)
    return PaddedTokens().eval()


def test_shrink_command_token_ids_are_not_padding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --token-ids of zeros fed padding only: every output was zero and shrink refused its own check
    # with advice (other inputs) that the command line cannot take.
    from fxsparse._cli import main

    assert main(["shrink", "test_structured:padded_tokens", "--token-ids", "1x4", "--out", str(tmp_path)]) == 0
    state = torch.load(tmp_path / "model.pt")
    assert state["up.weight"].shape == (8, 4) and state["down.weight"].shape == (4, 8)
    assert "checked against the masked model" in capsys.readouterr().out


class GroupedQueryAttention(nn.Module):
    """4 query heads sharing 2 key/value heads through scaled_dot_product_attention(enable_gqa=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)
        self.o = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, -1, 4).transpose(1, 2)
        k = self.k(x).view(b, s, -1, 4).transpose(1, 2)
        v = self.v(x).view(b, s, -1, 4).transpose(1, 2)
        attended = nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(attended.transpose(1, 2).reshape(b, s, -1))  # type: ignore[no-any-return]


def test_enable_gqa_attention_removes_a_key_value_head_with_its_query_heads() -> None:
    torch.manual_seed(0)
    model, x = GroupedQueryAttention(), torch.randn(2, 5, 16)
    heads = by_name(fxsparse.groups(model, example_inputs=(x,)))["q.weight[0]"]
    assert heads.units == 2 and heads.prunable and heads.exact
    indices = {member.tensor: member.indices for member in heads.members}
    assert indices["q.weight"] == (tuple(range(8)), tuple(range(8, 16)))  # query heads 0-1, then 2-3
    assert indices["k.weight"] == (tuple(range(4)), tuple(range(4, 8)))
    assert indices["o.weight"] == indices["q.weight"]
    masks = fxsparse.masks.channels(model, 0.5, example_inputs=(x,), include="q.*")
    small = fxsparse.shrink(fxsparse.transform(model, masks), example_inputs=(x,))
    assert small.q.out_features == 8 and small.k.out_features == 4 and small.o.in_features == 8
    torch.testing.assert_close(small(x), reference_output(model, masks, x), rtol=1e-5, atol=1e-6)


def test_exact_false_removes_the_hidden_size_and_the_config_follows(tmp_path: Path) -> None:
    family = hf_zoo.FAMILIES["llama"]
    model, inputs = hf_zoo.build(family), family.inputs(2, 6)
    masks = fxsparse.masks.channels(model, 0.25, example_kwargs=inputs, exact=False)
    out = fxsparse.transform(model, masks, example_kwargs=inputs)
    assert fxsparse.shrink(out).config.hidden_size == 32  # exact: the RMSNorm'd hidden size stays, masked
    small = fxsparse.shrink(out, exact=False)
    assert (small.config.hidden_size, small.config.head_dim, small.config.intermediate_size) == (24, 8, 48)
    small.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, small(**inputs).logits)


def test_activation_score_removes_a_large_unit_that_never_fires() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-1.0, -1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[9.0, 1.0, 1.2, 1.1]]))  # unit 0: the largest weights, input always 0
    x = torch.rand(16, 2)  # positive: relu(-x0 - x1) = 0
    l2 = fxsparse.masks.channels(model, 0.25, example_inputs=(x,))
    assert l2["0.weight"].all(dim=1).tolist() == [True, False, True, True]  # L2: unit 1 has the least weight
    calibrated = fxsparse.masks.channels(model, 0.25, example_inputs=(x,), score="activation")
    assert calibrated["0.weight"].all(dim=1).tolist() == [False, True, True, True]


def test_activation_score_of_a_parametrized_model_weighs_its_inputs_too() -> None:
    # A FakeSparsity-parametrized consumer: its weight is made anew on every read, so the input
    # norms were once looked up by its id, found nothing, and the score fell back to L2 silently.
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-1.0, -1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[9.0, 1.0, 1.2, 1.1]]))  # unit 0: the largest weights, input always 0
    torch.nn.utils.parametrize.register_parametrization(model[2], "weight", FakeSparsity(torch.ones(1, 4)))
    x = torch.rand(16, 2)  # positive: relu(-x0 - x1) = 0
    calibrated = fxsparse.masks.channels(model, 0.25, example_inputs=(x,), score="activation")
    assert calibrated["0.weight"].all(dim=1).tolist() == [False, True, True, True]


def test_activation_score_weighs_the_inputs_of_a_transformers_conv1d_consumer() -> None:
    # GPT-2's MLP projections are transformers' Conv1D ([in, out] weights), not nn.Linear: their
    # inputs were not recorded, and the score fell back to L2 silently.
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), Conv1D(1, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-1.0, -1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[9.0], [1.0], [1.2], [1.1]]))  # unit 0: the largest weights, input 0
    x = torch.rand(16, 2)  # positive: relu(-x0 - x1) = 0
    calibrated = fxsparse.masks.channels(model, 0.25, example_inputs=(x,), score="activation")
    assert calibrated["0.weight"].all(dim=1).tolist() == [False, True, True, True]


def test_global_scope_ranks_units_across_groups() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].bias.mul_(100)  # layer 2's outputs (its bias, the columns of layer 4): every unit scores high
        model[4].weight.mul_(100)
    x = (torch.randn(3, 4),)
    masks = fxsparse.masks.channels(model, 0.5, example_inputs=x, scope="global")
    assert masks["0.weight"].all(dim=1).sum() == 1  # the 8 lowest of 16 units are all layer 0's; one stays
    assert masks["2.weight"].any(dim=0).sum() == 1 and masks["2.weight"].any(dim=1).all()
    assert "4.weight" not in masks


# ------------------------------------------------------------------------------------------------
# review: cases where a zeroed channel is not "off", and dimensions no producer owns


class DividedByAParameter(nn.Module):
    """``h / self.temperature``: masking a unit zeroes its temperature, so the masked model divides 0 by 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 8)
        self.temperature = nn.Parameter(torch.rand(8) + 0.5)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) / self.temperature)  # type: ignore[no-any-return]


class RatioOfTwoLayers(nn.Module):
    """``a(x) / b(x)``: a masked unit of b is a zero divisor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.a(x) / self.b(x))  # type: ignore[no-any-return]


@pytest.mark.parametrize("model_class", [DividedByAParameter, RatioOfTwoLayers])
def test_groups_block_a_unit_whose_masked_channel_would_be_a_zero_divisor(model_class: type[nn.Module]) -> None:
    model, x = model_class(), torch.randn(3, 4)
    found = fxsparse.groups(model, example_inputs=(x,))
    divided = next(g for g in found if ("fc2.weight" in dict(members(g)) or "head.weight" in dict(members(g))))
    assert not divided.prunable and "zero" in str(divided.blocked)
    masks = fxsparse.masks.channels(model, 0.5, example_inputs=(x,))
    masked = reference_output(model, masks, x) if masks else model(x)
    assert torch.isfinite(masked).all()  # the masked model never divides by a masked zero


class NotFiniteOutput(nn.Module):
    """An MLP that also returns a log of its input: NaN for a negative input, whatever is pruned."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc2(torch.relu(self.fc1(x))), torch.log(x)


def test_shrink_compares_outputs_that_hold_nan_where_the_masked_model_does() -> None:
    model, x = NotFiniteOutput(), torch.randn(3, 4)
    masks = fxsparse.masks.channels(model, 0.5, example_inputs=(x,))
    small = fxsparse.shrink(fxsparse.transform(model, masks), example_inputs=(x,))
    expected, logs = reference_output(model, masks, x)
    got, got_logs = small(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_logs, logs, equal_nan=True)


class Tiled(nn.Module):
    """``h[:, None].expand(-1, 2, -1)``: two copies of every unit; the copy index is owned by no layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(h[:, None, :].expand(-1, 2, -1).reshape(x.shape[0], 16))  # type: ignore[no-any-return]


def test_groups_fix_a_dimension_that_expand_creates() -> None:
    found = fxsparse.groups(Tiled(), example_inputs=(torch.randn(3, 4),))
    # Before: "fc2.weight[1]: 2 units (block of 8), prunable", a unit of copies that no layer
    # produces (removing it leaves fc1 and the code producing 16 features for a 8-wide fc2).
    assert all(any(m.role == "rows" for m in g.members) for g in found.prunable)
    assert fxsparse.masks.channels(Tiled(), 0.5, example_inputs=(torch.randn(3, 4),)) == {}


class FixedMixingConv(nn.Module):
    """A 1x1 convolution with a fixed (buffer) filter after a sigmoid: a masked channel is 0.5 there, not 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 1)
        self.register_buffer("mixing", torch.randn(4, 8, 1, 1))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = F.conv2d(torch.sigmoid(self.conv(x)), self.mixing)
        return self.head(mixed).mean((2, 3))  # type: ignore[no-any-return]


class ExponentiatedWeight(nn.Module):
    """``F.linear(h, exp(self.log_weight))``: a masked log-weight is exp(0) = 1 in the weight, not 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(3, 8)
        self.log_weight = nn.Parameter(torch.randn(4, 8) * 0.1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.linear(torch.sigmoid(self.fc1(x)), torch.exp(self.log_weight)))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("model_class", "x", "producer"),
    [
        (FixedMixingConv, torch.randn(2, 3, 4, 4), "conv.weight[0]"),
        (ExponentiatedWeight, torch.randn(2, 3), "fc1.weight[0]"),
    ],
)
def test_a_layer_whose_weight_is_not_zero_where_masked_makes_its_inputs_inexact(
    model_class: type[nn.Module], x: torch.Tensor, producer: str
) -> None:
    model = model_class()
    assert not by_name(fxsparse.groups(model, example_inputs=(x,)))[producer].exact
    masks = fxsparse.masks.channels(model, 0.5, example_inputs=(x,))
    small = fxsparse.shrink(fxsparse.transform(model, masks), example_inputs=(x,))  # the masked model is the shrunk one
    torch.testing.assert_close(small(x), reference_output(model, masks, x), rtol=1e-5, atol=1e-6)


@dataclasses.dataclass
class HeadsOutput:
    logits: torch.Tensor


torch.export.register_dataclass(HeadsOutput)


class TwoHeadsInADataclass(nn.Module):
    """``view(b, 2, -1)`` writes the head count into the code (the shrunk model splits other blocks), and
    the output is a dataclass that torch.export knows: its tensors must still be compared."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> HeadsOutput:
        heads = self.fc1(x).view(x.shape[0], 2, -1).softmax(-1)
        return HeadsOutput(self.fc2(heads.reshape(x.shape[0], -1)))


def test_shrink_checks_the_tensors_inside_any_output_torch_export_knows() -> None:
    model, x = TwoHeadsInADataclass(), torch.randn(3, 4)
    masks = fxsparse.masks.channels(model, 0.5, example_inputs=(x,))
    assert masks  # one of the two heads
    with pytest.raises(fxsparse.MaskError, match="computes other outputs than the masked model"):
        fxsparse.shrink(fxsparse.transform(model, masks, example_inputs=(x,)), example_inputs=(x,))


class NormedTwoHeads(nn.Module):
    """A LayerNorm'd hidden size (inexact) before two heads whose count is written into the code (exact)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc0, self.norm = nn.Linear(4, 6), nn.LayerNorm(6)
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = self.fc1(self.norm(self.fc0(x))).view(x.shape[0], 2, -1).softmax(-1)
        return self.fc2(heads.reshape(x.shape[0], -1))  # type: ignore[no-any-return]


def test_shrink_exact_false_still_checks_the_values_of_the_exact_removals() -> None:
    model, x = NormedTwoHeads(), torch.randn(3, 4)
    masks = fxsparse.masks.channels(model, 0.5, example_inputs=(x,), exact=False)
    assert {"norm.weight", "fc2.weight"} <= set(masks)  # the hidden size and a head
    out = fxsparse.transform(model, masks, example_inputs=(x,))
    # Only the output shapes can be compared once the hidden size goes; the head is removed
    # exactly, and a forward that cannot follow it (view(b, 2, -1)) must still be refused.
    with pytest.raises(fxsparse.MaskError, match="computes other outputs than the masked model"):
        fxsparse.shrink(out, example_inputs=(x,), exact=False)


def test_channels_scores_a_fake_sparsity_model_by_the_weights_it_computes_with() -> None:
    from torch.ao.pruning.sparsifier.utils import FakeSparsity
    from torch.nn.utils import parametrize

    model, x = mlp(), torch.randn(3, 6)
    sparse = torch.rand(16, 6, generator=torch.Generator().manual_seed(1)) > 0.5
    parametrize.register_parametrization(model[0], "weight", FakeSparsity(sparse))
    masks = fxsparse.masks.channels(model, 0.5, example_inputs=(x,))  # was a KeyError on "0.weight"
    plain = mlp()
    with torch.no_grad():
        plain[0].weight.copy_(model[0].weight)  # the weight the parametrized model computes with
    expected_masks = fxsparse.masks.channels(plain, 0.5, example_inputs=(x,))
    assert masks.keys() == expected_masks.keys()
    assert all(torch.equal(masks[name], expected_masks[name]) for name in masks)
    # transform's explicit masks replace the inherited FakeSparsity mask of the same weight (docs/index.md)
    small = fxsparse.shrink(fxsparse.transform(model, masks), example_inputs=(x,))
    torch.testing.assert_close(small(x), reference_output(mlp(), masks, x), rtol=1e-5, atol=1e-6)
    assert parametrize.is_parametrized(model[0])  # left as it was


class TwoHeadsDecisions(TwoHeadsInADataclass):
    """The same heads written into the code, returning only decisions (bools) made from the logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x).logits > 0


def test_shrink_compares_integer_and_bool_outputs_exactly() -> None:
    model, x = TwoHeadsDecisions(), torch.randn(16, 4)
    masks = fxsparse.masks.channels(model, 0.5, example_inputs=(x,))
    with pytest.raises(fxsparse.MaskError, match="computes other outputs than the masked model"):
        fxsparse.shrink(fxsparse.transform(model, masks, example_inputs=(x,)), example_inputs=(x,))


class PaddedTokensTwoHeads(nn.Module):
    """Token 0 is padding (a zero embedding, so all-zero outputs), and the head count is written into forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8, padding_idx=0)
        self.fc1, self.fc2 = nn.Linear(8, 8, bias=False), nn.Linear(8, 10, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        heads = self.fc1(self.embed(ids)).view(*ids.shape, 2, -1)
        centred = heads - heads.mean(-1, keepdim=True)
        return self.fc2(centred.reshape(*ids.shape, -1))  # type: ignore[no-any-return]


def test_shrink_without_example_inputs_checks_on_inputs_that_reach_the_weights() -> None:
    model, ids = PaddedTokensTwoHeads(), torch.randint(1, 10, (2, 5))
    masks = fxsparse.masks.channels(model, 0.5, example_inputs=(ids,))
    out = fxsparse.transform(model, masks, example_inputs=(ids,))
    # Inputs of zeros are all padding here: every output is 0 whatever shrink does.
    with pytest.raises(fxsparse.MaskError, match="computes other outputs than the masked model"):
        fxsparse.shrink(out)
