"""Training semantics: fxsparse's graph trains as FakeSparsity does, bit for bit; freeze folds the masks."""

from __future__ import annotations

import copy
import pickle
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import fxsparse

from reference import fake_sparsity_on_every_name
from zoo import ZOO, build, make_masks

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.01),
    "sgd-momentum-decay": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


def fake_sparsity(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """The reference: FakeSparsity registered on every alias of each masked parameter, built by torch alone."""
    return fake_sparsity_on_every_name(model, masks)


def original_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by their name in the unparametrized model."""
    return {name.replace("parametrizations.", "").replace(".original", ""): p for name, p in model.named_parameters()}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("case_name", ["nested_sequential", "tied_embedding_head", "conv_net", "linear_called_twice"])
def test_a_few_steps_match_fake_sparsity_bit_for_bit(case_name: str, optimizer: str) -> None:
    case = ZOO[case_name]
    model = build(case)
    masks = make_masks(model, case, "bool")
    ours, reference = fxsparse.transform(model, masks), fake_sparsity(model, masks)
    ours_opt = OPTIMIZERS[optimizer](list(ours.parameters()))
    reference_opt = OPTIMIZERS[optimizer](list(reference.parameters()))
    torch.manual_seed(0)
    batches = [case.inputs() for _ in range(4)]
    for inputs in batches:
        losses = []
        for module, opt in ((ours, ours_opt), (reference, reference_opt)):
            opt.zero_grad()
            loss = module(*inputs).float().square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert bool(torch.isfinite(losses[0])) and torch.equal(losses[0], losses[1])
    theirs = original_parameters(reference)
    for name, parameter in ours.named_parameters():
        assert torch.equal(parameter, theirs[name]), name
    for p in fxsparse.plan(model, masks).parameters:  # the effective weight stays pruned
        effective = fxsparse.viz.masks_of(ours)[p.name] * ours.get_parameter(p.name)
        assert not bool(effective[~p.mask.bool()].any())


def test_gradients_reach_the_weight_as_mask_times_grad() -> None:
    model = nn.Linear(4, 3)
    mask = torch.rand(3, 4) > 0.5
    out = fxsparse.transform(model, {"weight": mask})
    x = torch.randn(5, 4)
    out(x).sum().backward()
    dense = copy.deepcopy(model)
    with torch.no_grad():
        dense.weight.mul_(mask)
    dense(x).sum().backward()
    assert torch.equal(out.weight.grad, mask * dense.weight.grad)


@pytest.mark.parametrize("case_name", ["seed_model", "tied_embedding_head", "conv_net", "functional_linear"])
def test_freeze_folds_the_masks(case_name: str) -> None:
    case = ZOO[case_name]
    model = build(case)
    out = fxsparse.transform(model, make_masks(model, case, "random"))
    frozen = fxsparse.freeze(out)
    inputs = case.inputs()
    with torch.no_grad():
        assert torch.equal(frozen(*inputs), out(*inputs))
    assert not any(key.endswith("_mask") for key in frozen.state_dict())
    assert set(frozen.state_dict()) == set(model.state_dict())
    assert "mul" not in frozen.code.replace("matmul", "")
    assert any(key.endswith("_mask") for key in out.state_dict())  # the masked graph is untouched
    roles = {n.meta.get(fxsparse.META_KEY, {}).get("role") for n in frozen.graph.nodes}
    assert "frozen" in roles and "masked" not in roles


def test_freeze_refuses_what_it_cannot_fold() -> None:
    with pytest.raises(TypeError, match=r"freeze takes fxsparse\.transform's output"):
        fxsparse.freeze(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(fxsparse.MaskError, match="no mask \\* weight to fold"):
        fxsparse.freeze(torch.fx.symbolic_trace(nn.Linear(2, 2)))


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """timm's drop_path: a Python branch on the mode, which a trace runs once."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1 - drop_prob
    random_tensor = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * random_tensor / keep


class DropPath(nn.Module):
    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)


class StochasticDepthBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop_path = DropPath(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.fc(x))


class FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(self.fc(x), 0.5, training=self.training)


def seeded(model: nn.Module, training: bool, x: torch.Tensor) -> torch.Tensor:
    model.train(training)
    torch.manual_seed(7)
    return model(x)


@pytest.mark.parametrize("model_class", [StochasticDepthBlock, FunctionalDropout])
@pytest.mark.parametrize("captured_in", [False, True], ids=["eval", "train"])
def test_fx_capture_follows_the_mode_code_reads_from_self_training(model_class: type, captured_in: bool) -> None:
    torch.manual_seed(0)
    model = model_class().train(captured_in)
    masks = {"fc.weight": torch.rand(8, 8) > 0.5}
    reference = fake_sparsity(model, masks)
    out = fxsparse.transform(model, masks, capture="fx")
    x = torch.randn(16, 8)
    for training in (not captured_in, captured_in, not captured_in):
        assert torch.equal(seeded(out, training, x), seeded(reference, training, x))
    assert not torch.equal(seeded(out, True, x), seeded(out, False, x))  # the modes do differ here
    again = fxsparse.transform(out, {"fc.bias": torch.ones(8)}, capture="fx")  # a mask of ones changes nothing
    for kept in (copy.deepcopy(out), pickle.loads(pickle.dumps(out)), again):
        for training in (True, False):
            assert torch.equal(seeded(kept, training, x), seeded(reference, training, x))


class TracesInEvalModeOnly(nn.Module):
    """Train mode draws a mask from a traced size (``torch.rand`` refuses a proxy): FX traces eval mode only."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc(x)
        if self.training:
            hidden = hidden * (torch.rand(x.shape[0], 1) > 0.5)
        return hidden


def test_a_model_fx_traces_in_its_own_mode_only_is_captured_and_refuses_the_switch() -> None:
    torch.manual_seed(0)
    model = TracesInEvalModeOnly().eval()
    masks = {"fc.weight": torch.rand(8, 8) > 0.5}
    reference = fake_sparsity(model, masks).eval()
    out = fxsparse.transform(model, masks)  # symbolic_trace(model) traces it: so must fxsparse
    x = torch.randn(16, 8)
    assert torch.equal(out(x), reference(x))
    for kept in (out, copy.deepcopy(out), fxsparse.transform(out, {"fc.bias": torch.ones(8)}), fxsparse.freeze(out)):
        with pytest.raises(fxsparse.EmitError, match=r"eval mode only.*cannot switch it to train mode"):
            kept.train()
        assert not kept.training and torch.equal(kept(x), reference(x))


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_freeze_keeps_the_graph_of_each_mode(layout: str) -> None:
    torch.manual_seed(0)
    model = StochasticDepthBlock().eval()
    masks = {"fc.weight": torch.rand(8, 8) > 0.5}
    reference = fake_sparsity(model, masks)
    out = fxsparse.transform(model, masks)
    frozen = fxsparse.freeze(out, layout=layout)
    x = torch.randn(16, 8)
    if layout == "dense":
        for training in (True, False):
            assert torch.equal(seeded(frozen, training, x), seeded(reference, training, x))
        assert not any(name.endswith("_mask") for name in frozen.state_dict())
    else:  # the sparse layouts were chosen on the eval graph: the frozen model stays in eval mode
        torch.testing.assert_close(seeded(frozen, False, x), seeded(out, False, x))
        with pytest.raises(fxsparse.EmitError, match="eval mode only"):
            frozen.train()
        assert not frozen.training


class HalfGradient(torch.autograd.Function):
    """Forward: the identity; backward: half the gradient (what a trace of its forward cannot know)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad / 2


class Scaled(torch.autograd.Function):
    """A Function taking a Python callable, which generated code cannot spell as an argument."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, scale: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return scale(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad / 2, None


class WithCustomFunction(nn.Module):
    def __init__(self, function: str = "half") -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc(x)
        hidden = HalfGradient.apply(hidden) if self.function == "half" else Scaled.apply(hidden, torch.neg)
        return self.head(hidden)


def gradients(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model(x).square().sum().backward()
    named = model.named_parameters()
    return {name.replace(".parametrizations.weight.original", ".weight"): p.grad for name, p in named}


def test_fx_capture_keeps_a_custom_autograd_functions_backward() -> None:
    torch.manual_seed(0)
    model = WithCustomFunction()
    masks = {"fc.weight": torch.rand(4, 4) > 0.5}
    x = torch.randn(3, 4)
    expected = gradients(fake_sparsity(model, masks), x)
    apply = torch.autograd.Function.__dict__["apply"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fxsparse.transform(model, masks, capture="fx")
    assert torch.autograd.Function.__dict__["apply"] is apply  # left as found
    for kept in (out, pickle.loads(pickle.dumps(out)), copy.deepcopy(out)):
        got = gradients(kept, x)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_a_custom_autograd_function_traced_through_is_named_in_a_warning() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    masks = {"fc.weight": torch.rand(4, 4) > 0.5}
    with pytest.warns(UserWarning, match=r"autograd.Function .*HalfGradient is not kept as a call \(torch.export"):
        fxsparse.transform(WithCustomFunction(), masks, capture="export", example_inputs=(x,))
    with pytest.warns(UserWarning, match=r"autograd.Function .*Scaled is not kept as a call \(torch.fx traced"):
        fxsparse.transform(WithCustomFunction("scaled"), masks, capture="fx")


class DoublesInTraining(nn.Module):
    """Deterministic code that reads self.training: twice its output in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)
        return x * 2 if self.training else x


def test_a_per_mode_graph_refuses_a_submodule_switched_to_the_other_mode_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(DoublesInTraining(), DoublesInTraining()).train()
    masks = {"0.fc.weight": torch.rand(4, 4) > 0.5, "1.fc.weight": torch.rand(4, 4) > 0.5}
    reference = fake_sparsity(model, masks)
    out = fxsparse.transform(model, masks, capture="fx")
    x = torch.randn(2, 4)
    out.get_submodule("0").eval()  # the graph of train mode baked module 0's training branch
    for kept in (out, copy.deepcopy(out), pickle.loads(pickle.dumps(out))):
        with pytest.raises(fxsparse.EmitError, match=r"module '0' is in eval mode"):
            kept(x)
    out.get_submodule("0").train()
    assert torch.equal(out(x), reference(x))


def test_a_model_transformed_with_mixed_modes_refuses_the_modes_it_was_not_traced_in() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(DoublesInTraining(), DoublesInTraining()).train()
    model[0].eval()  # as a frozen block is: its code ran in eval mode while the rest trains
    masks = {"0.fc.weight": torch.rand(4, 4) > 0.5}
    reference = fake_sparsity(model, masks)
    out = fxsparse.transform(model, masks, capture="fx")
    x = torch.randn(2, 4)
    assert torch.equal(out(x), reference(x))
    out.eval()
    reference.eval()
    assert torch.equal(out(x), reference(x))
    out.train()  # module 0 trains now, but the graph of train mode ran its code in eval mode
    with pytest.raises(fxsparse.EmitError, match=r"module '0' is in train mode"):
        out(x)
    out.get_submodule("0").eval()
    reference.train()
    reference[0].eval()
    assert torch.equal(out(x), reference(x))
    both_blocks_frozen = nn.Sequential(DoublesInTraining(), DoublesInTraining()).train()
    both_blocks_frozen[0].eval()
    both_blocks_frozen[1].eval()  # eval code in both modes of the root: one graph, still bound to these modes
    out = fxsparse.transform(both_blocks_frozen, {"0.fc.weight": torch.ones(4, 4)}, capture="fx").train()
    with pytest.raises(fxsparse.EmitError, match=r"module '0' is in train mode"):
        out(x)
