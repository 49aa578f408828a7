"""How each kind of module holding a masked parameter is handled: opened, traced into, or kept.

torch.nn modules whose forward FX cannot trace (control flow on input shapes) stay leaf
calls, run with their masked parameters swapped in; every emit but TorchScript works.
"""

from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch
from torch import nn

import fxsparse

from reference import fake_sparsity

pytestmark = [
    # torch.jit.trace warns about the shape-dependent Python control flow inside these torch modules.
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    # Swapping LSTM weights for the call reassigns its _flat_weights list; export notes it and is right.
    pytest.mark.filterwarnings("ignore:The tensor attributes self.lstm._flat_weights:UserWarning"),
]


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.attention(x, x, x, need_weights=False)[0])


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0])


KEPT = {
    "transformer_encoder_layer": (
        lambda: nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)),
        ("0.linear1", "0.self_attn.out_proj.weight", "0.self_attn.in_proj_weight"),
        (2, 5, 8),
        {"0"},
    ),
    "multihead_attention": (
        Attention,
        ("attention.in_proj_weight", "attention.out_proj", "out"),
        (2, 5, 8),
        {"attention"},
    ),
    "batch_norm": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
        ("0", "1.weight"),
        (2, 3, 6, 6),
        {"1"},
    ),
    "lstm": (Recurrent, ("lstm.weight_ih_l0", "head"), (2, 3, 8), {"lstm"}),
}


def build(name: str) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    factory, keys, shape, _ = KEPT[name]
    torch.manual_seed(0)
    model = factory().eval()
    names = dict(model.named_parameters())
    masks = {k: (torch.rand(names[k if k in names else f"{k}.weight"].shape) > 0.5).float() for k in keys}
    return model, masks, torch.randn(*shape)


@pytest.mark.parametrize("emit", ["graph", "parametrize", "trace", "export"])
@pytest.mark.parametrize("name", list(KEPT))
def test_kept_modules_equal_fake_sparsity(name: str, emit: str) -> None:
    model, masks, x = build(name)
    # In eval mode without grad, torch's attention modules take a fused fast path. jit.trace
    # checks its trace under no_grad, so trace there throughout; the others run with grad.
    with torch.no_grad() if emit == "trace" else contextlib.nullcontext():
        expected = fake_sparsity(model, masks)(x)
        out = fxsparse.transform(model, masks, emit=emit, example_inputs=(x,))
        result = out.module()(x) if emit == "export" else out(x)
    assert torch.equal(result, expected)


@pytest.mark.parametrize("name", list(KEPT))
def test_kept_modules_are_named_in_the_plan_and_graph(name: str) -> None:
    model, masks, x = build(name)
    out = fxsparse.transform(model, masks)
    called = {
        n.meta["fxsparse"]["module"] for n in out.graph.nodes if n.meta.get("fxsparse", {}).get("role") == "called"
    }
    assert called == KEPT[name][3]
    for clone in (copy.deepcopy(out), pickle.loads(pickle.dumps(out))):
        assert torch.equal(clone(x), out(x))


def test_script_refuses_kept_modules_clearly() -> None:
    model, masks, _ = build("multihead_attention")
    expected = r"cannot compile .*'attention' its forward cannot be traced.*use emit='trace' or emit='export'"
    with pytest.raises(fxsparse.EmitError, match=expected):
        fxsparse.transform(model, masks, emit="script")


def test_traceable_torch_modules_are_traced_into_not_kept() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv1d(1, 1, 3, padding_mode="reflect", padding=1))
    masks = {"1.weight": torch.rand(4) > 0.5, "2.weight": torch.rand(1, 1, 3) > 0.5}
    out = fxsparse.transform(model, masks)
    x = torch.randn(3, 1, 4)
    assert torch.equal(out(x), fake_sparsity(model, masks)(x))
    roles = {n.meta["fxsparse"]["role"] for n in out.graph.nodes if "fxsparse" in n.meta}
    assert "called" not in roles and "opened" not in roles  # LayerNorm and reflect-padded Conv1d are traced into
    assert torch.equal(fxsparse.transform(model, masks, emit="script")(x), out(x))


def test_embedding_max_norm_is_refused_by_script_only() -> None:
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0))
    mask = torch.rand(10, 4) > 0.5
    ids = torch.tensor([[1, 2, 3]])
    expected = fake_sparsity(copy.deepcopy(model), {"0": mask})(ids)
    assert torch.equal(fxsparse.transform(model, {"0": mask})(ids), expected)
    with pytest.raises(fxsparse.EmitError, match="ignores max_norm"):
        fxsparse.transform(model, {"0": mask}, emit="script")


def test_prune_pruned_model_is_copied_cleanly() -> None:
    from torch.nn.utils import prune

    model = nn.Sequential(nn.Linear(4, 4))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    mask = torch.rand(4, 4) > 0.5
    out = fxsparse.transform(model, {"0.weight_orig": mask})
    x = torch.randn(2, 4)
    assert torch.equal(
        out(x), torch.nn.functional.linear(x, mask * model[0].weight_orig * model[0].weight_mask, model[0].bias)
    )
    assert isinstance(out.get_submodule("0").weight, torch.Tensor)  # not a leftover tracing proxy
    assert torch.equal(pickle.loads(pickle.dumps(out))(x), out(x))


class KeywordOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor | None = None) -> torch.Tensor:
        y = self.linear(x)
        return y if scale is None else y * scale


def test_concrete_args_fix_an_input_while_tracing() -> None:
    model = KeywordOnly()
    mask = torch.rand(4, 4) > 0.5
    out = fxsparse.transform(model, {"linear": mask}, concrete_args={"scale": None})
    x = torch.randn(2, 4)
    assert torch.equal(out(x), fake_sparsity(model, {"linear": mask})(x))


class ChildCalledOutside(nn.Module):
    """A Linear inside a kept module, also called on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x) + self.encoder.linear2(self.encoder.linear1(x))


def test_child_of_a_kept_module_called_outside_it_is_masked() -> None:
    torch.manual_seed(0)
    model = ChildCalledOutside()
    masks = {"encoder.linear1": torch.rand(16, 8) > 0.5}
    x = torch.randn(2, 5, 8)
    out = fxsparse.transform(model, masks)
    assert torch.equal(out(x), fake_sparsity(model, masks)(x))
    tags = [n.meta["fxsparse"] for n in out.graph.nodes if "fxsparse" in n.meta]
    assert {"role": "opened", "module": "encoder.linear1"} in tags
    called = [t for t in tags if t["role"] == "called"]
    assert [t["module"] for t in called] == ["encoder"]
    assert called[0]["why"].startswith("its forward cannot be traced")


def test_transform_of_a_transform_masks_more_of_a_kept_module() -> None:
    torch.manual_seed(0)
    model = Recurrent()
    first_mask, second_mask = torch.rand(24, 6) > 0.5, torch.rand(24, 8) > 0.5
    first = fxsparse.transform(model, {"lstm.weight_hh_l0": first_mask})
    second = fxsparse.transform(first, {"lstm.weight_ih_l0": second_mask})
    x = torch.randn(2, 3, 8)
    expected = fake_sparsity(model, {"lstm.weight_hh_l0": first_mask, "lstm.weight_ih_l0": second_mask})(x)
    assert torch.equal(second(x), expected)


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.calls: list[int] = []
        self.linear.register_forward_hook(self._count)

    def _count(self, module: nn.Module, args: object, output: torch.Tensor) -> None:
        self.calls.append(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_hooks_of_a_module_holding_a_masked_weight_run_at_every_call() -> None:
    model = Counting()
    out = fxsparse.transform(model, {"linear": torch.rand(4, 4) > 0.5})
    calls = out.calls
    before = len(calls)
    out(torch.randn(2, 4))
    out(torch.randn(2, 4))
    assert len(calls) == before + 2
    tags = [n.meta["fxsparse"] for n in out.graph.nodes if n.meta.get("fxsparse", {}).get("role") == "called"]
    assert tags == [{"role": "called", "module": "linear", "why": "has forward hooks, which must run at every call"}]


def test_no_tracing_proxy_is_left_on_kept_modules() -> None:
    model, masks, _ = build("lstm")
    out = fxsparse.transform(model, masks)
    leftovers = [
        (name, key)
        for name, module in out.named_modules()
        for key, value in vars(module).items()
        if isinstance(value, torch.fx.Proxy)
        or (isinstance(value, list) and any(isinstance(v, torch.fx.Proxy) for v in value))
    ]
    assert leftovers == []


def test_deepcopy_keeps_references_back_to_the_root() -> None:
    out = fxsparse.transform(nn.Sequential(nn.Linear(2, 2)), {"0": torch.ones(2, 2)})
    out.get_submodule("0").owner = [out]
    clone = copy.deepcopy(out)
    assert clone.get_submodule("0").owner[0] is clone


def _double_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (args[0] * 2,)


def _plus_one(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
    return output + 1


def _triple_grad_input(module: nn.Module, grad_input: object, grad_output: object) -> tuple[torch.Tensor | None, ...]:
    return tuple(None if g is None else g * 3 for g in grad_input)  # type: ignore[attr-defined]


def _halve_grad_output(module: nn.Module, grad_output: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(g * 0.5 for g in grad_output)


class _CalledTwice(nn.Linear):
    """Runs its forward twice per call, in __call__ (which a trace follows into Module.__call__)."""

    def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
        return super().__call__(*args, **kwargs) + super().__call__(*args, **kwargs)  # type: ignore[no-any-return]


class _OwnCallImpl(nn.Linear):
    """Doubles its output in _call_impl, which opening or tracing into the module would skip."""

    def _call_impl(self, *args: object, **kwargs: object) -> torch.Tensor:
        return super()._call_impl(*args, **kwargs) * 2  # type: ignore[no-any-return]


def _scaled_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, self.weight, self.bias) * 2


def _register(kind: str, layer: nn.Module) -> None:
    if kind == "instance forward":
        layer.forward = _scaled_forward.__get__(layer)  # type: ignore[method-assign]
    elif kind == "forward pre-hook":
        layer.register_forward_pre_hook(_double_input)
    elif kind == "forward hook":
        layer.register_forward_hook(_plus_one)
    elif kind == "full backward hook":
        layer.register_full_backward_hook(_triple_grad_input)
    elif kind == "full backward pre-hook":
        layer.register_full_backward_pre_hook(_halve_grad_output)


def _hooked(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind in ("own __call__", "own _call_impl"):
        first = _CalledTwice(4, 4) if kind == "own __call__" else _OwnCallImpl(4, 4)
        return nn.Sequential(first, nn.ReLU(), nn.Linear(4, 3))
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    _register(kind, model[0])
    return model


def _run_with_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    y = model(x)
    y.square().sum().backward()
    grads = {
        name.replace("parametrizations.", "").replace(".original", ""): p.grad for name, p in model.named_parameters()
    }
    return y, grads


HOOK_KINDS = [
    "instance forward",
    "forward pre-hook",
    "forward hook",
    "full backward hook",
    "full backward pre-hook",
    "own __call__",
    "own _call_impl",
]


@pytest.mark.parametrize("kind", HOOK_KINDS)
def test_modules_with_hooks_or_their_own_forward_are_called_not_opened(kind: str) -> None:
    model = _hooked(kind)
    masks = {"0": (torch.rand(4, 4) > 0.5).float(), "2": (torch.rand(3, 4) > 0.5).float()}
    out = fxsparse.transform(model, masks)
    reference = fake_sparsity(model, masks)
    x = torch.randn(2, 4, requires_grad=True)
    y, grads = _run_with_grads(out, x)
    expected, expected_grads = _run_with_grads(reference, x.detach().clone().requires_grad_())
    assert torch.equal(y, expected)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert grad is not None and torch.equal(grad, expected_grads[name]), name
    called = [n.meta["fxsparse"] for n in out.graph.nodes if n.meta.get("fxsparse", {}).get("role") == "called"]
    assert [tag["module"] for tag in called] == ([] if kind == "own __call__" else ["0"])


class _HookedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).relu()


def test_traced_into_modules_with_hooks_are_called_at_every_call() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_HookedBlock(), _HookedBlock())
    calls: list[str] = []
    model[0].register_forward_hook(lambda module, args, output: calls.append("block"))
    model[1].fc.register_forward_pre_hook(lambda module, args: calls.append("fc"))
    masks = {"0.fc": (torch.rand(4, 4) > 0.5).float(), "1.fc": (torch.rand(4, 4) > 0.5).float()}
    out = fxsparse.transform(model, masks)
    reference = fake_sparsity(model, masks)
    x = torch.randn(2, 4)
    calls.clear()
    expected = reference(x)
    expected_calls, calls[:] = list(calls), []
    assert torch.equal(out(x), expected)
    assert calls == expected_calls == ["block", "fc"]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")  # on FakeSparsity's own call
@pytest.mark.parametrize("kind", ["forward", "forward pre", "full backward", "backward pre"])
def test_global_module_hooks_keep_every_masked_module_a_call(kind: str) -> None:
    from torch.nn.modules import module as module_impl

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), _HookedBlock())
    masks = {"0": (torch.rand(4, 4) > 0.5).float(), "2.fc": (torch.rand(4, 4) > 0.5).float()}
    seen: list[str] = []

    def record(module: nn.Module, *args: object) -> None:
        seen.append(type(module).__name__.removeprefix("Parametrized"))

    register = {
        "forward": module_impl.register_module_forward_hook,
        "forward pre": module_impl.register_module_forward_pre_hook,
        "full backward": module_impl.register_module_full_backward_hook,
        "backward pre": module_impl.register_module_full_backward_pre_hook,
    }[kind]
    # torch never clears this flag when the hook goes (it then refuses the other kind of global hook).
    full_backward = module_impl._global_is_full_backward_hook
    handle = register(record)
    try:
        out = fxsparse.transform(model, masks)
        x = torch.randn(2, 4, requires_grad=True)
        seen.clear()
        y, grads = _run_with_grads(out, x)
        got = [name for name in seen if name != "Sequential"]  # the root: the output is named after it
        seen.clear()
        reference = fake_sparsity(model, masks)
        seen.clear()
        expected, expected_grads = _run_with_grads(reference, x.detach().clone().requires_grad_())
        # FakeSparsity itself is a module call (and the model's root is a Sequential): both run hooks too.
        wanted = [name for name in seen if name not in ("FakeSparsity", "ParametrizationList", "Sequential")]
    finally:
        handle.remove()
        module_impl._global_is_full_backward_hook = full_backward
    assert torch.equal(y, expected)
    for name, grad in grads.items():
        assert grad is not None and torch.equal(grad, expected_grads[name]), name
    assert sorted(got) == sorted(wanted) and wanted, (got, wanted)


ROOT_MODULES = {
    "lstm": (lambda: nn.LSTM(4, 3, num_layers=2), lambda: (torch.randn(5, 2, 4),)),
    "multihead_attention": (lambda: nn.MultiheadAttention(4, 2), lambda: (torch.randn(3, 2, 4),) * 3),
    "batchnorm2d": (lambda: nn.BatchNorm2d(3), lambda: (torch.randn(2, 3, 4, 4),)),
}


CALLS: list[int] = []


def _count_call(module: nn.Module, args: object, output: object) -> None:
    CALLS.append(1)


def _first(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value,index]


@pytest.mark.parametrize("kind", list(ROOT_MODULES))
@pytest.mark.parametrize("training", [True, False])
def test_a_torch_module_given_as_the_model_itself_is_called_with_its_masks(kind: str, training: bool) -> None:
    """A bare nn.LSTM / nn.MultiheadAttention / nn.BatchNorm2d, whose forward FX cannot trace, is
    called with its masked parameters swapped in, as it is inside a container (issue 13, item 9)."""
    build, inputs = ROOT_MODULES[kind]
    torch.manual_seed(0)
    model = build().train(training)
    CALLS.clear()
    model.register_forward_hook(_count_call)
    masks = {name: torch.rand(p.shape) > 0.5 for name, p in model.named_parameters()}
    out = fxsparse.transform(model, masks)
    reference = fake_sparsity(model, masks)
    x = inputs()
    ours, theirs = _first(out(*x)), _first(reference(*x))
    assert torch.equal(ours, theirs)
    assert len(CALLS) == 2  # the model's own hook, once per call: not once more for the call inside
    ours.square().sum().backward()
    theirs.square().sum().backward()
    for name in masks:
        owner, _, attribute = name.rpartition(".")
        original = reference.get_submodule(owner).parametrizations[attribute].original
        assert torch.equal(out.get_parameter(name).grad, original.grad), name
    assert sorted(out.state_dict()) == sorted([*model.state_dict(), *(f"{name}_mask" for name in masks)])
    for name, _ in model.named_buffers():  # batch-norm statistics, updated the same way
        assert torch.equal(out.get_buffer(name), reference.get_buffer(name)), name
    assert all(type(p) is nn.Parameter for p in out.parameters())  # nothing left swapped in
    for clone in (copy.deepcopy(out), pickle.loads(pickle.dumps(out))):
        with torch.no_grad():
            assert torch.equal(_first(clone(*x)), _first(out(*x)))
    first, *others = masks  # the output transformed again, a mask at a time: the same masked model
    again = fxsparse.transform(fxsparse.transform(model, {first: masks[first]}), {k: masks[k] for k in others})
    with torch.no_grad():
        assert torch.equal(_first(again(*x)), _first(out(*x)))
