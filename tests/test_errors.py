"""Every bad input gets a clear fxsparse error, and nothing is half-done."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

import fxsparse

from reference import fake_sparsity
from test_transform import assert_unchanged, snapshot
from zoo import ZOO, build, make_masks


@pytest.fixture
def model() -> nn.Module:
    return build(ZOO["seed_model"])


def transform_fails(model: nn.Module, error: type[Exception], match: str, masks: object, **kwargs: object) -> str:
    before = snapshot(model)
    with pytest.raises(error, match=match) as caught:
        fxsparse.transform(model, masks, **kwargs)  # type: ignore[arg-type]
    assert_unchanged(model, before)
    assert isinstance(caught.value, fxsparse.FxsparseError)
    return str(caught.value)


def test_hierarchy() -> None:
    assert issubclass(fxsparse.MaskError, fxsparse.FxsparseError) and issubclass(fxsparse.MaskError, ValueError)
    assert issubclass(fxsparse.TraceError, fxsparse.FxsparseError) and issubclass(fxsparse.TraceError, RuntimeError)
    assert issubclass(fxsparse.EmitError, fxsparse.FxsparseError)


def test_unknown_key_lists_the_closest_names(model: nn.Module) -> None:
    message = transform_fails(
        model, fxsparse.MaskError, "names no parameter or module", {"seq.0.wieght": torch.ones(16, 16)}
    )
    assert "'seq.0.weight'" in message


def test_unknown_key_far_from_everything(model: nn.Module) -> None:
    message = transform_fails(model, fxsparse.MaskError, "names no parameter", {"zzz": torch.ones(1)})
    assert "linear.weight" in message


@pytest.mark.parametrize("key", ["seq", "seq.1.bias.x"])
def test_key_naming_a_module_without_weight(model: nn.Module, key: str) -> None:
    transform_fails(model, fxsparse.MaskError, repr(key), {key: torch.ones(16, 16)})


def test_module_without_weight_names_its_parameters() -> None:
    model = nn.Sequential(nn.ReLU(), nn.Linear(2, 2))
    message = transform_fails(model, fxsparse.MaskError, "has no parameter 'weight'", {"0": torch.ones(2, 2)})
    assert "ReLU" in message


def test_shape_mismatch_names_parameter_and_both_shapes(model: nn.Module) -> None:
    message = transform_fails(model, fxsparse.MaskError, "seq.0.weight", {"seq.0": torch.ones(16, 8)})
    assert "(16, 8)" in message and "(16, 16)" in message


def test_broadcastable_mask_is_still_refused(model: nn.Module) -> None:
    transform_fails(model, fxsparse.MaskError, "shape", {"linear.weight": torch.ones(16)})


@pytest.mark.parametrize("value", [[[1.0] * 16] * 16, 1.0, None, "ones"])
def test_non_tensor_mask(model: nn.Module, value: object) -> None:
    transform_fails(model, fxsparse.MaskError, "must be a torch.Tensor", {"linear.weight": value})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_mask(model: nn.Module, bad: float) -> None:
    mask = torch.ones(16, 16)
    mask[3, 4] = bad
    transform_fails(model, fxsparse.MaskError, "NaN or infinite", {"linear.weight": mask})


def test_sparse_mask(model: nn.Module) -> None:
    transform_fails(
        model, fxsparse.MaskError, "must be a dense tensor", {"linear.weight": torch.ones(16, 16).to_sparse()}
    )


def test_mask_overflowing_the_parameter_dtype() -> None:
    model = nn.Sequential(nn.Linear(2, 2)).half()
    transform_fails(model, fxsparse.MaskError, "overflows torch.float16", {"0": torch.full((2, 2), 1e6)})


def test_complex_mask(model: nn.Module) -> None:
    transform_fails(model, fxsparse.MaskError, "complex", {"linear.weight": torch.ones(16, 16, dtype=torch.complex64)})


def test_masks_not_a_mapping(model: nn.Module) -> None:
    transform_fails(model, fxsparse.MaskError, "must be a mapping", [torch.ones(16, 16)])


def test_non_string_key(model: nn.Module) -> None:
    transform_fails(model, fxsparse.MaskError, "must be parameter or module names", {0: torch.ones(16, 16)})


def test_buffer_key() -> None:
    model = nn.Sequential(nn.BatchNorm1d(4))
    transform_fails(model, fxsparse.MaskError, "names a buffer", {"0.running_mean": torch.ones(4)})


def test_masks_none_without_parametrizations(model: nn.Module) -> None:
    transform_fails(model, fxsparse.MaskError, "no FakeSparsity parametrizations", None)


def test_existing_attribute_named_like_the_mask_buffer() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].weight_mask = "taken"
    transform_fails(model, fxsparse.MaskError, "already has an attribute 'weight_mask'", {"0": torch.ones(4, 4)})


def test_masking_a_masked_parameter_again_says_how_to_update_it() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    out = fxsparse.transform(model, {"0": torch.ones(4, 4)})
    message = transform_fails(out, fxsparse.MaskError, "already has a mask buffer '0.weight_mask'", {"0": torch.eye(4)})
    assert "fxsparse.update_masks(out, {'0.weight': mask})" in message


def test_module_pruned_with_torch_prune_names_its_parameters() -> None:
    from torch.nn.utils import prune

    model = nn.Sequential(nn.Linear(4, 4))
    prune.random_unstructured(model[0], "weight", amount=0.5)
    message = transform_fails(model, fxsparse.MaskError, "has no parameter 'weight'", {"0": torch.ones(4, 4)})
    assert "'0.weight_orig'" in message


def test_error_after_good_keys_leaves_nothing_behind() -> None:
    model = build(ZOO["seed_model"])
    prepared = fake_sparsity(model, make_masks(model, ZOO["seed_model"], "random"))
    transform_fails(prepared, fxsparse.MaskError, "shape", {"seq.0": torch.ones(16, 16), "seq.1": torch.ones(2)})


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.linear(x)
        return x


def test_untraceable_model_raises_trace_error() -> None:
    model = DataDependent()
    message = transform_fails(model, fxsparse.TraceError, "could not trace DataDependent", {"linear": torch.ones(4, 4)})
    assert "control flow" in message


def test_unknown_emit(model: nn.Module) -> None:
    transform_fails(model, fxsparse.EmitError, "emit must be one of", {}, emit="onnx-ish")


@pytest.mark.parametrize("emit", ["trace", "export"])
def test_emit_needing_inputs(model: nn.Module, emit: str) -> None:
    transform_fails(model, fxsparse.EmitError, "pass example_inputs", {}, emit=emit)


def test_example_inputs_must_be_a_tuple(model: nn.Module) -> None:
    transform_fails(model, fxsparse.EmitError, "must be a tuple", {}, emit="trace", example_inputs=[torch.ones(3, 16)])


def test_lone_tensor_is_taken_as_one_input(model: nn.Module) -> None:
    x = torch.randn(3, 16)
    traced = fxsparse.transform(model, {"linear": torch.ones(16, 16)}, emit="trace", example_inputs=x)
    assert torch.equal(traced(x), model(x))


@torch.fx.wrap
def _varargs_sum(*tensors: torch.Tensor) -> torch.Tensor:
    return sum(tensors)  # type: ignore[return-value]


class Unscriptable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _varargs_sum(self.linear(x), x)


def test_backend_failure_is_an_emit_error() -> None:
    model = Unscriptable()
    message = transform_fails(
        model, fxsparse.EmitError, "emit='script' failed", {"linear": torch.ones(4, 4)}, emit="script"
    )
    assert "emit='graph'" in message
    assert torch.equal(
        fxsparse.transform(model, {"linear": torch.ones(4, 4)})(torch.ones(1, 4)), model(torch.ones(1, 4))
    )


def test_model_must_be_a_module() -> None:
    with pytest.raises(fxsparse.FxsparseError, match=r"torch\.nn\.Module"):
        fxsparse.transform(lambda x: x, {})  # type: ignore[arg-type]


def test_uncopyable_attribute_is_named() -> None:
    import threading

    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
    model[0].lock = threading.Lock()
    transform_fails(model, fxsparse.TraceError, "attribute 'lock' of module '0'", {"0.0": torch.ones(2, 2)})


def test_a_weight_computed_by_another_parametrization_is_named_as_such() -> None:
    from torch.nn.utils.parametrizations import weight_norm

    model = nn.Sequential(weight_norm(nn.Conv1d(4, 4, 3, padding=1), dim=2))
    for key in ("0.weight", "0"):
        with pytest.raises(fxsparse.MaskError, match=r"computed by a parametrization \(_WeightNorm\), not a parameter"):
            fxsparse.transform(model, {key: torch.ones(4, 4, 3)})


def test_dynamic_shapes_without_example_inputs() -> None:
    with pytest.raises(fxsparse.TraceError, match="dynamic_shapes describes dimensions of the example inputs"):
        fxsparse.transform(nn.Linear(2, 2), {"weight": torch.ones(2, 2)}, dynamic_shapes={"input": {0: None}})


class AttributeNamedMeta(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.meta = "checkpoint v1"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_an_attribute_named_meta_is_refused_by_name() -> None:
    with pytest.raises(fxsparse.EmitError, match=r"attribute 'meta' \(str\), the name torch.fx.GraphModule keeps"):
        fxsparse.transform(AttributeNamedMeta(), {"fc": torch.ones(2, 2)})


@torch.fx.wrap
def _twice_through(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer(x) * 2  # type: ignore[no-any-return]


class PassesItsLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _twice_through(self.fc, x)


@torch.fx.wrap
def _through_the_model(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.fc(x)  # type: ignore[no-any-return]


class PassesItself(PassesItsLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _through_the_model(self, x)


def test_a_wrapped_function_given_a_masked_module_is_refused_not_left_unmasked() -> None:
    message = transform_fails(
        PassesItsLayer(), fxsparse.TraceError, "is passed as an object to _twice_through", {"fc": torch.zeros(4, 4)}
    )
    assert "module 'fc', which holds masked parameters (fc.weight)" in message


def test_no_module_holding_a_masked_parameter_reaches_code_unmasked() -> None:
    transform_fails(
        PassesItself(),
        fxsparse.TraceError,
        r"module '\(root\)', which holds masked parameters \(fc.weight\), is passed as an object to _through_the_model",
        {"fc": torch.zeros(4, 4)},
    )
