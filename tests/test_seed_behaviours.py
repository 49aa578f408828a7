"""torch's own test/ao/sparsity/test_parametrization.py, held against fxsparse.

Each test mirrors one of FakeSparsity's tests (see ../shared/seed/test_parametrization.md);
where fxsparse does better (masks kept in the state_dict), the test says so.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

import fxsparse

from reference import fake_sparsity, torchscript
from zoo import ModelUnderTest

EYE_MASKS = {"linear.weight": torch.eye(16), "seq.0.weight": torch.eye(16), "seq.1.weight": torch.eye(16)}


def test_masking_logic() -> None:
    model = nn.Linear(16, 16, bias=False)
    model.weight = nn.Parameter(torch.eye(16))
    x = torch.randn(3, 16)
    assert torch.equal(torch.mm(x, torch.eye(16)), model(x))

    out = fxsparse.transform(model, {"weight": torch.zeros(16, 16)})

    assert torch.equal(torch.zeros(3, 16), out(torch.randn(3, 16)))
    assert torch.equal(torch.mm(x, torch.eye(16)), model(x))  # the input model still computes x @ I


def test_weights_parametrized() -> None:
    model = ModelUnderTest(bias=False)
    for name in ("linear", "seq.0", "seq.1"):
        assert not hasattr(model.get_submodule(name), "parametrizations")

    out = fxsparse.transform(model, EYE_MASKS, emit="parametrize")

    for name in ("linear", "seq.0", "seq.1"):
        assert hasattr(out.get_submodule(name), "parametrizations")
        assert parametrize.is_parametrized(out.get_submodule(name), "weight")
        assert not hasattr(model.get_submodule(name), "parametrizations")


def test_state_dict_keeps_weights_and_masks() -> None:
    """FakeSparsity drops masks from state_dict and renames weights; fxsparse keeps both."""
    model = ModelUnderTest(bias=True)
    prepared = fake_sparsity(model, EYE_MASKS)
    assert "linear.parametrizations.weight.original" in prepared.state_dict()
    assert not any("mask" in key for key in prepared.state_dict())

    out = fxsparse.transform(model, EYE_MASKS)
    state = out.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value)
    for key, mask in EYE_MASKS.items():
        assert torch.equal(state[f"{key}_mask"], mask)

    fresh = fxsparse.transform(ModelUnderTest(bias=True), {k: torch.ones(16, 16) for k in EYE_MASKS})
    fresh.load_state_dict(state)
    x = torch.randn(3, 16)
    assert torch.equal(fresh(x), prepared(x))


def test_jit_trace() -> None:
    model = ModelUnderTest(bias=False)
    out = fxsparse.transform(model, EYE_MASKS)
    example_x = torch.ones(3, 16)
    model_trace = torch.jit.trace_module(out, {"forward": example_x})
    emitted = fxsparse.transform(model, EYE_MASKS, emit="trace", example_inputs=(example_x,))

    x = torch.randn(3, 16)
    # TorchScript's kernels may differ from eager's in the last bit with no mask at all: bitwise
    # against the trace of the masked model, within round-off of FakeSparsity.
    expected = torchscript(model, EYE_MASKS, "trace", example_x)(x)
    assert torch.equal(model_trace(x), expected)
    assert torch.equal(emitted(x), expected)
    torch.testing.assert_close(emitted(x), fake_sparsity(model, EYE_MASKS)(x))
