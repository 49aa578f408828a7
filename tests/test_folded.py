"""The folded mode (transform(fold=True), fxsparse.fold): weights hold mask * weight, the graph
multiplies nothing, gradients are masked; every step bit for bit FakeSparsity's where the
docs say so, and the documented differences where they do not."""

from __future__ import annotations

import copy
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fxsparse

from reference import fake_sparsity_on_every_name
from zoo import ZOO, build, make_masks

Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

# Every torch optimizer whose update of an entry with zero gradient, zero state and zero value is
# zero, entry by entry (what the folded mode needs; docs/distributed.md lists them and why).
QUALIFYING: dict[str, Factory] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1),
    "sgd-nesterov-decay": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adam-amsgrad-decay": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True, weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, amsgrad=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05, lr_decay=0.01, weight_decay=0.01),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0, weight_decay=0.01),
    "adamax": lambda p: torch.optim.Adamax(p, lr=0.01, weight_decay=0.01),
    "asgd": lambda p: torch.optim.ASGD(p, lr=0.05, weight_decay=0.01),
    "nadam": lambda p: torch.optim.NAdam(p, lr=0.01, weight_decay=0.01),
    "nadam-decoupled": lambda p: torch.optim.NAdam(p, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    "radam": lambda p: torch.optim.RAdam(p, lr=0.01, weight_decay=0.01),
    "radam-decoupled": lambda p: torch.optim.RAdam(p, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, weight_decay=0.01),
    "rmsprop-centered-momentum": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, centered=True),
    "rprop": lambda p: torch.optim.Rprop(p, lr=0.01),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=0.01, foreach=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, fused=True),
}
STEPS = 4


def original_parameters(reference: nn.Module) -> dict[str, torch.Tensor]:
    """The FakeSparsity model's parameters by the plain model's names (the raw weights under the masks)."""
    return {
        name.replace("parametrizations.", "").replace(".original", ""): p for name, p in reference.named_parameters()
    }


def effective(reference: nn.Module, name: str) -> torch.Tensor:
    """What the FakeSparsity model computes with: mask * weight (its parametrized attribute)."""
    owner, _, attribute = name.rpartition(".")
    return getattr(reference.get_submodule(owner), attribute)  # type: ignore[no-any-return]


def loss_of(output: Any) -> torch.Tensor:
    tensors = [output] if isinstance(output, torch.Tensor) else [t for t in output.values() if t.is_floating_point()]
    return sum((t.float().square().mean() for t in tensors), torch.zeros(()))


def assert_steps_match(
    folded: nn.Module,
    reference: nn.Module,
    masked: list[str],
    batches: list[dict[str, Any]],
    make_optimizer: Factory,
    step: Callable[[nn.Module, dict[str, Any]], torch.Tensor] | None = None,
) -> None:
    """Train both a step per batch: equal losses, outputs and effective weights after every step."""
    step = step or (lambda module, inputs: loss_of(module(**inputs)))
    optimizers = [make_optimizer(list(m.parameters())) for m in (folded, reference)]
    for number, inputs in enumerate(batches):
        losses = []
        for module, optimizer in zip((folded, reference), optimizers, strict=True):
            optimizer.zero_grad()
            loss = step(module, inputs)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        assert bool(torch.isfinite(losses[0])), number
        assert torch.equal(losses[0], losses[1]), f"step {number}: loss {losses[0]} != FakeSparsity's {losses[1]}"
        theirs = original_parameters(reference)
        for name, parameter in folded.named_parameters():
            expected = effective(reference, name) if name in masked else theirs[name]
            assert torch.equal(parameter, expected), f"step {number}: {name} differs from FakeSparsity's"
    with torch.no_grad():
        assert torch.equal(step(folded, batches[0]), step(reference, batches[0]))


def every_name(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[str]:
    """Every name of every masked parameter (a tied one has several)."""
    return [alias for p in fxsparse.plan(model, masks).parameters for alias in p.aliases]


def zoo_case(case_name: str, kind: str = "bool") -> tuple[nn.Module, dict[str, torch.Tensor], list[dict[str, Any]]]:
    case = ZOO[case_name]
    model = build(case).train()
    masks = make_masks(model, case, kind)
    torch.manual_seed(0)
    batches = [{f"arg{i}": value for i, value in enumerate(case.inputs())} for _ in range(STEPS)]
    return model, masks, batches


def positional(module: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    # tanh keeps the loss finite on the zoo's models with large constant weights (seed_model)
    return module(*inputs.values()).float().tanh().square().mean()  # type: ignore[no-any-return]


@pytest.mark.parametrize("optimizer", list(QUALIFYING))
@pytest.mark.parametrize("case_name", list(ZOO))
def test_folded_training_matches_fake_sparsity_step_by_step(case_name: str, optimizer: str) -> None:
    model, masks, batches = zoo_case(case_name, "random" if optimizer == "adam" else "bool")
    masked = every_name(model, masks)
    folded = fxsparse.transform(model, masks, fold=True)
    reference = fake_sparsity_on_every_name(model, masks)
    assert_steps_match(folded, reference, masked, batches, QUALIFYING[optimizer], positional)


def test_folded_lbfgs_matches_fake_sparsity() -> None:
    """LBFGS couples entries (dot products over the whole gradient), but only through gradients,
    which are equal and zero at pruned entries on both sides: it qualifies too."""
    model, masks, batches = zoo_case("nested_sequential")
    masked = every_name(model, masks)
    folded, reference = fxsparse.transform(model, masks, fold=True), fake_sparsity_on_every_name(model, masks)
    # LBFGS sums over all parameters in the order given (its dot products): the same order on both sides.
    theirs = original_parameters(reference)
    in_order = [list(folded.parameters()), [theirs[name] for name, _ in folded.named_parameters()]]
    optimizers = [torch.optim.LBFGS(parameters, lr=0.5, max_iter=4) for parameters in in_order]
    for inputs in batches:
        losses = []
        for module, optimizer in zip((folded, reference), optimizers, strict=True):

            def closure(
                module: nn.Module = module, optimizer: torch.optim.Optimizer = optimizer, inputs: Any = inputs
            ) -> torch.Tensor:
                optimizer.zero_grad()
                loss = positional(module, inputs)
                loss.backward()
                return loss

            losses.append(optimizer.step(closure))
        assert torch.equal(losses[0], losses[1])
    theirs = original_parameters(reference)
    for name, parameter in folded.named_parameters():
        assert torch.equal(parameter, effective(reference, name) if name in masked else theirs[name]), name


@pytest.mark.parametrize("optimizer", ["adamw", "sgd-nesterov-decay", "rmsprop-centered-momentum"])
def test_folded_transformers_llama_matches_fake_sparsity_step_by_step(optimizer: str) -> None:
    pytest.importorskip("transformers")
    from hf_zoo import FAMILIES, random_masks
    from hf_zoo import build as build_family

    family = FAMILIES["llama"]
    model = build_family(family).train()
    masks = random_masks(model)
    ids = family.inputs(2, 8)["input_ids"]
    batches = [{"input_ids": ids, "labels": ids}]
    folded = fxsparse.transform(model, masks, fold=True, example_kwargs=batches[0])
    reference = fake_sparsity_on_every_name(model, masks)

    def step(module: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        return module(input_ids=inputs["input_ids"], labels=inputs["labels"])["loss"]  # type: ignore[no-any-return]

    assert_steps_match(folded, reference, every_name(model, masks), batches[:1] * 3, QUALIFYING[optimizer], step)


@pytest.mark.parametrize("name", ["nanogpt", "mingpt", "lstm_lm", "transformer_encoder_padding", "drop_path"])
def test_folded_model_zoo_matches_fake_sparsity_step_by_step(name: str) -> None:
    from model_zoo import ZOO as MODEL_ZOO
    from model_zoo import random_masks

    entry = MODEL_ZOO[name]
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(entry.build().train())
    masks = random_masks(models[0])
    inputs = entry.inputs()
    folded = fxsparse.transform(models[0], masks, fold=True, example_kwargs=inputs)
    reference = fake_sparsity_on_every_name(models[1], masks, in_place=True)

    def step(module: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        torch.manual_seed(1)  # the same random draws (drop path) on both sides
        output = module(**batch)
        tensors = [output] if isinstance(output, torch.Tensor) else [t for t in output if isinstance(t, torch.Tensor)]
        return sum((t.float().square().mean() for t in tensors if t.is_floating_point()), torch.zeros(()))

    assert_steps_match(folded, reference, every_name(models[0], masks), [inputs] * 3, QUALIFYING["adamw"], step)


# torch.compile's own tracing of any custom autograd.Function instantiates torch.autograd.Function,
# which torch itself deprecates (torch/_dynamo/side_effects.py): its warning, not fxsparse's.
COMPILE_WARNING = "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"


@pytest.mark.filterwarnings(COMPILE_WARNING)
def test_a_compiled_folded_step_matches_fake_sparsity_step_by_step() -> None:
    """torch.compile without code generation (aot_eager: dynamo's graph, AOT autograd's forward and
    backward, run by ATen): bit for bit the eager FakeSparsity model's steps."""
    model, masks, batches = zoo_case("nested_sequential")
    folded = fxsparse.transform(model, masks, fold=True)
    compiled = torch.compile(folded, backend="aot_eager", fullgraph=True)

    def step(module: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        return positional(compiled if module is folded else module, inputs)

    reference = fake_sparsity_on_every_name(model, masks)
    assert_steps_match(folded, reference, every_name(model, masks), batches, QUALIFYING["adamw"], step)


@pytest.mark.filterwarnings(COMPILE_WARNING)
def test_an_inductor_compiled_folded_step_keeps_pruned_weights_at_zero() -> None:
    """Inductor generates its own kernels for each graph (fused differently for the folded and the
    FakeSparsity graph, so last bits may differ: torch's choice); what fxsparse owes is that pruned
    entries get zero gradient and stay exactly zero, and that the step computes the same thing."""
    model, masks, batches = zoo_case("nested_sequential")
    folded = fxsparse.transform(model, masks, fold=True)
    reference = fake_sparsity_on_every_name(model, masks)
    compiled = {id(module): torch.compile(module) for module in (folded, reference)}
    optimizers = [torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1) for m in (folded, reference)]
    for inputs in batches:
        for module, optimizer in zip((folded, reference), optimizers, strict=True):
            optimizer.zero_grad()
            positional(compiled[id(module)], inputs).backward()
            optimizer.step()
        for name in every_name(model, masks):
            pruned = fxsparse.masks.of(folded)[name] == 0
            assert not bool(folded.get_parameter(name).grad[pruned].any())
            assert not bool(folded.get_parameter(name)[pruned].any())
            torch.testing.assert_close(folded.get_parameter(name), effective(reference, name))


def test_folded_graph_multiplies_nothing_and_masks_the_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    masks = {"0.weight": torch.rand(6, 6) > 0.5, "2.weight": torch.rand(3, 6) > 0.5}
    folded = fxsparse.transform(model, masks, fold=True)
    seen: list[Any] = []

    class Calls(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            seen.append(func)
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, 6)
    with Calls():
        folded(x)
    assert torch.mul not in seen and torch.Tensor.mul not in seen
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for key, mask in masks.items():
            dense.get_parameter(key).mul_(mask)
    assert all(torch.equal(folded.get_parameter(k), dense.get_parameter(k)) for k in masks)
    folded(x).sum().backward()
    dense(x).sum().backward()
    for key, mask in masks.items():
        assert torch.equal(folded.get_parameter(key).grad, mask * dense.get_parameter(key).grad)
        assert not bool(folded.get_parameter(key).grad[~mask].any())


def test_folded_output_keeps_the_masked_graphs_names_keys_and_masks() -> None:
    case = ZOO["tied_embedding_head"]
    model = build(case)
    masks = make_masks(model, case, "bool")
    masked, folded = fxsparse.transform(model, masks), fxsparse.transform(model, masks, fold=True)
    assert list(folded.state_dict()) == list(masked.state_dict())
    assert [n.name for n in folded.graph.nodes] == [n.name for n in masked.graph.nodes]
    roles = [getattr(fxsparse.tag_of(n), "role", None) for n in folded.graph.nodes]
    assert roles == [
        fxsparse.Role.FOLDED if role is fxsparse.Role.MASKED else role
        for role in (getattr(fxsparse.tag_of(n), "role", None) for n in masked.graph.nodes)
    ]
    assert {k: bool(torch.equal(v, masked.state_dict()[k])) for k, v in fxsparse.masks.of(folded).items()}
    assert all(
        torch.equal(fxsparse.masks.of(folded)[k], fxsparse.masks.of(masked)[k]) for k in fxsparse.masks.of(masked)
    )
    assert "folded" in fxsparse.ROLES
    assert "mask * weight (folded)" in fxsparse.viz.draw(folded, compact=False).source
    for compact in (True, False):  # the masked graph's pictures, the product labelled folded
        drawn = fxsparse.viz.draw(folded, compact=compact).source.replace(" (folded)", "")
        assert drawn == fxsparse.viz.draw(masked, compact=compact).source
    for kept in (copy.deepcopy(folded), pickle.loads(pickle.dumps(folded))):
        ids = case.inputs()
        assert torch.equal(kept(*ids), folded(*ids))
        assert fxsparse.masks.of(kept).keys() == fxsparse.masks.of(folded).keys()


def test_fold_and_unfold_switch_an_existing_output_without_changing_it() -> None:
    model, masks, batches = zoo_case("seed_model", "random")
    out = fxsparse.transform(model, masks)
    before = {k: v.clone() for k, v in out.state_dict().items()}
    folded = fxsparse.fold(out)
    assert all(torch.equal(out.state_dict()[k], v) for k, v in before.items())  # `out` as it was
    assert "torch.mul" in out.code and "torch.mul" not in folded.code
    inputs = tuple(batches[0].values())
    assert torch.equal(folded(*inputs), out(*inputs))
    unfolded = fxsparse.unfold(folded)
    assert "torch.mul" in unfolded.code and "torch.mul" not in folded.code
    assert torch.equal(unfolded(*inputs), out(*inputs))
    assert fxsparse.fold(folded, inplace=True) is folded  # folding twice changes nothing
    assert fxsparse.fold(out, inplace=True) is out and "torch.mul" not in out.code


@pytest.mark.parametrize("inplace", [False, True])
def test_fold_of_a_model_traced_in_both_modes_folds_each_modes_graph(inplace: bool) -> None:
    from test_training import StochasticDepthBlock, seeded

    torch.manual_seed(0)
    model = StochasticDepthBlock().eval()
    masks = {"fc.weight": torch.rand(8, 8) > 0.5}
    out = fxsparse.transform(model, masks)
    out.train()  # the train graph's code made too, before the fold
    out.eval()
    folded = fxsparse.fold(out, inplace=inplace)
    reference = fake_sparsity_on_every_name(model, masks)
    x = torch.randn(16, 8)
    for training in (True, False, True):
        assert torch.equal(seeded(folded, training, x), seeded(reference, training, x))
        assert "torch.mul" not in folded.code
    unfolded = fxsparse.unfold(folded, inplace=inplace)
    for training in (True, False):
        assert torch.equal(seeded(unfolded, training, x), seeded(reference, training, x))
        assert "torch.mul" in unfolded.code


def test_update_masks_on_a_folded_output_unprunes_from_zero() -> None:
    """The documented difference: FakeSparsity brings back the raw value it kept; folded starts at zero."""
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    first, second = torch.rand(8, 8) > 0.5, torch.rand(8, 8) > 0.5
    folded = fxsparse.transform(model, {"weight": first}, fold=True)
    reference = fake_sparsity_on_every_name(model, {"weight": first})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newly pruned entries, no optimizer: warned, tested below
        fxsparse.update_masks(folded, {"weight": second})
    fxsparse.update_masks(reference, {"weight": second})
    unpruned, kept = second & ~first, second & first
    assert bool(unpruned.any())
    assert not bool(folded.weight[unpruned].any())  # starts from zero
    assert torch.equal(reference.weight[unpruned], model.weight[unpruned])  # FakeSparsity: the kept value
    assert torch.equal(folded.weight[kept], reference.weight[kept])
    assert not bool(folded.weight[~second].any())  # newly pruned: zero
    assert torch.equal(fxsparse.masks.of(folded)["weight"], second)


def test_update_masks_on_a_folded_output_zeroes_the_optimizers_state_where_it_prunes() -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    folded = fxsparse.transform(model, {"weight": torch.ones(8, 8, dtype=torch.bool)}, fold=True)
    optimizer = torch.optim.Adam(folded.parameters(), lr=0.1)
    folded(x).square().mean().backward()
    optimizer.step()
    half = torch.rand(8, 8) > 0.5
    with pytest.warns(UserWarning, match=r"prunes new entries of the folded weights weight.*Pass optimizer="):
        fxsparse.update_masks(copy.deepcopy(folded), {"weight": half})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxsparse.update_masks(folded, {"weight": half}, optimizer=optimizer)
    for _ in range(3):
        optimizer.zero_grad()
        folded(x).square().mean().backward()
        optimizer.step()
    assert not bool(folded.weight[~half].any())  # the pruned entries stayed zero
    assert bool(folded.weight[half].all())


def test_a_nan_under_a_pruned_entry_is_gone_when_folded() -> None:
    """The documented difference: FakeSparsity computes 0 * nan = nan; a folded weight holds zero there."""
    model = nn.Linear(4, 2)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 1] = mask[1, 2] = False
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
        model.weight[1, 2] = float("inf")
    x = torch.randn(3, 4)
    assert bool(fake_sparsity_on_every_name(model, {"weight": mask})(x).isnan().any())
    assert bool(fxsparse.transform(model, {"weight": mask})(x).isnan().any())  # the masked graph: as FakeSparsity
    folded = fxsparse.transform(model, {"weight": mask}, fold=True)
    assert bool(torch.isfinite(folded(x)).all())
    assert torch.equal(folded(x), torch.nn.functional.linear(x, model.weight.nan_to_num(0, 0, 0), model.bias))


def test_fold_refuses_a_soft_mask_naming_the_parameter() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    soft = {"0.weight": torch.ones(4, 4), "1.weight": torch.full((4, 4), 0.5)}
    with pytest.raises(fxsparse.MaskError, match=r"mask for '1\.weight' has values other than 0 and 1"):
        fxsparse.transform(model, soft, fold=True)
    out = fxsparse.transform(model, soft)
    with pytest.raises(fxsparse.MaskError, match=r"mask for '1\.weight' has values other than 0 and 1"):
        fxsparse.fold(out)
    assert "torch.mul" in out.code  # refused before anything changed
    folded = fxsparse.transform(model, {"0.weight": torch.ones(4, 4), "1.weight": torch.ones(4, 4)}, fold=True)
    with pytest.raises(fxsparse.MaskError, match=r"mask for '0\.weight' has values other than 0 and 1"):
        fxsparse.update_masks(folded, {"0.weight": torch.full((4, 4), 0.5)})
    assert bool((fxsparse.masks.of(folded)["0.weight"] == 1).all())


def test_fold_with_share_weights_refuses_and_fold_inplace_is_the_explicit_way() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    raw = model.weight.detach().clone()
    mask = torch.rand(4, 4) > 0.5
    with pytest.raises(
        fxsparse.MaskError, match=r"fold=True with share_weights=True.*fxsparse.fold\(out, inplace=True\)"
    ):
        fxsparse.transform(model, {"weight": mask}, share_weights=True, fold=True)
    shared = fxsparse.transform(model, {"weight": mask}, share_weights=True)
    copied = fxsparse.fold(shared)
    assert torch.equal(model.weight, raw) and not bool(copied.weight[~mask].any())  # a copy: the model untouched
    fxsparse.fold(shared, inplace=True)  # asked for: the shared weights are folded, the model's too
    assert torch.equal(model.weight, raw * mask)


def test_fold_refuses_other_emits_and_a_folded_output_transformed_again() -> None:
    model = nn.Linear(4, 4)
    with pytest.raises(fxsparse.EmitError, match=r"fold=True makes a model to train.*emit='script'"):
        fxsparse.transform(model, {"weight": torch.ones(4, 4)}, fold=True, emit="script")
    with pytest.raises(fxsparse.MaskError, match="fold must be True or False, got 'yes'"):
        fxsparse.transform(model, {"weight": torch.ones(4, 4)}, fold="yes")  # type: ignore[arg-type]
    folded = fxsparse.transform(model, {"weight": torch.ones(4, 4)}, fold=True)
    with pytest.raises(fxsparse.MaskError, match=r"this output is folded.*fxsparse.unfold\(out\)"):
        fxsparse.transform(folded, {"bias": torch.ones(4)})


def test_fold_of_an_emitted_artifact_says_where_to_fold_instead() -> None:
    model, masks, x = nn.Sequential(nn.Linear(4, 4)), {"0.weight": torch.ones(4, 4)}, torch.randn(2, 4)
    program = fxsparse.transform(model, masks, emit="export", example_inputs=(x,))
    with pytest.raises(TypeError, match=r"got ExportedProgram: fold works on the graph before it is emitted.*"
                       r"fold=True.*fxsparse.freeze\(out, emit=...\)"):  # fmt: skip
        fxsparse.fold(program)  # type: ignore[arg-type]
    parametrized = fxsparse.transform(model, masks, emit="parametrize")
    with pytest.raises(TypeError, match=r"got Sequential: fxsparse.transform\(model, masks, fold=True\) makes one"):
        fxsparse.fold(parametrized)  # type: ignore[arg-type]


class _Allocations(TorchDispatchMode):
    """Counts the bytes of every tensor an operator makes (outputs that are not views of an input)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        result = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in torch.utils._pytree.tree_leaves(result):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.bytes += t.untyped_storage().nbytes()
        return result


def test_freeze_of_a_folded_output_in_place_allocates_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    masks = {"0.weight": torch.rand(64, 64) > 0.5, "1.weight": torch.rand(64, 64) > 0.5}
    x = torch.randn(2, 64)
    folded = fxsparse.transform(model, masks, fold=True)
    expected = folded(x)
    weights = [p.data_ptr() for p in folded.parameters()]
    with _Allocations() as counted:
        frozen = fxsparse.freeze(folded, inplace=True)
    assert counted.bytes == 0
    assert [p.data_ptr() for p in frozen.parameters()] == weights
    assert torch.equal(frozen(x), expected) and not any(k.endswith("_mask") for k in frozen.state_dict())
    masked = fxsparse.transform(model, masks)  # the masked graph's freeze computes each product once
    with _Allocations() as counted:
        fxsparse.freeze(masked, inplace=True)
    assert counted.bytes > 0


def test_adafactor_keeps_folded_weights_pruned_but_is_not_fake_sparsitys() -> None:
    """Adafactor scales its step by the weight's root mean square, over every entry: FakeSparsity's
    raw values under pruned entries count there, a folded weight's zeros here. Sparsity is kept
    (its update is the gradient's, scaled), bit-for-bit equality with FakeSparsity is not."""
    model, masks, batches = zoo_case("nested_sequential")
    folded, reference = fxsparse.transform(model, masks, fold=True), fake_sparsity_on_every_name(model, masks)
    optimizers = [torch.optim.Adafactor(m.parameters(), lr=0.01) for m in (folded, reference)]
    for inputs in batches:
        for module, optimizer in zip((folded, reference), optimizers, strict=True):
            optimizer.zero_grad()
            positional(module, inputs).backward()
            optimizer.step()
    names = every_name(model, masks)
    for name in names:
        assert not bool(folded.get_parameter(name)[fxsparse.masks.of(folded)[name] == 0].any())
    assert not all(torch.equal(folded.get_parameter(name), effective(reference, name)) for name in names)


def test_muon_does_not_qualify_it_moves_pruned_entries_of_a_folded_weight() -> None:
    """Muon orthogonalizes each update matrix: entries with zero gradient get nonzero updates. Under
    FakeSparsity the mask hides them; a folded weight would hold them (docs/distributed.md says so)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 4, bias=False))
    masks = {"0.weight": torch.rand(8, 8) > 0.5}
    folded = fxsparse.transform(model, masks, fold=True)
    optimizer = torch.optim.Muon(folded.parameters(), lr=0.02)
    folded(torch.randn(4, 8)).square().mean().backward()
    assert not bool(folded.get_parameter("0.weight").grad[~masks["0.weight"]].any())  # the gradient is masked
    optimizer.step()
    assert bool(folded.get_parameter("0.weight")[~masks["0.weight"]].any())  # but the update is not


@pytest.mark.parametrize("fold_first", [False, True], ids=["masked", "folded"])
def test_freeze_in_place_after_a_mode_switch_runs_the_frozen_graph_in_both_modes(fold_first: bool) -> None:
    """An output switched to train mode and back holds the train graph's code, made before the freeze:
    the frozen model must not run it (it read the mask buffers the freeze removed)."""
    from test_training import StochasticDepthBlock, seeded

    torch.manual_seed(0)
    model = StochasticDepthBlock().eval()
    masks = {"fc.weight": torch.rand(8, 8) > 0.5}
    out = fxsparse.transform(model, masks, fold=fold_first)
    out.train()
    out.eval()
    frozen = fxsparse.freeze(out, inplace=True)
    reference = fake_sparsity_on_every_name(model, masks)
    x = torch.randn(16, 8)
    for training in (True, False):
        assert torch.equal(seeded(frozen, training, x), seeded(reference, training, x))


def test_a_folded_weights_second_derivative_is_fake_sparsitys() -> None:
    """Gradient penalties differentiate the gradient (create_graph=True): masked the same way."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    masks = {"0.weight": torch.rand(4, 4) > 0.5}
    folded, reference = fxsparse.transform(model, masks, fold=True), fake_sparsity_on_every_name(model, masks)
    x = torch.randn(3, 4)
    results = []
    for module, weight in (
        (folded, folded.get_parameter("0.weight")),
        (reference, original_parameters(reference)["0.weight"]),
    ):
        (gradient,) = torch.autograd.grad(module(x).sum(), weight, create_graph=True)
        (second,) = torch.autograd.grad(gradient.square().sum(), weight)
        results.append((gradient.detach(), second))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("how", ["directly", "nested in a parent", "after pickling"])
def test_a_state_dict_loaded_into_a_folded_output_is_folded_again(how: str) -> None:
    """A masked output's (or a FakeSparsity model's) state dict holds values under pruned entries;
    the folded graph reads its weights as they are, so loading must zero them again."""
    from reference import fake_sparsity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    masks = {"0.weight": torch.rand(6, 6) > 0.5, "2.weight": torch.rand(3, 6) > 0.5}
    folded = fxsparse.transform(model, masks, fold=True)
    if how == "after pickling":
        folded = pickle.loads(pickle.dumps(folded))
    trained = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))  # other weights, same masks
    state = fxsparse.transform(trained, masks).state_dict()
    if how == "nested in a parent":
        parent = nn.ModuleDict({"net": folded})
        parent.load_state_dict({f"net.{key}": value for key, value in state.items()})
    else:
        folded.load_state_dict(state)
    x = torch.randn(4, 6)
    assert torch.equal(folded(x), fake_sparsity(trained, masks)(x))
    assert not folded.get_parameter("0.weight")[~masks["0.weight"]].any()


def test_a_gradient_from_outside_the_graph_is_not_masked_and_the_masked_product_is_fake_sparsitys() -> None:
    """Documented difference: the graph masks the gradients of its own uses of a folded weight; a
    loss term computed outside it on the parameter itself (a regularizer on out.get_parameter)
    sends its gradient to the pruned entries too, which then leave zero. The same term on
    mask * weight (what FakeSparsity's attribute is) keeps every step FakeSparsity's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    masks = {"0.weight": torch.rand(6, 6) > 0.5, "2.weight": torch.rand(3, 6) > 0.5}
    x = torch.randn(4, 6)

    folded = fxsparse.transform(model, masks, fold=True)
    raw = folded.get_parameter("0.weight")
    (folded(x).square().mean() + (raw - 0.3).square().sum()).backward()
    assert folded.get_parameter("0.weight").grad[~masks["0.weight"]].any()  # what the docs warn about

    folded = fxsparse.transform(model, masks, fold=True)
    reference = fake_sparsity_on_every_name(model, masks)

    def step(module: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        if module is folded:
            weight = fxsparse.masks.of(folded)["0.weight"] * folded.get_parameter("0.weight")
        else:
            weight = effective(reference, "0.weight")
        return module(inputs["x"]).square().mean() + (weight - 0.3).square().sum()

    assert_steps_match(folded, reference, list(masks), [{"x": x}] * 3, QUALIFYING["adamw"], step)


class _ScalesItsWeightInPlace(nn.Module):
    """A forward that writes into the weight it reads: FakeSparsity's is a fresh mask * weight, a
    folded graph's the parameter itself, which each call (in no_grad) would change again."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.lin.weight.t()
        weight.mul_(2)
        return x @ weight


@pytest.mark.parametrize("how", ["transform", "fold", "fold in place"])
def test_fold_refuses_a_graph_that_writes_into_a_folded_weight(how: str) -> None:
    torch.manual_seed(0)
    model = _ScalesItsWeightInPlace()
    masks = {"lin.weight": torch.rand(4, 4) > 0.5}
    out = fxsparse.transform(model, masks)
    before = out.get_parameter("lin.weight").clone()
    with pytest.raises(fxsparse.MaskError, match=r"'lin.weight'.*mul_"):
        if how == "transform":
            fxsparse.transform(model, masks, fold=True)
        else:
            fxsparse.fold(out, inplace=how == "fold in place")
    assert torch.equal(out.get_parameter("lin.weight"), before)  # refused before anything was zeroed
    with torch.no_grad():  # the masked graph multiplies into a fresh tensor: FakeSparsity's, call after call
        reference = fake_sparsity_on_every_name(model, masks)
        for _ in range(2):
            x = torch.randn(2, 4)
            assert torch.equal(out(x), reference(x))


class _ScalesRowsOfItsWeightInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.lin.weight[:2].mul_(2)  # aten.slice in an exported graph
        return x @ self.lin.weight.t()


@pytest.mark.parametrize("model_class", [_ScalesItsWeightInPlace, _ScalesRowsOfItsWeightInPlace])
def test_fold_refuses_an_exported_graph_that_writes_into_a_folded_weight_through_aten_ops(
    model_class: type[nn.Module],
) -> None:
    # torch.export keeps the write as aten.mul_.Tensor and the views as aten.t.default/aten.slice.Tensor:
    # matched by the operator's name with its overload, none was seen, and each call doubled the weight.
    torch.manual_seed(0)
    model = model_class().requires_grad_(False)  # export refuses the write into a grad leaf
    masks = {"lin.weight": torch.rand(4, 4) > 0.5}
    with pytest.raises(fxsparse.MaskError, match=r"'lin.weight'.*mul_"):
        fxsparse.transform(model, masks, capture="export", example_inputs=(torch.randn(2, 4),), fold=True)
