"""Training semantics: fxsparse's graph trains as FakeSparsity does, bit for bit; freeze folds the masks."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.ao.pruning import FakeSparsity
from torch.nn.utils import parametrize

import fxsparse

from zoo import ZOO, build, make_masks

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.01),
    "sgd-momentum-decay": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


def fake_sparsity(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """The reference: FakeSparsity registered on every alias of each masked parameter."""
    reference = copy.deepcopy(model)
    plan = fxsparse.plan(model, masks)
    for p in plan.parameters:
        for alias in p.aliases:
            owner, _, name = alias.rpartition(".")
            parametrize.register_parametrization(reference.get_submodule(owner), name, FakeSparsity(p.mask))
    return reference


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
