"""capture="export" and "auto": the torch.export path against FakeSparsity and eager torch, over the zoo."""

from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import fxsparse

from reference import eager, fake_sparsity, torchscript
from test_transform import assert_unchanged, snapshot
from zoo import ZOO, build, inputs, make_masks, parameter_name


def exported(name: str, kind: str = "random", **options: object) -> tuple[nn.Module, object, dict, tuple]:
    case = ZOO[name]
    model = build(case)
    masks = make_masks(model, case, kind)
    args = inputs(case)
    out = fxsparse.transform(model, masks, capture="export", example_inputs=args, **options)  # type: ignore[arg-type]
    return model, out, masks, args


@pytest.mark.parametrize("kind", ["random", "bool", "zeros"])
@pytest.mark.parametrize("name", list(ZOO))
def test_graph_equals_reference(name: str, kind: str) -> None:
    case = ZOO[name]
    model = build(case)
    masks = make_masks(model, case, kind)
    args = inputs(case)
    before = snapshot(model)

    out = fxsparse.transform(model, masks, capture="export", example_inputs=args)

    assert out.meta["fxsparse"] == {"capture": "export"}
    assert torch.equal(out(*args), eager(model, masks, *args))
    if not case.tied:  # FakeSparsity masks one name of a tied parameter only
        assert torch.equal(out(*args), fake_sparsity(model, masks)(*args))
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", list(ZOO))
def test_state_dict_has_the_model_keys_and_the_masks(name: str) -> None:
    model, out, masks, _ = exported(name)
    masked = {parameter_name(model, key) for key in masks}
    extra = set(out.state_dict()) - set(model.state_dict())
    assert set(model.state_dict()) <= set(out.state_dict())
    assert {f"{p}_mask" for p in masked} <= extra
    assert all(key.endswith("_mask") for key in extra)  # and the masks under every name of a shared module
    for key, mask in masks.items():
        assert torch.equal(out.get_buffer(f"{parameter_name(model, key)}_mask"), mask)
    for parameter in masked:  # one multiply per masked parameter, whatever reads it
        products = [n for n in out.graph.nodes if n.meta.get("fxsparse", {}).get("role") == "masked"]
        assert [n.meta["fxsparse"]["param"] for n in products].count(parameter) == 1


@pytest.mark.parametrize("emit", ["export", "trace", "parametrize"])
@pytest.mark.parametrize("name", ["seed_model", "tied_embedding_head", "conv_net", "addmm_custom"])
def test_emits_equal_reference(name: str, emit: str) -> None:
    case = ZOO[name]
    model = build(case)
    masks = make_masks(model, case, "random")
    args = inputs(case)
    out = fxsparse.transform(model, masks, capture="export", emit=emit, example_inputs=args)
    run = out.module() if isinstance(out, torch.export.ExportedProgram) else out
    if emit == "trace":
        # TorchScript may differ from eager in the last bit with no mask at all (its addmm runs as
        # mm + add on some CPUs): the guarantee is TorchScript of the masked model.
        assert torch.equal(run(*args), torchscript(model, masks, "trace", *args)(*args))
        torch.testing.assert_close(run(*args), eager(model, masks, *args))
    else:
        assert torch.equal(run(*args), eager(model, masks, *args))


def test_script_is_refused_with_the_alternatives() -> None:
    with pytest.raises(fxsparse.EmitError, match=r"emit='script' is not available .* torch.export.*'trace'"):
        exported("seed_model", emit="script")


@pytest.mark.parametrize("name", ["seed_model", "tied_embedding_head"])
def test_survives_pickle_deepcopy_and_torch_save(name: str) -> None:
    model, out, masks, args = exported(name)
    buffer = io.BytesIO()
    torch.save(out, buffer)
    buffer.seek(0)
    for clone in (pickle.loads(pickle.dumps(out)), copy.deepcopy(out), torch.load(buffer, weights_only=False)):
        assert torch.equal(clone(*args), eager(model, masks, *args))
        assert clone.meta["fxsparse"] == {"capture": "export"}
        assert set(clone.state_dict()) == set(out.state_dict())
        roles = [n.meta.get("fxsparse", {}).get("role") for n in clone.graph.nodes]
        assert roles.count("masked") == len(masks)


def test_the_tie_is_kept_and_masked_at_every_use() -> None:
    out = exported("tied_embedding_head")[1]
    assert out.lm_head.weight is out.embed.weight
    (product,) = [n for n in out.graph.nodes if n.meta.get("fxsparse", {}).get("param") == "lm_head.weight"
                  and n.meta["fxsparse"]["role"] == "masked"]  # fmt: skip
    readers = {str(user.target) for user in product.users}
    assert readers == {"aten.embedding.default", "aten.linear.default"}


class Doubler(nn.Module):
    """FX cannot trace the branch on an input's shape; torch.export specializes it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            return self.fc(x) * 2
        return self.fc(x)


class DataDependent(nn.Module):
    """Neither capture can handle a branch on tensor values."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y if y.sum() > 0 else -y


def test_auto_falls_back_to_export_when_fx_fails() -> None:
    model = Doubler().eval()
    masks = {"fc": torch.rand(8, 8) > 0.5}
    x = torch.randn(4, 8)
    out = fxsparse.transform(model, masks, example_inputs=(x,))
    assert out.meta["fxsparse"]["capture"] == "export"
    assert torch.equal(out(x), fake_sparsity(model, masks)(x))
    fx_out = fxsparse.transform(ZOO["seed_model"].build(), {"linear": torch.ones(16, 16)}, example_inputs=(x,))
    assert fx_out.meta["fxsparse"]["capture"] == "fx"  # auto prefers FX where it works


def test_auto_without_inputs_says_what_to_pass() -> None:
    with pytest.raises(fxsparse.TraceError, match=r"torch.fx could not trace Doubler.*pass example_inputs"):
        fxsparse.transform(Doubler(), {"fc": torch.ones(8, 8)})


def test_auto_reports_both_failures() -> None:
    with pytest.raises(fxsparse.TraceError) as failure:
        fxsparse.transform(DataDependent(), {"fc": torch.ones(8, 8)}, example_inputs=(torch.randn(2, 8),))
    message = str(failure.value)
    assert "could not capture DataDependent either way" in message
    assert "With torch.fx: torch.fx could not trace" in message
    assert "With torch.export: torch.export could not capture DataDependent" in message


def test_capture_fx_does_not_fall_back() -> None:
    with pytest.raises(fxsparse.TraceError, match=r"torch\.fx could not trace Doubler") as failure:
        fxsparse.transform(Doubler(), {"fc": torch.ones(8, 8)}, capture="fx", example_inputs=(torch.randn(2, 8),))
    assert "torch.export" not in str(failure.value)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"capture": "export"}, fxsparse.TraceError, "capture='export' runs the model: pass example_inputs"),
        ({"capture": "jit"}, fxsparse.TraceError, "capture must be one of 'auto', 'fx', 'export', got 'jit'"),
        ({"example_kwargs": [1]}, fxsparse.EmitError, "example_kwargs must be a dict of keyword inputs, got list"),
        ({"emit": "onnx"}, fxsparse.EmitError, "emit='onnx' runs the model: pass example_inputs"),
    ],
)
def test_argument_errors(options: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        fxsparse.transform(ZOO["seed_model"].build(), {"linear": torch.ones(16, 16)}, **options)  # type: ignore[arg-type]


def test_trace_refuses_positional_and_keyword_inputs_together() -> None:
    with pytest.raises(fxsparse.EmitError, match="example_inputs or example_kwargs, not both"):
        exported("seed_model", emit="trace", example_kwargs={})


def test_static_shapes_are_guarded_with_a_clear_error() -> None:
    out = exported("seed_model")[1]
    with pytest.raises(
        ValueError, match=r"input 'x' has size 5 in dimension 0, but must have size 3, .*dynamic_shapes"
    ):
        out(torch.randn(5, 16))
    with pytest.raises(ValueError, match="input 'x' has size 5 in dimension 0"):
        pickle.loads(pickle.dumps(out))(torch.randn(5, 16))


def test_dynamic_shapes_pass_through_to_every_export() -> None:
    case = ZOO["seed_model"]
    model = build(case)
    masks = make_masks(model, case, "random")
    batch = {"x": {0: torch.export.Dim("batch", max=32)}}
    options = {"capture": "export", "example_inputs": inputs(case), "dynamic_shapes": batch}
    out = fxsparse.transform(model, masks, **options)  # type: ignore[arg-type]
    program = fxsparse.transform(model, masks, emit="export", **options)  # type: ignore[arg-type]
    for rows in (1, 7, 32):
        x = torch.randn(rows, 16)
        assert torch.equal(out(x), eager(model, masks, x))
        assert torch.equal(program.module()(x), eager(model, masks, x))
    with pytest.raises(ValueError, match=r"has size 33 in dimension 0, but must have a size in \[0, 32\]"):
        out(torch.randn(33, 16))


def test_keyword_inputs() -> None:
    model, out, masks, args = exported("seed_model", example_kwargs={})  # positional and (empty) keyword inputs
    assert torch.equal(out(*args), eager(model, masks, *args))
    case = ZOO["seed_model"]
    by_keyword = fxsparse.transform(build(case), masks, capture="export", example_kwargs={"x": args[0]})
    assert torch.equal(by_keyword(x=args[0]), eager(model, masks, *args))


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, scale: int, flip: bool = False) -> torch.Tensor:
        y = self.fc(x) * scale
        return -y if flip else y


def test_non_tensor_inputs_are_checked_against_their_example_values() -> None:
    x = torch.randn(2, 4)
    out = fxsparse.transform(Scaled(), {"fc": torch.ones(4, 4)}, capture="export", example_inputs=(x, 2, False))
    out(x, 2, False)
    with pytest.raises(ValueError, match=r"input 'scale' is 5, but the model was exported with scale=2"):
        out(x, 5, False)
    with pytest.raises(ValueError, match=r"input 'flip' is True, but the model was exported with flip=False"):
        out(x, 2, True)


def test_guards_do_not_depend_on_where_transform_is_called_from() -> None:
    """torch.export leaves its own guards out when called from a file under a path naming torchao."""
    namespace = {"fxsparse": fxsparse, "torch": torch, "model": ZOO["seed_model"].build()}
    source = "out = fxsparse.transform(model, {'linear': torch.ones(16, 16)}, capture='export', example_inputs=(torch.randn(3, 16),))"  # noqa: E501
    exec(compile(source, "/tmp/torchao_experiments/run.py", "exec"), namespace)
    with pytest.raises(ValueError, match="input 'x' has size 5 in dimension 0"):
        namespace["out"](torch.randn(5, 16))  # type: ignore[operator]


def test_trace_of_an_exported_graph_keeps_the_size_checks(tmp_path: Path) -> None:
    _, traced, _, args = exported("seed_model", emit="trace")
    torch.jit.save(traced, str(tmp_path / "traced.pt"))
    for module in (traced, torch.jit.load(str(tmp_path / "traced.pt"))):
        assert module(*args).shape == (3, 16)
        with pytest.raises(Exception, match="input 'x' has size 5 in dimension 0, but must have size 3"):
            module(torch.randn(5, 16))


def test_root_hooks_run_once_and_are_part_of_the_graph() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    model.register_forward_hook(lambda module, args, output: output * 2)
    mask = torch.rand(4, 4) > 0.5
    x = torch.randn(2, 4)
    out = fxsparse.transform(model, {"0": mask}, capture="export", example_inputs=(x,))
    assert torch.equal(out(x), fake_sparsity(model, {"0.weight": mask.float()})(x))
    assert not out._forward_hooks
    assert model._forward_hooks  # the input model keeps its hook


def test_train_and_eval_mode_are_fixed_at_capture() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).eval()
    x = torch.randn(2, 4)
    out = fxsparse.transform(model, {"0": torch.ones(4, 4)}, capture="export", example_inputs=(x,))
    out.train()
    with pytest.raises(ValueError, match=r"captured with torch.export in eval mode.*cannot run in train mode"):
        out(x)
    out.eval()
    assert torch.equal(out(x), model(x))


class ConstantAndNamesake(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.lifted_tensor_0 = torch.zeros(4)  # an unrelated attribute under the name export gives constants

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + torch.tensor([1.0, 2.0, 3.0, 4.0])


def test_lifted_constants_do_not_bind_to_an_attribute_of_the_same_name() -> None:
    model = ConstantAndNamesake()
    x = torch.randn(2, 4)
    out = fxsparse.transform(model, {"fc": torch.ones(4, 4)}, capture="export", example_inputs=(x,))
    assert torch.equal(out(x), model(x))
    assert torch.equal(out.lifted_tensor_0, torch.zeros(4))


@pytest.mark.parametrize("second_capture", ["fx", "export"])
def test_transforming_an_exported_output_again(second_capture: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    x = torch.randn(2, 4)
    masks = {"0.weight": torch.rand(4, 4) > 0.5, "2.weight": torch.rand(4, 4) > 0.5}
    first = fxsparse.transform(model, {"0.weight": masks["0.weight"]}, capture="export", example_inputs=(x,))
    second = fxsparse.transform(first, {"2.weight": masks["2.weight"]}, capture=second_capture, example_inputs=(x,))
    tags = {
        n.meta["fxsparse"]["param"] for n in second.graph.nodes if n.meta.get("fxsparse", {}).get("role") == "masked"
    }
    assert tags == {"0.weight", "2.weight"}
    assert second.meta["fxsparse"]["capture"] == "export"
    assert torch.equal(second(x), eager(model, {k: v.float() for k, v in masks.items()}, x))
    with pytest.raises(ValueError, match=r"input '.*' has size 5 in dimension 0"):
        second(torch.randn(5, 4))
    assert sum(isinstance(m, fxsparse._runtime.InputGuards) for m in second.modules()) == 1


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda x: self.fc(x), lambda x: -self.fc(x), (x,))


def test_graphs_with_control_flow_operators_pickle() -> None:
    model = Branches()
    mask = torch.rand(4, 4) > 0.5
    x = torch.randn(2, 4)
    out = fxsparse.transform(model, {"fc": mask}, capture="export", example_inputs=(x,))
    clone = pickle.loads(pickle.dumps(out))
    for sample in (-x.abs() - 1, x.abs() + 1):
        y = torch.nn.functional.linear(sample, mask * model.fc.weight, model.fc.bias)
        assert torch.equal(clone(sample), y if sample.sum() > 0 else -y)


def test_concurrent_export_captures() -> None:
    """torch.export keeps global state while it runs; fxsparse serializes its exports."""
    from concurrent.futures import ThreadPoolExecutor

    case = ZOO["seed_model"]
    model = build(case)
    masks = make_masks(model, case, "random")
    args = inputs(case)
    with ThreadPoolExecutor(4) as pool:
        outs = list(
            pool.map(lambda _: fxsparse.transform(model, masks, capture="export", example_inputs=args), range(8))
        )
    for out in outs:
        assert torch.equal(out(*args), eager(model, masks, *args))


class CachesOnSelf(nn.Module):
    """Stores a tensor on itself in forward, as transformers' longrope rotary embedding does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = x * 1
        return self.fc(x)


def test_attributes_forward_sets_during_export_do_not_stay() -> None:
    x = torch.randn(2, 4)
    with pytest.warns(UserWarning, match="self.last was assigned during export"):  # torch's
        out = fxsparse.transform(CachesOnSelf(), {"fc": torch.ones(4, 4)}, capture="export", example_inputs=(x,))
    assert "last" not in vars(out)
    for clone in (copy.deepcopy(out), pickle.loads(pickle.dumps(out))):
        assert torch.equal(clone(x), out(x))


class Halves(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fc(x).view(-1, 2, 4).sum(1) + self.fc(y)


class EvenOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * 2 if x.shape[0] % 2 == 0 else self.fc(x)


def test_torch_export_guards_beyond_ranges_are_checked() -> None:
    mask = {"fc": torch.ones(4, 4)}
    rows = torch.export.Dim("rows", min=1, max=50)
    out = fxsparse.transform(
        Halves(),
        mask,
        capture="export",
        example_inputs=(torch.randn(6, 4), torch.randn(3, 4)),
        dynamic_shapes=({0: 2 * rows}, {0: rows}),
    )
    assert out(torch.randn(10, 4), torch.randn(5, 4)).shape == (5, 4)
    with pytest.raises(ValueError, match=r"fail a condition of the graph torch.export captured: .*x"):
        out(torch.randn(10, 4), torch.randn(3, 4))  # wrong only in how the sizes relate
    even = fxsparse.transform(
        EvenOnly(), mask, example_inputs=(torch.randn(4, 4),), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)
    )
    assert even(torch.randn(6, 4)).shape == (6, 4)
    with pytest.raises(ValueError, match=r"fail a condition .*% 2"):
        even(torch.randn(3, 4))  # the graph took the even branch


class Items(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, items: list[torch.Tensor]) -> torch.Tensor:
        return self.fc(x) + sum(items)


def test_container_inputs_must_keep_their_structure() -> None:
    x = torch.randn(2, 4)
    out = fxsparse.transform(Items(), {"fc": torch.ones(4, 4)}, capture="export", example_inputs=(x, [x, x]))
    assert torch.equal(out(x, [x, x]), out.fc(x) + 2 * x)
    with pytest.raises(ValueError, match="input 'items' must have the structure the model was exported with"):
        out(x, [x, x, x])
    with pytest.raises(ValueError, match="input 'items' must have the structure"):
        pickle.loads(pickle.dumps(out))(x, [x])


def test_non_tensor_inputs_are_compared_safely() -> None:
    x = torch.randn(2, 4)
    out = fxsparse.transform(Scaled(), {"fc": torch.ones(4, 4)}, capture="export", example_inputs=(x, 2))
    with pytest.raises(ValueError, match=r"input 'scale' is tensor\(.*exported with scale=2"):
        out(x, torch.tensor(2))


def test_auto_leads_with_the_export_reason_when_both_captures_fail() -> None:
    with pytest.raises(fxsparse.TraceError) as failure:
        fxsparse.transform(DataDependent(), {"fc": torch.ones(8, 8)}, example_inputs=(torch.randn(2, 8),))
    message = str(failure.value)
    assert message.index("With torch.export:") < message.index("With torch.fx:")


class OptionalScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        y = self.fc(x)
        return y if scale is None else y * scale


def test_calling_without_an_input_it_was_captured_with_names_it() -> None:
    x, scale = torch.randn(2, 4), torch.randn(2, 4)
    out = fxsparse.transform(
        OptionalScale(),
        {"fc": torch.ones(4, 4)},
        capture="export",
        example_inputs=(x,),
        example_kwargs={"scale": scale},
    )
    with pytest.raises(TypeError, match=r"missing input 'scale'.*Pass it, or transform again with example_inputs"):
        out(x)
    assert torch.equal(out(x, scale=scale), out(x, scale))
