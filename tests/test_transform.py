"""transform(...) against FakeSparsity and eager torch, bitwise, over the zoo and every emit."""

from __future__ import annotations

import copy
import functools
import threading

import pytest
import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize

import fxsparse

from reference import eager, fake_sparsity, fake_sparsity_on_every_name, torchscript
from zoo import MASK_KINDS, ZOO, build, inputs, make_masks, parameter_name

DTYPES = [torch.float32, torch.float64]
UNTIED = [name for name, case in ZOO.items() if not case.tied]


def run(out: object, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if isinstance(out, torch.export.ExportedProgram):
        return out.module()(*args)  # type: ignore[no-any-return]
    return out(*args)  # type: ignore[operator,no-any-return]


def snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "modules": [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)],
    }


def assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["ids"] == before["ids"]
    state_after, state_before = after["state"], before["state"]
    assert state_after.keys() == state_before.keys()  # type: ignore[attr-defined]
    for key in state_before:  # type: ignore[attr-defined]
        assert torch.equal(state_after[key], state_before[key]), key  # type: ignore[index]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("name", list(ZOO))
def test_graph_equals_reference(name: str, kind: str, dtype: torch.dtype) -> None:
    case = ZOO[name]
    model = build(case, dtype)
    masks = make_masks(model, case, kind)
    args = inputs(case, dtype)
    before = snapshot(model)
    expected_plain = model(*args)

    out = fxsparse.transform(model, masks)

    assert isinstance(out, torch.fx.GraphModule)
    assert torch.equal(out(*args), eager(model, masks, *args))
    if not case.tied:
        assert torch.equal(out(*args), fake_sparsity(model, masks)(*args))
    assert_unchanged(model, before)
    assert torch.equal(model(*args), expected_plain)


EMITS = ["graph", "parametrize", "script", "trace", "export"]


@pytest.mark.parametrize("kind", ["random", "zeros", "ones"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("emit", EMITS)
@pytest.mark.parametrize("name", list(ZOO))
def test_every_emit_equals_reference(name: str, emit: str, dtype: torch.dtype, kind: str) -> None:
    case = ZOO[name]
    model = build(case, dtype)
    masks = make_masks(model, case, kind)
    args = inputs(case, dtype)
    before = snapshot(model)
    if emit == "script" and not case.scriptable:
        with pytest.raises(fxsparse.EmitError, match=r"cannot compile .*has forward hooks"):
            fxsparse.transform(model, masks, emit=emit)
        return

    out = fxsparse.transform(model, masks, emit=emit, example_inputs=args)

    expected = eager(model, masks, *args)
    if not case.tied:
        assert torch.equal(expected, fake_sparsity(model, masks)(*args))
    result = run(out, args)
    if emit in ("script", "trace"):
        # TorchScript's own kernels (its addmm runs as mm + add on some CPUs) may differ from eager
        # in the last bit with no mask at all: fxsparse guarantees TorchScript of the masked model.
        assert torch.equal(result, torchscript(model, masks, emit, *args)(*args))
        torch.testing.assert_close(result, expected)
    else:
        assert torch.equal(result, expected)
    assert_unchanged(model, before)
    model_storages = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    out_state = out.state_dict() if not isinstance(out, torch.export.ExportedProgram) else out.state_dict
    assert not model_storages & {t.untyped_storage().data_ptr() for t in out_state.values()}


@pytest.mark.parametrize("name", list(ZOO))
def test_state_dict_is_model_keys_plus_masks(name: str) -> None:
    case = ZOO[name]
    model = build(case)
    masks = make_masks(model, case, "random")
    out = fxsparse.transform(model, masks)
    state = out.state_dict()
    model_state = model.state_dict()
    for key, value in model_state.items():
        assert torch.equal(state[key], value), key
    mask_keys = {parameter_name(model, key) + "_mask" for key in masks}
    extra = set(state) - set(model_state)
    if name == "shared_module":  # the mask buffer lives on a module registered under two names
        mask_keys |= {"second.weight_mask"}
    assert extra == mask_keys
    for key, mask in masks.items():
        assert torch.equal(state[parameter_name(model, key) + "_mask"], mask)


def test_graph_fetches_each_masked_parameter_once_and_multiplies_once() -> None:
    case = ZOO["linear_called_twice"]
    model = build(case)
    out = fxsparse.transform(model, make_masks(model, case, "random"))
    muls = [n for n in out.graph.nodes if n.target is torch.mul]
    assert [n.meta["fxsparse"]["param"] for n in muls] == ["shared.weight", "out.weight"]
    shared_mul = muls[0]
    assert len(shared_mul.users) == 2  # both calls of the Linear read the same product
    weights = [n for n in out.graph.nodes if n.op == "get_attr" and n.target == "shared.weight"]
    assert len(weights) == 1
    assert not [n for n in out.graph.nodes if n.op == "call_module" and n.target in ("shared", "out")]
    linears = [n for n in out.graph.nodes if n.target is torch.nn.functional.linear]
    assert [n.meta["fxsparse"] for n in linears] == [
        {"role": "opened", "module": m} for m in ("shared", "shared", "out")
    ]


def test_every_created_node_is_tagged() -> None:
    case = ZOO["seed_model"]
    model = build(case)
    plain = torch.fx.symbolic_trace(model)
    out = fxsparse.transform(model, make_masks(model, case, "random"))
    plain_names = {n.name: (n.op, n.target) for n in plain.graph.nodes}
    for node in out.graph.nodes:
        if plain_names.get(node.name) != (node.op, node.target):
            assert node.meta["fxsparse"]["role"] in fxsparse.ROLES, node
    roles = sorted(n.meta["fxsparse"]["role"] for n in out.graph.nodes if "fxsparse" in n.meta)
    assert roles == sorted(["weight", "mask", "masked", "param", "opened"] * 3)


def test_tied_parameter_is_masked_at_every_use_and_stays_tied() -> None:
    case = ZOO["tied_embedding_head"]
    model = build(case)
    masks = make_masks(model, case, "random")
    args = inputs(case)
    out = fxsparse.transform(model, masks)
    assert out.embed.weight is out.lm_head.weight
    assert isinstance(out.embed.weight, nn.Parameter)
    assert torch.equal(out(*args), eager(model, masks, *args))
    # FakeSparsity on the named module alone masks one use only: fxsparse differs from it on purpose.
    assert not torch.equal(out(*args), fake_sparsity(model, masks)(*args))
    products = [n for n in out.graph.nodes if n.target is torch.mul and n.meta["fxsparse"]["param"] == "lm_head.weight"]
    assert len(products) == 1 and len(products[0].users) == 2


@pytest.mark.parametrize("alias", ["embed.weight", "lm_head.weight", "embed", "lm_head"])
def test_any_alias_of_a_tied_parameter_masks_it(alias: str) -> None:
    case = ZOO["tied_embedding_head"]
    model = build(case)
    mask = (torch.rand(20, 8) > 0.5).float()
    args = inputs(case)
    out = fxsparse.transform(model, {alias: mask})
    assert torch.equal(out(*args), eager(model, {"embed.weight": mask}, *args))
    assert out.embed.weight is out.lm_head.weight
    assert [k for k in out.state_dict() if k.endswith("_mask")] == [parameter_name(model, alias) + "_mask"]


def test_two_keys_for_one_tied_parameter_are_refused() -> None:
    model = build(ZOO["tied_embedding_head"])
    mask = torch.ones(20, 8)
    with pytest.raises(fxsparse.MaskError, match="name the same parameter"):
        fxsparse.transform(model, {"embed.weight": mask, "lm_head": mask})


def test_emit_parametrize_registers_fake_sparsity() -> None:
    case = ZOO["seed_model"]
    model = build(case)
    out = fxsparse.transform(model, make_masks(model, case, "random"), emit="parametrize")
    for name in ("linear", "seq.0", "seq.1"):
        assert parametrize.is_parametrized(out.get_submodule(name), "weight")
        assert not parametrize.is_parametrized(model.get_submodule(name))


def test_input_graph_module_is_accepted() -> None:
    case = ZOO["nested_sequential"]
    model = build(case)
    traced = torch.fx.symbolic_trace(model)
    masks = make_masks(model, case, "random")
    args = inputs(case)
    before = snapshot(traced)
    code_before = traced.code
    out = fxsparse.transform(traced, masks)
    assert torch.equal(out(*args), fake_sparsity(model, masks)(*args))
    assert_unchanged(traced, before)
    assert traced.code == code_before


def test_masks_none_lowers_fake_sparsity_parametrizations() -> None:
    case = ZOO["seed_model"]
    model = build(case)
    masks = make_masks(model, case, "random")
    prepared = fake_sparsity(model, masks)
    args = inputs(case)
    before = snapshot(prepared)
    out = fxsparse.transform(prepared)
    assert torch.equal(out(*args), prepared(*args))
    assert_unchanged(prepared, before)
    assert parametrize.is_parametrized(prepared.linear, "weight")
    for key, mask in masks.items():
        assert torch.equal(out.state_dict()[key + "_mask"], mask)
        assert torch.equal(out.state_dict()[key], model.state_dict()[key])
    assert not any("parametrizations" in k for k in out.state_dict())


@pytest.mark.parametrize("key", ["seq.1", "seq.1.parametrizations.weight.original"])
def test_explicit_mask_replaces_an_inherited_one(key: str) -> None:
    case = ZOO["seed_model"]
    model = build(case)
    prepared = fake_sparsity(model, make_masks(model, case, "random"))
    zeros = torch.zeros(16, 16)
    out = fxsparse.transform(prepared, {key: zeros})
    assert torch.equal(out.state_dict()["seq.1.weight_mask"], zeros)
    assert torch.equal(out.state_dict()["linear.weight_mask"], prepared.linear.parametrizations.weight[0].mask)


def test_masks_are_copied() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    mask = torch.ones(4, 4)
    out = fxsparse.transform(model, {"0": mask})
    mask.zero_()
    assert torch.equal(out.state_dict()["0.weight_mask"], torch.ones(4, 4))


def test_mask_dtypes_follow_the_documented_rule() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    masks = {
        "0": torch.rand(4, 4) > 0.5,  # bool stays bool
        "1": (torch.rand(4, 4) > 0.5).to(torch.float16),  # cast to the parameter's dtype
        "2": (torch.rand(4, 4) > 0.5).to(torch.uint8),  # integers too
    }
    out = fxsparse.transform(model, masks)
    state = out.state_dict()
    assert state["0.weight_mask"].dtype == torch.bool
    assert state["1.weight_mask"].dtype == torch.float64
    assert state["2.weight_mask"].dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in out.parameters())
    assert torch.equal(out(x), fake_sparsity(model, masks)(x))


def test_masks_are_moved_to_the_parameter_device() -> None:
    model = nn.Sequential(nn.Linear(4, 4)).to("meta")
    out = fxsparse.transform(model, {"0": torch.ones(4, 4)})
    assert out.state_dict()["0.weight_mask"].device.type == "meta"


def test_empty_masks_give_a_traced_copy() -> None:
    case = ZOO["seed_model"]
    model = build(case)
    out = fxsparse.transform(model, {})
    args = inputs(case)
    assert torch.equal(out(*args), model(*args))
    assert out.state_dict().keys() == model.state_dict().keys()


def test_bare_linear_is_the_root() -> None:
    model = nn.Linear(4, 3)
    mask = (torch.rand(3, 4) > 0.5).float()
    x = torch.randn(2, 4)
    for key in ("weight", ""):
        out = fxsparse.transform(model, {key: mask})
        assert torch.equal(out(x), fake_sparsity(model, {"weight": mask})(x))
        assert "weight_mask" in out.state_dict()


def test_training_mode_is_kept_and_gradients_flow_as_with_fake_sparsity() -> None:
    case = ZOO["seed_model"]
    model = build(case).train()
    masks = make_masks(model, case, "random")
    out = fxsparse.transform(model, masks)
    reference = fake_sparsity(model, masks)
    assert out.training
    args = inputs(case)
    out(*args).sum().backward()
    reference(*args).sum().backward()
    for key in masks:
        grad = out.get_parameter(key).grad
        owner = reference.get_submodule(key.rpartition(".")[0])
        assert torch.equal(grad, owner.parametrizations.weight.original.grad)
    assert out.get_buffer("linear.weight_mask").grad is None


def test_deepcopy_of_input_unaffected_by_transform_of_copy() -> None:
    case = ZOO["seed_model"]
    model = build(case)
    twin = copy.deepcopy(model)
    fxsparse.transform(model, make_masks(model, case, "zeros"))
    args = inputs(case)
    assert torch.equal(model(*args), twin(*args))


# -- issue 13: tied FakeSparsity masks, copying like deepcopy --------------------------------


class TiedLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def tied_with_fake_sparsity(mask_a: torch.Tensor | None, mask_b: torch.Tensor | None) -> TiedLinears:
    """FakeSparsity registered on each alias of the tied weight (torch shares one ``original`` between them)."""
    from torch.ao.pruning import FakeSparsity

    model = TiedLinears()
    for module, mask in ((model.a, mask_a), (model.b, mask_b)):
        if mask is not None:
            parametrize.register_parametrization(module, "weight", FakeSparsity(mask))
    if mask_a is not None and mask_b is not None:
        assert model.a.parametrizations.weight.original is model.b.parametrizations.weight.original
    return model


def test_lowering_refuses_tied_aliases_with_different_masks() -> None:
    torch.manual_seed(1)
    first = torch.rand(6, 6) > 0.5
    model = tied_with_fake_sparsity(first, ~first)
    with pytest.raises(
        fxsparse.MaskError, match=r"'a\.weight' and 'b\.weight' are one tied parameter with a different"
    ):
        fxsparse.transform(model)
    with pytest.raises(fxsparse.MaskError, match=r"'a\.weight' and 'b\.weight'"):
        fxsparse.plan(model)
    one_alias_only = tied_with_fake_sparsity(first, None)  # the other use reads the weight unmasked
    with pytest.raises(fxsparse.MaskError, match=r"FakeSparsity mask on 'a\.weight' only"):
        fxsparse.transform(one_alias_only)


def test_lowering_takes_equal_masks_on_tied_aliases_as_one() -> None:
    torch.manual_seed(1)
    mask = (torch.rand(6, 6) > 0.5).float()
    model = tied_with_fake_sparsity(mask, mask.clone())
    x = torch.randn(3, 6)
    out = fxsparse.transform(model)
    assert torch.equal(out(x), model(x))
    assert out.a.weight is out.b.weight
    assert [k for k in out.state_dict() if k.endswith("_mask")] == ["a.weight_mask"]


class RebuildsALock(nn.Module):
    """Holds a lock (which deepcopy cannot copy) that its pickling hooks leave out and rebuild."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            return self.fc(x)

    def __getstate__(self) -> dict[str, object]:
        state = dict(super().__getstate__())
        del state["lock"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        super().__setstate__(state)
        self.lock = threading.Lock()


class ReducesToItsConstructor(nn.Module):
    """Holds a generator (which deepcopy cannot copy); ``__reduce_ex__`` rebuilds it from its weights."""

    def __init__(self, state: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        if state is not None:
            self.fc.load_state_dict(state)
        self.counter = (i for i in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def __reduce_ex__(self, protocol: object) -> tuple[object, ...]:
        return (type(self), ({k: v.clone() for k, v in self.fc.state_dict().items()},), None)


@pytest.mark.parametrize("make", [RebuildsALock, ReducesToItsConstructor])
def test_copy_model_honours_pickling_hooks_as_deepcopy_does(make: type[nn.Module]) -> None:
    model = nn.Sequential(make(), nn.ReLU())
    copy.deepcopy(model)  # deepcopy copies it
    mask = (torch.rand(4, 4) > 0.5).float()
    out = fxsparse.transform(model, {"0.fc.weight": mask})
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(out(x), fake_sparsity(model, {"0.fc.weight": mask})(x))


class _ClosureOverSubmodule(nn.Module):
    """Stores a function closing over a submodule (minGPT's Block.mlpf), as the minimal form."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        fc = self.fc
        self.f = lambda x: fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)  # type: ignore[no-any-return]


class _MinGPTBlock(nn.Module):
    """minGPT's Block (MIT, Karpathy), attention left out: its MLP is a lambda over a ModuleDict."""

    def __init__(self, n_embd: int = 8) -> None:
        super().__init__()
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.ModuleDict(
            {
                "c_fc": nn.Linear(n_embd, 4 * n_embd),
                "c_proj": nn.Linear(4 * n_embd, n_embd),
                "act": nn.GELU(),
                "dropout": nn.Dropout(0.0),
            }
        )
        m = self.mlp
        self.mlpf = lambda x: m.dropout(m.c_proj(m.act(m.c_fc(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlpf(self.ln_2(x))  # type: ignore[no-any-return]


@pytest.mark.parametrize("capture", ["fx", "export", "auto"])
@pytest.mark.parametrize("factory", [_ClosureOverSubmodule, _MinGPTBlock])
def test_functions_stored_on_modules_run_the_copy_with_its_masks(capture: str, factory: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = factory().eval()
    masks = {n: (torch.rand(p.shape) > 0.5).float() for n, p in model.named_parameters() if n.endswith("weight")}
    x = torch.randn(2, 8 if factory is _MinGPTBlock else 4)
    expected = eager(model, masks, x)  # functional_call runs the model itself: its closures see the swap
    out = fxsparse.transform(model, masks, capture=capture, example_inputs=(x,))
    y = out(x)
    assert torch.equal(y, expected)
    readers = {n.meta["fxsparse"]["param"] for n in out.graph.nodes if n.meta.get("fxsparse", {}).get("role") == "mask"}
    assert readers == set(masks)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()  # the output must not share anything with the model
    assert torch.equal(out(x), y)


def _hooked_by_a_closure(as_partial: bool) -> nn.Module:
    """A forward hook closing over the module it hooks, reading its (masked) weight: a lambda, or
    a functools.partial of a closure, kept in the module's hook registry, not as an attribute."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    fc = model[0]

    def shift(scale: float, module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        return output + scale * fc.weight.sum()

    fc.register_forward_hook(functools.partial(shift, 2.0) if as_partial else lambda m, i, o: shift(2.0, m, i, o))
    return model


@pytest.mark.parametrize("as_partial", [False, True], ids=["lambda", "partial"])
def test_hooks_closing_over_the_models_modules_run_the_copys(as_partial: bool) -> None:
    masks = {"0.weight": (torch.rand(4, 4) > 0.5).float()}
    x = torch.randn(2, 4)
    reference = fake_sparsity_on_every_name(_hooked_by_a_closure(as_partial), masks, in_place=True)
    model = _hooked_by_a_closure(as_partial)
    out = fxsparse.transform(model, masks)
    y = out(x)
    assert torch.equal(y, reference(x))  # the hook reads the weight swapped in: masked, as FakeSparsity's does
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()  # the output must not share anything with the model
    assert torch.equal(out(x), y)


_REGISTRY: dict[str, nn.Module] = {}


class _ThroughAGlobal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        _REGISTRY["fc"] = self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _REGISTRY["fc"](x)


def test_a_graph_reading_the_original_model_is_refused() -> None:
    model = _ThroughAGlobal()
    x = torch.randn(2, 4)
    with pytest.raises(fxsparse.TraceError, match=r"reads the model's own tensor 'fc\.weight'.*through self"):
        fxsparse.transform(model, {"fc": torch.ones(4, 4)}, capture="export", example_inputs=(x,))


class _HoldsModule:
    def __init__(self, module: nn.Module) -> None:
        self.module = module


class _ClosureOverAnObject(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        holder = _HoldsModule(self.fc)
        self.f = lambda x: holder.module(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)  # type: ignore[no-any-return]


def test_a_closure_the_copy_cannot_follow_is_refused_by_name() -> None:
    with pytest.raises(
        fxsparse.TraceError, match=r"function 'f' stored on module '\(root\)', closure variable 'holder'"
    ):
        fxsparse.transform(_ClosureOverAnObject(), {"fc": torch.ones(4, 4)})
