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
