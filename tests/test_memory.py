"""Memory at language-model scale: ``transform(..., share_weights=True)`` and ``freeze(..., inplace=True)``.

Sharing is checked by storage (``data_ptr``) and by identity; outputs against FakeSparsity
(tests/reference.py); the in-place freeze against the ordinary freeze, bit for bit.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import fxsparse

from hf_zoo import FAMILIES, build, random_masks
from reference import fake_sparsity, fake_sparsity_on_every_name

MASK = "_mask"


def small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))


def masks_of_small() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {"0.weight": torch.rand(8, 8) > 0.5, "3.weight": torch.rand(4, 8) > 0.3}


def structure(model: nn.Module) -> list[Any]:
    """What a model is made of, by identity: modules, parameters, buffers, and every hook registry."""
    described: list[Any] = []
    for name, module in model.named_modules(remove_duplicate=False):
        hooks = {key: dict(value) for key, value in vars(module).items() if key.endswith("hooks")}
        described.append((name, id(module), type(module), sorted(hooks), [list(h) for h in hooks.values()]))
    described += [(name, id(p)) for name, p in model.named_parameters(remove_duplicate=False)]
    described += [(name, id(b)) for name, b in model.named_buffers(remove_duplicate=False)]
    return described


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_share_weights_output_holds_the_models_parameters_and_copies_its_buffers(capture: str) -> None:
    model, masks = small().eval(), masks_of_small()
    x = torch.randn(3, 8)
    before = structure(model)
    out = fxsparse.transform(model, masks, capture=capture, example_inputs=(x,), share_weights=True)
    for name, parameter in model.named_parameters():
        assert out.get_parameter(name) is parameter
        assert out.get_parameter(name).data_ptr() == parameter.data_ptr()
    for name, buffer in model.named_buffers():
        if buffer.numel():
            assert out.get_buffer(name).data_ptr() != buffer.data_ptr()  # batch-norm statistics stay the model's
    assert structure(model) == before
    assert torch.equal(out(x), fake_sparsity(model, masks).eval()(x))
    with torch.no_grad():  # a change to the model's weight is the output's
        model[0].weight.add_(1.0)
        model[3].bias.mul_(3.0)
    assert torch.equal(out(x), fake_sparsity(model, masks).eval()(x))


def test_share_weights_training_the_output_trains_the_model_and_leaves_its_statistics() -> None:
    model, masks = small().train(), masks_of_small()
    statistics = model[1].running_mean.clone()
    out = fxsparse.transform(model, masks, share_weights=True)
    optimizer = torch.optim.SGD(out.parameters(), lr=0.1)
    out(torch.randn(5, 8)).pow(2).mean().backward()
    optimizer.step()
    assert all(out.get_parameter(n) is p for n, p in model.named_parameters())
    assert not torch.equal(out.get_buffer("1.running_mean"), statistics)  # the output's batch norm ran
    assert torch.equal(model[1].running_mean, statistics)  # the model's did not


def test_share_weights_of_a_fake_sparsity_model_shares_the_original_and_keeps_the_parametrization() -> None:
    masks = masks_of_small()
    model = fake_sparsity_on_every_name(small().eval(), masks)
    before = structure(model)
    out = fxsparse.transform(model, share_weights=True)
    original = model[0].parametrizations.weight.original
    assert out.get_parameter("0.weight") is original
    assert structure(model) == before
    x = torch.randn(3, 8)
    assert torch.equal(out(x), model(x))


def test_share_weights_a_tied_weight_stays_one_parameter_the_models() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    model = Tied()
    mask = torch.rand(4, 4) > 0.5
    out = fxsparse.transform(model, {"a.weight": mask}, share_weights=True)
    assert out.get_parameter("a.weight") is model.a.weight and out.get_parameter("b.weight") is model.a.weight
    x = torch.randn(2, 4)
    assert torch.equal(out(x), fake_sparsity_on_every_name(model, {"a.weight": mask})(x))


_BATCH_NORMS: dict[str, nn.Module] = {}


class _StatisticsThroughAGlobal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4).eval()
        _BATCH_NORMS["bn"] = self.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BATCH_NORMS["bn"](self.fc(x))


def test_share_weights_still_refuses_a_graph_reading_the_models_buffers() -> None:
    model = _StatisticsThroughAGlobal().eval()
    with pytest.raises(fxsparse.TraceError, match=r"reads the model's own tensor 'bn\."):
        fxsparse.transform(
            model, {"fc": torch.ones(4, 4)}, capture="export", example_inputs=(torch.randn(2, 4),), share_weights=True
        )


def test_share_weights_must_be_a_bool() -> None:
    with pytest.raises(fxsparse.MaskError, match="share_weights must be True or False, got 'yes'"):
        fxsparse.transform(small(), masks_of_small(), share_weights="yes")  # type: ignore[arg-type]


def storages(module: nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (id(p), p.data_ptr()) for name, p in module.named_parameters(remove_duplicate=False)}


def test_freeze_inplace_equals_freeze_bit_for_bit_in_the_outputs_own_weights() -> None:
    model, masks = small().train(), masks_of_small()
    out = fxsparse.transform(model, masks)
    ordinary = fxsparse.freeze(out)
    held = storages(out)
    frozen = fxsparse.freeze(out, inplace=True)
    assert frozen is out
    assert storages(frozen) == held  # the same parameters, in the same memory: no second copy
    assert frozen.state_dict().keys() == ordinary.state_dict().keys()
    assert all(torch.equal(v, ordinary.state_dict()[k]) for k, v in frozen.state_dict().items())
    x = torch.randn(3, 8)
    assert not frozen.training
    assert torch.equal(frozen(x), ordinary(x))
    assert torch.equal(frozen(x), fake_sparsity(model, masks).eval()(x))


def test_freeze_inplace_of_a_shared_output_folds_into_the_models_weights() -> None:
    model, masks = small().eval(), masks_of_small()
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, mask in masks.items():
        expected[name] = torch.mul(mask, expected[name])
    frozen = fxsparse.freeze(fxsparse.transform(model, masks, share_weights=True), inplace=True)
    assert all(frozen.get_parameter(n) is p for n, p in model.named_parameters())
    assert all(torch.equal(p, expected[n]) for n, p in model.named_parameters())


def test_freeze_inplace_of_an_export_capture_fine_tuned_in_train_mode_shares_the_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fxsparse import _deploy

    planned: list[torch.Tensor] = []
    rewrite = _deploy._rewrite.rewrite

    def recording_rewrite(root: nn.Module, graph: torch.fx.Graph, plan: Any, *args: Any, **kwargs: Any) -> None:
        planned.extend(p.mask for p in plan.parameters)
        rewrite(root, graph, plan, *args, **kwargs)

    monkeypatch.setattr(_deploy._rewrite, "rewrite", recording_rewrite)
    family = FAMILIES["llama"]
    model = build(family).train()
    inputs = family.inputs(2, 8)
    out = fxsparse.transform(model, random_masks(model), capture="export", example_kwargs=inputs)
    optimizer = torch.optim.AdamW(out.parameters(), lr=1e-2)
    out(**inputs)[family.output].float().pow(2).mean().backward()
    optimizer.step()
    ordinary = fxsparse.freeze(out, example_kwargs=inputs)
    held = storages(out)
    masks = {buffer.data_ptr() for name, buffer in out.named_buffers() if name.endswith(MASK)}
    planned.clear()
    frozen = fxsparse.freeze(out, inplace=True, example_kwargs=inputs)
    assert storages(frozen) == held
    assert {mask.data_ptr() for mask in planned} == masks  # out's own masks' memory, not copies of them
    assert all(torch.equal(v, ordinary.state_dict()[k]) for k, v in frozen.state_dict().items())
    assert frozen.state_dict().keys() == ordinary.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(frozen(**inputs)[family.output], ordinary(**inputs)[family.output])
    with pytest.raises(AttributeError, match=MASK):  # consumed: it gave up its masks
        out(**inputs)


def test_freeze_inplace_refusals_leave_out_whole() -> None:
    family = FAMILIES["llama"]
    model = build(family).train()
    inputs = family.inputs(2, 8)
    out = fxsparse.transform(model, random_masks(model), capture="export", example_kwargs=inputs)
    state = copy.deepcopy(out.state_dict())
    with pytest.raises(fxsparse.EmitError, match=r"captured by torch\.export in train mode"):
        fxsparse.freeze(out, inplace=True)  # no example inputs to capture it again with
    with pytest.raises(fxsparse.EmitError, match="inplace must be True or False, got 1"):
        fxsparse.freeze(out, inplace=1, example_kwargs=inputs)  # type: ignore[arg-type]
    assert out.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in out.state_dict().items())
    assert out.training
    out(**inputs)  # still runs


class _OnlyExportCaptures(nn.Module):
    """A model torch.fx cannot trace (control flow on a size), so ``capture="auto"`` exports it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y if x.shape[0] > 1 else -y


@pytest.mark.parametrize("share_weights", [False, True])
def test_transform_drops_the_failed_traces_copy_before_it_exports(
    monkeypatch: pytest.MonkeyPatch, share_weights: bool
) -> None:
    import gc

    from fxsparse import _capture

    alive: list[int] = []
    export = _capture.export

    def counting_export(*args: Any, **kwargs: Any) -> Any:
        gc.collect()
        alive.append(sum(type(o) is _OnlyExportCaptures for o in gc.get_objects()))
        return export(*args, **kwargs)

    monkeypatch.setattr(_capture, "export", counting_export)
    model = _OnlyExportCaptures().eval()
    x = torch.randn(3, 8)
    mask = torch.rand(8, 8) > 0.5
    out = fxsparse.transform(model, {"fc.weight": mask}, example_inputs=(x,), share_weights=share_weights)
    assert out.meta["fxsparse"]["capture"] == "export"
    assert alive == [2]  # the model and the copy being exported: not the copy FX failed on
    assert torch.equal(out(x), fake_sparsity(model, {"fc.weight": mask})(x))


def test_calibration_reads_the_models_weights_and_never_writes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from fxsparse.masks import _calibrate

    captures: list[torch.fx.GraphModule] = []
    transform = _calibrate.transform

    def recording_transform(*args: Any, **kwargs: Any) -> Any:
        captures.append(transform(*args, **kwargs))
        return captures[-1]

    monkeypatch.setattr(_calibrate, "transform", recording_transform)
    family = FAMILIES["llama"]
    model = build(family).train()
    versions = {name: p._version for name, p in model.named_parameters()}
    values = {name: p.detach().clone() for name, p in model.named_parameters()}
    calibration = [family.inputs(2, 8), family.inputs(2, 8)]
    for sequential in (True, False):
        fxsparse.masks.wanda(model, calibration, exclude="lm_head", sequential=sequential, progress=False)
        fxsparse.masks.sparsegpt(model, calibration, exclude="lm_head", sequential=sequential, progress=False)
    assert len(captures) == 4
    for working in captures:  # no copy of the weights: the capture holds the model's own
        assert all(working.get_parameter(name) is p for name, p in model.named_parameters())
    assert {name: p._version for name, p in model.named_parameters()} == versions
    assert all(torch.equal(p, values[name]) for name, p in model.named_parameters())
    assert model.training


def test_calibration_records_no_autograd_graph() -> None:
    """A graph over the calibration batches would keep every layer's inputs (and pruned weights) alive."""
    from fxsparse.masks import _calibrate

    model = small().eval()
    seen: list[bool] = []

    def update(state: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        seen.append(x.requires_grad)
        return x.abs().sum(0) if state is None else state + x.abs().sum(0)

    def decide(name: str, weight: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(torch.is_grad_enabled())
        mask = torch.ones_like(weight, dtype=torch.bool)
        return mask, weight * mask

    batches = _calibrate.batches_of([torch.randn(4, 8)])
    _calibrate.calibrate(
        model, ["0.weight", "3.weight"], batches, _calibrate.Statistic(update), decide, sequential=True, progress=False
    )
    assert seen and not any(seen)


def test_share_weights_takes_the_masks_given_and_one_tensor_for_two_parameters_is_split() -> None:
    model = small().eval()
    mask = torch.rand(8, 8) > 0.5
    second = torch.rand(4, 8) > 0.5
    out = fxsparse.transform(model, {"0.weight": mask, "3.weight": second}, share_weights=True)
    assert out.get_buffer("0.weight_mask").data_ptr() == mask.data_ptr()  # no copy of the masks either
    assert out.get_buffer("3.weight_mask").data_ptr() == second.data_ptr()
    shared = torch.rand(8, 8) > 0.5
    before = shared.clone()
    twice = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    out = fxsparse.transform(twice, {"0.weight": shared, "1.weight": shared}, share_weights=True)
    assert out.get_buffer("0.weight_mask").data_ptr() != out.get_buffer("1.weight_mask").data_ptr()
    fxsparse.update_masks(out, {"0.weight": torch.ones(8, 8, dtype=torch.bool)})
    x = torch.randn(2, 8)
    expected = fake_sparsity(twice, {"0.weight": torch.ones(8, 8, dtype=torch.bool), "1.weight": before})
    assert torch.equal(out(x), expected(x))  # 1.weight kept its mask: its buffer is not the one written
    assert bool(shared.all())  # as documented: the output's mask buffers are the tensors given


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_each_masked_product_is_made_just_before_its_use(mode: str) -> None:
    """torch.export reads every parameter at the top of its graph; were the products made there,
    all of them would be alive at once through the whole forward: one more copy of the weights."""
    family = FAMILIES["llama"]
    model = build(family).train(mode == "train")
    masks = {name: mask for name, mask in random_masks(model).items() if name.startswith("model.layers.")}
    out = fxsparse.transform(model, masks, example_kwargs=family.inputs(1, 8))
    nodes = list(out.graph.nodes)
    position = {node: index for index, node in enumerate(nodes)}
    products = [n for n in nodes if n.meta.get(fxsparse.META_KEY, {}).get("role") == "masked"]
    assert len(products) == len(masks)
    for product in products:  # none made while another is still waiting for its use
        last_use = max(position[user] for user in product.users)
        assert not [other for other in products if position[product] < position[other] < last_use], product
    got = out(**family.inputs(1, 8)).logits
    expected = fake_sparsity(model, masks)(**family.inputs(1, 8)).logits
    assert torch.equal(got, expected)
