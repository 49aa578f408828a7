"""Frozen inference: freeze's emit forms, and sparse kernels (layout=) chosen by measurement or forced."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse._kernels import Candidate, choose

from zoo import ZOO, build, make_masks

# Sparse kernels sum in another order than dense F.linear: float32 round-off, no more.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def sparse_mlp(sparsity: float = 0.9, width: int = 64, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width, bias=False)).eval()
    return model, fxsparse.masks.magnitude(model, sparsity)


def block_mlp(block: int = 8) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
    return model, fxsparse.masks.block(model, 0.75, (block, block))


@pytest.mark.parametrize("case_name", [name for name, case in ZOO.items() if case.scriptable])
@pytest.mark.parametrize("emit", ["script", "trace"])
def test_frozen_torchscript_equals_the_masked_torchscript_bit_for_bit(case_name: str, emit: str) -> None:
    case = ZOO[case_name]
    model = build(case)
    masks = make_masks(model, case, "random")
    out = fxsparse.transform(model, masks)
    inputs = case.inputs()
    frozen = fxsparse.freeze(out, emit=emit, example_inputs=inputs)
    masked = fxsparse.transform(model, masks, emit=emit, example_inputs=inputs)
    assert isinstance(frozen, torch.jit.ScriptModule)
    assert not any(key.endswith("_mask") for key in frozen.state_dict())
    with torch.no_grad():  # TorchScript may run an operator other than eager's (addmm): compare like with like
        assert torch.equal(frozen(*inputs), masked(*inputs))


def test_frozen_export_and_onnx_carry_no_masks() -> None:
    model, masks = sparse_mlp()
    out = fxsparse.transform(model, masks)
    x = torch.randn(3, 64)
    exported = fxsparse.freeze(out, emit="export", example_inputs=(x,))
    assert isinstance(exported, torch.export.ExportedProgram)
    assert not any(key.endswith("_mask") for key in exported.state_dict)
    with torch.no_grad():
        assert torch.equal(exported.module()(x), out(x))
    pytest.importorskip("onnxruntime")
    program = fxsparse.freeze(out, emit="onnx", example_inputs=(x,))
    initializers = set(program.model.graph.initializers)
    assert initializers and not any(name.endswith("_mask") for name in initializers)
    (onnx_out,) = program(x)
    torch.testing.assert_close(onnx_out, out(x).detach(), **TOLERANCE)


@pytest.mark.parametrize("case_name", list(ZOO))
def test_forced_csr_is_within_round_off_of_the_masked_graph(case_name: str) -> None:
    case = ZOO[case_name]
    model = build(case)
    out = fxsparse.transform(model, make_masks(model, case, "random"))
    frozen = fxsparse.freeze(out, layout="csr")
    inputs = case.inputs()
    with torch.no_grad():
        torch.testing.assert_close(frozen(*inputs), out(*inputs), **TOLERANCE)
    for param, choice in fxsparse.layouts(frozen).items():
        if choice.layout == "csr":  # the dense weight is gone; its three parts hold it
            assert param not in frozen.state_dict()
            assert {f"{param}_crow_indices", f"{param}_col_indices", f"{param}_values"} <= set(frozen.state_dict())
        else:
            assert choice.note, param  # why it stayed dense


@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (2, 3, 64), (64,)])
@pytest.mark.parametrize("layout", ["csr", "bsr"])
def test_sparse_kernels_take_any_leading_shape(layout: str, shape: tuple[int, ...]) -> None:
    model, masks = block_mlp()  # block masks: both CSR and BSR take them
    out = fxsparse.transform(model, masks)
    frozen = fxsparse.freeze(out, layout=layout)
    assert {str(choice.layout) for choice in fxsparse.layouts(frozen).values()} == {layout}
    x = torch.randn(shape)
    with torch.no_grad():
        result = frozen(x)
        assert result.shape == out(x).shape
        torch.testing.assert_close(result, out(x), **TOLERANCE)


def test_bsr_uses_the_masks_block() -> None:
    model, masks = block_mlp(block=16)
    frozen = fxsparse.freeze(fxsparse.transform(model, masks), layout="bsr")
    assert frozen.state_dict()["0.weight_values"].shape[1:] == (16, 16)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Measure on one thread: with two, a busy neighbour process makes OpenMP's spinning threads
    wait on each other, slowing sparse kernels most (measured: 99 % CSR from 10x faster than
    dense to 12x slower). "auto" then rightly picks dense; these tests check the choosing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_auto_picks_csr_where_it_wins_and_dense_where_it_loses(monkeypatch: pytest.MonkeyPatch) -> None:
    # Which kernel is faster is torch's and the machine's business: a clock that says CSR is 20x
    # faster on the sparser weight and 3x slower on the denser one checks only the choosing.
    def median_times(runs: dict[str, object], like: torch.Tensor, rounds: int = 7) -> dict[str, float]:
        csr = 0.05 if float(torch.count_nonzero(like)) / like.numel() < 0.5 else 3.0
        return {name: 1.0 if name == "dense" else csr for name in runs}

    monkeypatch.setattr(fxsparse._kernels, "_median_times", median_times)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    masks = {
        "0.weight": fxsparse.masks.magnitude(model, 0.99)["0.weight"],
        "2.weight": fxsparse.masks.magnitude(model, 0.3)["2.weight"],
    }
    out = fxsparse.transform(model, masks)
    frozen = fxsparse.freeze(out, layout="auto")
    choices = fxsparse.layouts(frozen)
    assert choices["0.weight"].layout == "csr"
    assert choices["0.weight"].speedup == 20.0 >= fxsparse._kernels.MARGIN
    assert choices["0.weight"].rows == (1, 64)
    assert choices["2.weight"].layout == "dense"
    assert choices["2.weight"].measured["csr"] < 1 and "faster than dense" in choices["2.weight"].note
    roles = {n.meta[fxsparse.META_KEY]["role"] for n in frozen.graph.nodes if fxsparse.META_KEY in n.meta}
    assert {"sparse", "sparse weight", "frozen"} <= roles
    x = torch.randn(7, 64)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), out(x), **TOLERANCE)


@pytest.mark.usefixtures("one_thread")
def test_auto_measures_at_the_example_inputs_rows() -> None:
    model, masks = sparse_mlp(0.99, width=256)
    out = fxsparse.transform(model, masks)
    frozen = fxsparse.freeze(out, layout="auto", example_inputs=(torch.randn(2, 3, 256),))
    assert {choice.rows for choice in fxsparse.layouts(frozen).values()} == {(6,)}


@pytest.mark.usefixtures("one_thread")
def test_auto_reuses_a_measurement_for_layers_alike() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(128, 128) for _ in range(4)]).eval()
    frozen = fxsparse.freeze(fxsparse.transform(model, fxsparse.masks.magnitude(model, 0.95)), layout="auto")
    notes = [choice.note for choice in fxsparse.layouts(frozen).values()]
    assert sum("measured on 0.weight" in note for note in notes) == 3


def test_a_dense_enough_weight_is_not_measured() -> None:
    model, masks = sparse_mlp(0.05)
    choices = fxsparse.layouts(fxsparse.freeze(fxsparse.transform(model, masks), layout="auto"))
    assert all(c.layout == "dense" and not c.measured and "too dense" in c.note for c in choices.values())


def test_tied_and_shared_weights() -> None:
    case = ZOO["tied_embedding_head"]  # lm_head.weight is also the embedding table
    model = build(case)
    out = fxsparse.transform(model, make_masks(model, case, "random"))
    choices = fxsparse.layouts(fxsparse.freeze(out, layout="csr"))
    assert choices["lm_head.weight"].layout == "dense" and "embedding" in choices["lm_head.weight"].note
    case = ZOO["linear_called_twice"]  # one module, two calls: both sparse, one copy of the weight
    model = build(case)
    out = fxsparse.transform(model, make_masks(model, case, "random"))
    frozen = fxsparse.freeze(out, layout="csr")
    calls = [n for n in frozen.graph.nodes if n.meta.get(fxsparse.META_KEY, {}).get("param") == "shared.weight"]
    assert sum(n.op == "call_function" for n in calls) == 2
    assert sum(key.startswith("shared.weight_") for key in frozen.state_dict()) == 3


def test_a_frozen_sparse_model_copies_saves_and_loads() -> None:
    model, masks = sparse_mlp()
    frozen = fxsparse.freeze(fxsparse.transform(model, masks), layout="csr")
    x = torch.randn(4, 64)
    expected = frozen(x)
    buffer = io.BytesIO()
    torch.save(frozen, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(frozen), pickle.loads(pickle.dumps(frozen)), torch.load(buffer, weights_only=False)):
        assert torch.equal(copied(x), expected)
        assert fxsparse.layouts(copied) == fxsparse.layouts(frozen)
    state = io.BytesIO()
    torch.save(frozen.state_dict(), state)  # plain dense tensors: loadable with weights_only
    state.seek(0)
    loaded = torch.load(state, weights_only=True)
    other_model, other_masks = sparse_mlp(seed=1)  # other weights, other masks, as many kept
    other = fxsparse.freeze(fxsparse.transform(other_model, other_masks), layout="csr")
    assert not torch.equal(other(x), expected)
    other.load_state_dict(loaded)  # indices and values: the whole weight
    assert torch.equal(other(x), expected)
    denser = fxsparse.freeze(fxsparse.transform(*sparse_mlp(0.5)), layout="csr")
    with pytest.raises(RuntimeError, match="size mismatch"):
        denser.load_state_dict(loaded)


@pytest.mark.parametrize("emit", ["script", "trace"])
def test_frozen_sparse_torchscript(emit: str, tmp_path: pytest.TempPathFactory) -> None:
    model, masks = sparse_mlp()
    out = fxsparse.transform(model, masks)
    one_row = torch.randn(1, 64)  # traced on one row, run on many: the trace keeps the general kernel
    scripted = fxsparse.freeze(out, layout="csr", emit=emit, example_inputs=(one_row,))
    path = tmp_path / "frozen.pt"  # type: ignore[operator]
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        for x in (one_row, torch.randn(6, 64)):
            torch.testing.assert_close(loaded(x), out(x), **TOLERANCE)


@pytest.mark.parametrize("emit", ["export", "onnx"])
def test_export_paths_fall_back_to_dense_with_a_warning(emit: str) -> None:
    if emit == "onnx":
        pytest.importorskip("onnxscript")
    model, masks = sparse_mlp()
    out = fxsparse.transform(model, masks)
    x = torch.randn(2, 64)
    with pytest.warns(UserWarning, match=rf"emit='{emit}' cannot carry sparse weights.*falls back to 'dense'"):
        program = fxsparse.freeze(out, layout="csr", emit=emit, example_inputs=(x,))
    if emit == "export":
        assert torch.equal(program.module()(x), out(x))


def test_huggingface_linear_layers_run_sparse() -> None:
    pytest.importorskip("transformers")
    from hf_zoo import FAMILIES

    family = FAMILIES["llama"]
    model = family.build()
    inputs = family.inputs(2, 8)
    masks = fxsparse.masks.magnitude(model, 0.9)
    out = fxsparse.transform(model, masks, example_kwargs=inputs)
    # Built in train mode, which the export capture keeps: freeze captures the eval mode, from the inputs.
    frozen = fxsparse.freeze(out, layout="csr", example_kwargs=inputs)
    choices = fxsparse.layouts(frozen)
    assert sum(c.layout == "csr" for c in choices.values()) == len(masks)
    with torch.no_grad():
        torch.testing.assert_close(frozen(**inputs).logits, out(**inputs).logits, **TOLERANCE)


def test_layout_errors_name_the_weight_and_the_way_out() -> None:
    model, masks = sparse_mlp()
    out = fxsparse.transform(model, masks)
    with pytest.raises(fxsparse.MaskError, match=r"layout must be one of 'dense', 'auto', .* got 'sparse'"):
        fxsparse.freeze(out, layout="sparse")
    with pytest.raises(fxsparse.MaskError, match=r"0\.weight: its unstructured mask is not made of square blocks"):
        fxsparse.freeze(out, layout="bsr")
    if not torch.cuda.is_available():
        with pytest.raises(fxsparse.MaskError, match=r"2:4 semi-structured kernels need a CUDA weight"):
            fxsparse.freeze(out, layout="semi_structured")
    with pytest.raises(fxsparse.EmitError, match="cannot emit 'parametrize'"):
        fxsparse.freeze(out, emit="parametrize")
    with pytest.raises(fxsparse.EmitError, match="emit='trace' runs the model"):
        fxsparse.freeze(out, emit="trace")
    half = fxsparse.transform(model.to(torch.bfloat16), masks)
    with pytest.raises(fxsparse.MaskError, match="CPU sparse kernels take float32 or float64"):
        fxsparse.freeze(half, layout="csr")


def test_freeze_leaves_its_input_alone() -> None:
    model, masks = sparse_mlp()
    out = fxsparse.transform(model, masks)
    code, state = out.code, {k: v.clone() for k, v in out.state_dict().items()}
    fxsparse.freeze(out, layout="csr")
    assert out.code == code
    assert all(torch.equal(state[k], v) for k, v in out.state_dict().items())


def test_choose_is_pure_data() -> None:
    weight = torch.randn(32, 64) * (torch.rand(32, 64) > 0.9)
    candidate = Candidate("w", weight, None, weight != 0, (1,))
    assert (candidate.pattern, candidate.blocksize) == ("unstructured", None)
    (choice,) = choose([candidate], "csr").values()
    assert (choice.layout, choice.speedup, choice.rows) == ("csr", None, ())  # forced: nothing measured
    assert str(choice) == "csr"
    assert fxsparse.LayoutChoice.from_meta("w", choice.as_meta()) == choice


def test_the_masked_graph_compiles() -> None:
    model, masks = sparse_mlp(width=16)
    out = fxsparse.transform(model, masks)
    x = torch.randn(3, 16)
    compiled = torch.compile(out)
    torch.testing.assert_close(compiled(x), out(x), **TOLERANCE)
    compiled(x).sum().backward()  # trains too: the gradient reaches the weight through the mask
    assert out.get_parameter("0.weight").grad is not None
    sparse = torch.compile(fxsparse.freeze(out, layout="csr"))  # the sparse kernel is one opaque operator
    for rows in (x, x[:1]):  # with autograd on, as a plain call runs
        torch.testing.assert_close(sparse(rows), out(rows), **TOLERANCE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured kernels need CUDA")
def test_semi_structured_on_cuda() -> None:  # pragma: no cover - run on a GPU machine
    # Shapes and dtypes as torch's test_sparse_semi_structured.py uses them.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128)).cuda().half().eval()
    out = fxsparse.transform(model, fxsparse.masks.n_m(model, 2, 4))
    frozen = fxsparse.freeze(out, layout="semi_structured")
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), out(x), rtol=1e-3, atol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = fxsparse.freeze(out, layout="auto", example_inputs=(x,))
    assert set(fxsparse.layouts(auto)) == {"0.weight", "2.weight"}


@pytest.mark.parametrize("layout", ["csr", "bsr"])
def test_sparse_kernels_keep_the_dtype_and_differentiate_in_the_input(layout: str) -> None:
    model, masks = block_mlp()
    out = fxsparse.transform(model.double(), masks)
    frozen = fxsparse.freeze(out, layout=layout)
    x = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
    y = frozen(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, out(x))
    (grad,) = torch.autograd.grad(y.square().sum(), x)  # saliency maps, adversarial inputs
    (expected,) = torch.autograd.grad(out(x).square().sum(), x)
    torch.testing.assert_close(grad, expected)


def test_measuring_leaves_the_model_as_it_was() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.Linear(64, 64)).train()
    out = fxsparse.transform(model, fxsparse.masks.magnitude(model, 0.95))
    frozen = fxsparse.freeze(out, layout="auto", example_inputs=(torch.randn(8, 64) * 5,))
    assert out.training and not frozen.training  # a frozen model is in eval mode; out stays as it was
    assert torch.equal(frozen.get_buffer("1.running_mean"), out.get_buffer("1.running_mean"))


def test_auto_reads_a_weight_passed_by_keyword() -> None:
    class KeywordLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(256, 256)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(x, weight=self.proj.weight)

    model = KeywordLinear()
    out = fxsparse.transform(model, fxsparse.masks.magnitude(model, 0.99))
    frozen = fxsparse.freeze(out, layout="auto", example_inputs=(torch.randn(5, 256),))
    assert fxsparse.layouts(frozen)["proj.weight"].rows == (5,)


def test_bad_example_inputs_name_what_failed() -> None:
    model, masks = sparse_mlp()
    out = fxsparse.transform(model, masks)
    with pytest.raises(fxsparse.EmitError, match=r"layout='auto' runs the model on example_inputs.*mat1 and mat2"):
        fxsparse.freeze(out, layout="auto", example_inputs=(torch.randn(3, 5),))


def test_a_frozen_model_is_frozen_from_its_masked_graph() -> None:
    model, masks = sparse_mlp()
    frozen = fxsparse.freeze(fxsparse.transform(model, masks))
    with pytest.raises(fxsparse.MaskError, match="it is frozen already: freeze the masked graph itself"):
        fxsparse.freeze(frozen, layout="csr")
    choices = fxsparse.layouts(fxsparse.freeze(fxsparse.transform(model, masks), layout="csr"))
    assert len(set(choices.values())) == 2  # hashable
    assert all(choice.note == "layout='csr'" for choice in choices.values())  # forced: nothing measured


@pytest.mark.parametrize("emit", ["script", "trace"])
def test_sparse_torchscript_loads_without_fxsparse(emit: str, tmp_path: pytest.TempPathFactory) -> None:
    model, masks = sparse_mlp()
    scripted = fxsparse.freeze(
        fxsparse.transform(model, masks), layout="csr", emit=emit, example_inputs=(torch.randn(2, 64),)
    )
    path = str(tmp_path / "frozen.pt")  # type: ignore[operator]
    torch.jit.save(scripted, path)
    x = torch.randn(3, 64)
    torch.save(x, path + ".x")
    expected = scripted(x)
    code = (
        "import sys, warnings, torch; warnings.simplefilter('ignore'); "
        f"m = torch.jit.load({path!r}); y = m(torch.load({path + '.x'!r})); "
        "assert 'fxsparse' not in sys.modules; torch.save(y, " + repr(path + ".y") + ")"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    assert torch.equal(torch.load(path + ".y"), expected)


def test_the_diff_and_the_drawings_show_each_layout() -> None:
    model, masks = sparse_mlp()
    out = fxsparse.transform(model, masks)
    frozen = fxsparse.freeze(out, layout="csr")
    change = fxsparse.viz.diff(out, frozen)
    assert {("_0", "_0"), ("_2", "_2")} <= set(change.changed)  # the linear calls, now sparse kernels
    assert {"_0_weight_mask", "_0_weight_masked"} <= set(change.removed)
    source = fxsparse.viz.draw(frozen).source
    assert "csr_linear\\ncsr  density 0.100" in source
    assert fxsparse.viz.KINDS["sparse"] in source


@pytest.mark.parametrize("layout", ["csr", "bsr"])
def test_a_wrong_input_width_is_an_error_not_garbage(layout: str) -> None:
    model, masks = block_mlp()
    out = fxsparse.transform(model, masks)
    for call in (fxsparse.freeze(out, layout=layout), fxsparse.freeze(out, layout=layout, emit="script")):
        with pytest.raises(
            (RuntimeError, torch.jit.Error), match="in_features=64 got an input whose last dimension is 8"
        ):
            call(torch.randn(4, 8))
