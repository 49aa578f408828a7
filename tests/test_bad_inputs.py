"""Every bad input of the trust issue: a clear fxsparse error naming the parameter, or working as
documented; the input model untouched. docs/errors.md tables the same rows."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fxsparse

DOCS = Path(__file__).parent.parent / "docs" / "errors.md"


def small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


class ReturnsAWidth(nn.Module):
    """A forward whose output is a number, not a tensor: nothing to check a shrunk model on."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> list[int]:
        return [self.fc2(torch.relu(self.fc1(x))).shape[-1]]


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else x


class ScalesItsWeightInPlace(Untraceable):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.fc.weight.t()
        weight.mul_(2)
        return x @ weight


ONES4 = torch.ones(4, 4)
X24 = (torch.randn(2, 4),)
ZERO34 = torch.zeros(3, 4)


@torch.fx.wrap
def twice_through(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer(x) * 2  # type: ignore[no-any-return]


class PassesItsLayer(Untraceable):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return twice_through(self.fc, x)


class Holder:
    def __init__(self, module: nn.Module) -> None:
        self.module = module


class ClosureOverAHolder(Untraceable):
    def __init__(self) -> None:
        super().__init__()
        holder = Holder(self.fc)
        self.f = lambda x: holder.module(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)  # type: ignore[no-any-return]


REGISTRY: dict[str, nn.Module] = {}


class ThroughAGlobal(Untraceable):
    def __init__(self) -> None:
        super().__init__()
        REGISTRY["fc"] = self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return REGISTRY["fc"](x)


class DoublesInTraining(Untraceable):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * 2 if self.training else self.fc(x)


def one_block_switched_alone() -> nn.Module:
    out = fxsparse.transform(nn.Sequential(DoublesInTraining()).train(), {"0.fc": ONES4})
    out.get_submodule("0").eval()
    return out  # type: ignore[no-any-return]


class TracesInTrainModeOnly(Untraceable):
    """Eval mode draws from a traced size (``torch.rand`` refuses a proxy): FX traces train mode only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if self.training else self.fc(x) * (torch.rand(x.shape[0], 1) > 0.5)


def with_root_hook() -> nn.Module:
    model = small()
    model.register_forward_hook(lambda module, args, output: output * 2)
    return model


def onnx_program() -> Any:
    return fxsparse.transform(small().eval(), {"0": ONES}, emit="onnx", example_inputs=(torch.randn(2, 4),))


def tied() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    return model


def tied_with_fake_sparsity(first: torch.Tensor, second: torch.Tensor) -> nn.Module:
    from torch.ao.pruning import FakeSparsity
    from torch.nn.utils import parametrize

    model = tied()
    for module, mask in zip(model, (first, second), strict=True):
        parametrize.register_parametrization(module, "weight", FakeSparsity(mask))
    return model


def int8_weight() -> nn.Module:
    model = small()
    model[0].weight = nn.Parameter(torch.ones(3, 4, dtype=torch.int8), requires_grad=False)
    return model


def quantized() -> nn.Module:
    import torch.ao.nn.quantized as nnq

    with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensor creation, warning once a process
        warnings.simplefilter("ignore", UserWarning)
        return nn.Sequential(nnq.Linear(4, 3))


def quantized_mask() -> torch.Tensor:
    with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensor creation, warning once a process
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_tensor(ONES, 1.0, 0, torch.quint8)


def mask_file(tmp_path: Path, kind: str) -> Path:
    if kind == "truncated":
        path = fxsparse.save_masks({"0.weight": torch.ones(3, 4, dtype=torch.bool)}, tmp_path / "m.safetensors")
        path.write_bytes(path.read_bytes()[:40])
        return path
    path = tmp_path / "code.pt"

    class RunsCode:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (exec, (f"open({str(tmp_path / 'ran')!r}, 'w')",))

    torch.save({"0.weight": RunsCode()}, path)
    return path


def not_a_place_to_save(tmp_path: Path, kind: str) -> Path:
    """A path a save must not rename a new file over: a FIFO, a read-only file, or below a dangling symlink."""
    if kind == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs on this system")
        os.mkfifo(tmp_path / "pipe.pt")
        return tmp_path / "pipe.pt"
    if kind == "read-only":
        (tmp_path / "kept.pt").write_bytes(b"someone's data")
        (tmp_path / "kept.pt").chmod(0o444)
        return tmp_path / "kept.pt"
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere" / "missing")
    return tmp_path / "link" / "sub" / "m.pt"


ONES = torch.ones(3, 4)


def frozen_with_warning(model: nn.Module, warning: str, **options: Any) -> Any:
    out = fxsparse.transform(model, {"0": ONES})
    with pytest.warns(UserWarning, match=warning):
        return fxsparse.freeze(out, example_inputs=(torch.randn(2, 4),), **options)


def shrunk_with_warning(out: torch.fx.GraphModule, warning: str) -> nn.Module:
    with pytest.warns(UserWarning, match=warning):
        return fxsparse.shrink(out, example_inputs=X24)


# (case as named in docs/errors.md, model factory, call, expected: an error type and message, or None: works)
CASES: list[tuple[str, Callable[[], nn.Module], Callable[[nn.Module, Path], Any], tuple[type, str] | None]] = [
    (
        "unknown key",
        small,
        lambda m, _: fxsparse.transform(m, {"5.weight": ONES}),
        (fxsparse.MaskError, "mask key '5.weight' names no parameter or module of the model; closest valid names"),
    ),
    (
        "key naming a module without a weight",
        small,
        lambda m, _: fxsparse.transform(m, {"1": ONES}),
        (fxsparse.MaskError, "names module '1' (ReLU), which has no parameter 'weight'"),
    ),
    (
        "shape mismatch",
        small,
        lambda m, _: fxsparse.transform(m, {"0": torch.ones(3, 3)}),
        (fxsparse.MaskError, "mask for '0.weight' (key '0') has shape (3, 3), but the parameter has shape (3, 4)"),
    ),
    (
        "transposed shape",
        small,
        lambda m, _: fxsparse.transform(m, {"0": ONES.T}),
        (fxsparse.MaskError, "has shape (4, 3), but the parameter has shape (3, 4)"),
    ),
    (
        "non-tensor",
        small,
        lambda m, _: fxsparse.transform(m, {"0": [[1] * 4] * 3}),
        (fxsparse.MaskError, "mask for '0.weight' (key '0') must be a torch.Tensor, got list"),
    ),
    (
        "NaN or inf mask",
        small,
        lambda m, _: fxsparse.transform(m, {"0": torch.full((3, 4), float("inf"))}),
        (fxsparse.MaskError, "holds NaN or infinite values"),
    ),
    ("integer 0/1 mask", small, lambda m, _: fxsparse.transform(m, {"0": torch.ones(3, 4, dtype=torch.int64)}), None),
    (
        "complex mask",
        small,
        lambda m, _: fxsparse.transform(m, {"0": ONES.to(torch.complex64)}),
        (fxsparse.MaskError, "must be bool, integer or floating, got torch.complex64"),
    ),
    (
        "float8 or unsigned 16/32/64-bit mask",
        small,
        lambda m, _: [fxsparse.transform(m, {"0": ONES.to(t)}) for t in (torch.float8_e4m3fn, torch.uint64)],
        None,
    ),
    (
        "mask of a bit or sub-byte dtype",
        small,
        lambda m, _: fxsparse.transform(m, {"0": torch.empty(3, 4, dtype=torch.uint4)}),
        (fxsparse.MaskError, "must be bool, integer or floating, got torch.uint4"),
    ),
    ("mask with requires_grad", small, lambda m, _: fxsparse.transform(m, {"0": ONES.requires_grad_()}), None),
    (
        "mask on another device",
        small,
        lambda m, _: fxsparse.transform(m, {"0": ONES.to("meta")}),
        (fxsparse.MaskError, "is on the meta device and holds no values"),
    ),
    ("empty mask dict", small, lambda m, _: fxsparse.transform(m, {}), None),
    (
        "two keys for one tied parameter",
        tied,
        lambda m, _: fxsparse.transform(m, {"0.weight": torch.ones(4, 4), "1.weight": torch.zeros(4, 4)}),
        (fxsparse.MaskError, "mask keys '0.weight' and '1.weight' name the same parameter '0.weight'"),
    ),
    (
        "tied weight with a different FakeSparsity mask on each alias",
        lambda: tied_with_fake_sparsity(torch.ones(4, 4), torch.zeros(4, 4)),
        lambda m, _: fxsparse.transform(m),
        (fxsparse.MaskError, "'0.weight' and '1.weight' are one tied parameter with a different FakeSparsity mask"),
    ),
    (
        "update_masks with two keys for one tied parameter",
        lambda: fxsparse.transform(tied(), {"0": torch.ones(4, 4)}, emit="parametrize"),
        lambda m, _: fxsparse.update_masks(m, {"0.weight": torch.ones(4, 4), "1.weight": torch.zeros(4, 4)}),
        (fxsparse.MaskError, "mask keys '0.weight' and '1.weight' name the same parameter '0.weight' (tied to"),
    ),
    (
        "LazyLinear not initialised",
        lambda: nn.Sequential(nn.LazyLinear(3)),
        lambda m, _: fxsparse.transform(m, {"0": ONES}),
        (fxsparse.MaskError, "is not initialised yet"),
    ),
    ("integer weight", int8_weight, lambda m, _: fxsparse.transform(m, {"0": ONES}), None),
    (
        "quantized module",
        quantized,
        lambda m, _: fxsparse.transform(m, {"0": ONES}),
        (fxsparse.MaskError, "a quantized module whose weight is packed, not a parameter: mask the float model"),
    ),
    (
        "quantized mask",
        small,
        lambda m, _: fxsparse.transform(m, {"0": quantized_mask()}),
        (fxsparse.MaskError, "mask for '0.weight' (key '0') is a quantized tensor (torch.quint8); a mask holds plain"),
    ),
    (
        "model FX cannot trace",
        Untraceable,
        lambda m, _: fxsparse.transform(m, {"fc": torch.ones(4, 4)}),
        (fxsparse.TraceError, "pass example_inputs"),
    ),
    (
        "fxsparse output transformed again",
        lambda: fxsparse.transform(small(), {"0": ONES}),
        lambda m, _: fxsparse.transform(m, {"0": ONES}),
        (fxsparse.MaskError, "change the mask in place with fxsparse.update_masks(out, {'0.weight': mask})"),
    ),
    (
        "example inputs of the wrong shape (export)",
        small,
        lambda m, _: fxsparse.transform(m, {"0": ONES}, capture="export", example_inputs=(torch.randn(2, 5),)),
        (fxsparse.TraceError, "torch.export could not capture Sequential"),
    ),
    (
        "corrupt or truncated mask file",
        small,
        lambda m, tmp: fxsparse.load_masks(mask_file(tmp, "truncated")),
        (fxsparse.MaskError, "corrupt or truncated"),
    ),
    (
        "share_weights that is not a bool",
        small,
        lambda m, _: fxsparse.transform(m, {"0": ONES}, share_weights="yes"),
        (fxsparse.MaskError, "share_weights must be True or False, got 'yes'"),
    ),
    (
        "fold that is not a bool",
        small,
        lambda m, _: fxsparse.transform(m, {"0": ONES}, fold="yes"),
        (fxsparse.MaskError, "fold must be True or False, got 'yes'"),
    ),
    (
        "soft mask with fold=True",
        small,
        lambda m, _: fxsparse.transform(m, {"0": torch.full((3, 4), 0.5)}, fold=True),
        (
            fxsparse.MaskError,
            "mask for '0.weight' has values other than 0 and 1, and a folded weight holds mask * weight",
        ),
    ),
    (
        "fold=True with share_weights=True",
        small,
        lambda m, _: fxsparse.transform(m, {"0": ONES}, fold=True, share_weights=True),
        (fxsparse.MaskError, "fold=True with share_weights=True would write mask * weight"),
    ),
    (
        "fold=True with an emit other than 'graph'",
        small,
        lambda m, _: fxsparse.transform(m, {"0": ONES}, fold=True, emit="script"),
        (
            fxsparse.EmitError,
            "fold=True makes a model to train, which only emit='graph' keeps as such, got emit='script'",
        ),
    ),
    (
        "fold=True of a model that writes into a masked weight",
        ScalesItsWeightInPlace,
        lambda m, _: fxsparse.transform(m, {"fc": ONES4}, fold=True),
        (fxsparse.MaskError, "the model writes into the masked weight 'fc.weight' (mul_ in node 'mul_')"),
    ),
    (
        "folded output transformed again",
        lambda: fxsparse.transform(small(), {"0": ONES}, fold=True),
        lambda m, _: fxsparse.transform(m, {"2": torch.ones(2, 3)}),
        (fxsparse.MaskError, "this output is folded (its weights hold mask * weight, fxsparse.fold)"),
    ),
    (
        "freeze inplace that is not a bool",
        small,
        lambda m, _: fxsparse.freeze(fxsparse.transform(m, {"0": ONES}), inplace="yes"),
        (fxsparse.EmitError, "inplace must be True or False, got 'yes'"),
    ),
    (
        "unknown freeze layout",
        small,
        lambda m, _: fxsparse.freeze(fxsparse.transform(m, {"0": ONES}), layout="sparse"),
        (fxsparse.MaskError, "layout must be one of 'dense', 'auto', 'csr', 'bsr', 'semi_structured', got 'sparse'"),
    ),
    (
        "layout a mask cannot take",
        small,
        lambda m, _: fxsparse.freeze(fxsparse.transform(m, {"0": ONES}), layout="bsr"),
        (fxsparse.MaskError, "0.weight: its dense mask is not made of square blocks (4x4 to 64x64)"),
    ),
    (
        "2:4 kernels without a GPU",
        small,
        lambda m, _: fxsparse.freeze(fxsparse.transform(m, {"0": ONES}), layout="semi_structured"),
        (fxsparse.MaskError, "2:4 semi-structured kernels need a CUDA weight, this one is on cpu"),
    ),
    (
        "sparse layout with emit='export' or 'onnx'",
        small,
        lambda m, _: frozen_with_warning(m, "cannot carry sparse weights", layout="csr", emit="export"),
        None,
    ),
    (
        "mask file that runs code on load",
        small,
        lambda m, tmp: fxsparse.load_masks(mask_file(tmp, "code")),
        (fxsparse.MaskError, "torch.load(weights_only=True) refused it"),
    ),
    (
        "save onto a FIFO, a device or a socket",
        small,
        lambda m, tmp: fxsparse.save(m.state_dict(), not_a_place_to_save(tmp, "fifo")),
        (fxsparse.EmitError, "is a FIFO (named pipe), not a regular file; saving renames a new file over the path"),
    ),
    (
        "save onto a read-only file",
        small,
        lambda m, tmp: fxsparse.save_masks({"0.weight": ONES}, not_a_place_to_save(tmp, "read-only")),
        (fxsparse.MaskError, "is read-only (mode -r--r--r--), and open() would refuse to write it"),
    ),
    (
        "save through a dangling symbolic link",
        small,
        lambda m, tmp: fxsparse.save(m.state_dict(), not_a_place_to_save(tmp, "dangling")),
        (fxsparse.EmitError, "which does not exist; fxsparse does not make folders through a symbolic link"),
    ),
    (
        "data sparsifier given to from_sparsifier",
        small,
        lambda m, _: fxsparse.masks.from_sparsifier(data_sparsifier(m)),
        (fxsparse.MaskError, "DataNormSparsifier is a data sparsifier, whose data ('first') are named by you"),
    ),
    (
        "structured pruner given to from_sparsifier",
        small,
        lambda m, _: fxsparse.transform(m, fxsparse.masks.from_sparsifier(structured_pruner(m))),
        None,
    ),
    (
        "masked module passed to a torch.fx.wrap function",
        PassesItsLayer,
        lambda m, _: fxsparse.transform(m, {"fc": ONES4}),
        (fxsparse.TraceError, "module 'fc', which holds masked parameters (fc.weight), is passed as an object to"),
    ),
    (
        "function on a module closing over an object that holds a submodule",
        ClosureOverAHolder,
        lambda m, _: fxsparse.transform(m, {"fc": ONES4}),
        (fxsparse.TraceError, "function 'f' stored on module '(root)', closure variable 'holder' holds a Holder"),
    ),
    (
        "forward reaching the model's weights through a global",
        ThroughAGlobal,
        lambda m, _: fxsparse.transform(m, {"fc": ONES4}, capture="export", example_inputs=(torch.randn(2, 4),)),
        (fxsparse.TraceError, "the captured graph reads the model's own tensor 'fc.weight'"),
    ),
    (
        "export capture called without an input it was captured with",
        small,
        lambda m, _: fxsparse.transform(m, {"0": ONES}, capture="export", example_inputs=(torch.randn(2, 4),))(),
        (TypeError, "missing input 'input': the model was captured with torch.export with 'input' given"),
    ),
    (
        "update_masks, check or from_parametrized given an ONNX program",
        small,
        lambda m, _: fxsparse.update_masks(onnx_program(), {"0.weight": ONES}),
        (fxsparse.MaskError, "takes fxsparse's output as a torch.nn.Module (emit='graph' or 'parametrize'), got"),
    ),
    (
        "submodule switched alone to the mode its traced code was not traced in",
        one_block_switched_alone,
        lambda m, _: m(torch.randn(2, 4)),
        (fxsparse.EmitError, "module '0' is in eval mode, but the graph this model runs in train mode was traced"),
    ),
    (
        "calibrated masks for a weight no linear reads",
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 2)),
        lambda m, _: fxsparse.masks.wanda(m, [torch.randn(2, 3, 4, 4)], include="*"),
        (fxsparse.MaskError, "0.weight: calibrated masks (wanda, sparsegpt) rank the inputs of a Linear"),
    ),
    (
        "empty calibration",
        small,
        lambda m, _: fxsparse.masks.wanda(m, []),
        (fxsparse.MaskError, "calibration is empty: pass at least one batch of model inputs"),
    ),
    (
        "freeze of an export capture made in train mode, without example inputs",
        lambda: small().train(),
        lambda m, _: fxsparse.freeze(
            fxsparse.transform(m, {"0": ONES}, capture="export", example_inputs=(torch.randn(2, 4),))
        ),
        (fxsparse.EmitError, "freeze makes an eval-mode model, and this output was captured by torch.export in train"),
    ),
    (
        "freeze of an output FX traced in train mode only",
        lambda: TracesInTrainModeOnly().train(),
        lambda m, _: fxsparse.freeze(fxsparse.transform(m, {"fc": ONES4})),
        (fxsparse.EmitError, "freeze makes an inference model, in eval mode, and this output cannot run in eval"),
    ),
    (
        "to_model with an unknown masks option",
        small,
        lambda m, _: fxsparse.to_model(fxsparse.transform(m, {"0": ONES}), masks="keep"),
        (fxsparse.EmitError, "masks must be one of 'fold', 'parametrize', got 'keep'"),
    ),
    (
        "to_model of an output transformed from a torch.fx.GraphModule",
        small,
        lambda m, _: fxsparse.to_model(fxsparse.transform(torch.fx.symbolic_trace(m), {"0": ONES})),
        (fxsparse.EmitError, "to_model needs the model's own class, and GraphModule does not record it"),
    ),
    (
        "to_model of an export capture whose root had forward hooks",
        with_root_hook,
        lambda m, _: fxsparse.to_model(
            fxsparse.transform(m, {"0": ONES}, capture="export", example_inputs=(torch.randn(2, 4),))
        ),
        (fxsparse.EmitError, "to_model cannot rebuild Sequential: its root module had forward hooks"),
    ),
    (
        "structured groups without example inputs",
        small,
        lambda m, _: fxsparse.groups(m),
        (fxsparse.TraceError, "structured pruning finds its groups on the graph torch.export captures"),
    ),
    (
        "channels with a sparsity outside [0, 1)",
        small,
        lambda m, _: fxsparse.masks.channels(m, 1.5, example_inputs=(torch.randn(2, 4),)),
        (fxsparse.MaskError, "sparsity must be a number in [0, 1), got 1.5"),
    ),
    (
        "shrink given something other than a transform output with masks",
        small,
        lambda m, _: fxsparse.shrink(m),
        (fxsparse.MaskError, "shrink takes the output of fxsparse.transform (emit='graph') with masks, got Sequential"),
    ),
    (
        "sparsity in percent (`magnitude(model, 50)`, `channels(model, 50, ...)`, `--sparsity 50`)",
        small,
        lambda m, _: fxsparse.masks.magnitude(m, 50),
        (
            fxsparse.MaskError,
            "sparsity for '0.weight' must be a number between 0 and 1, got 50: a fraction, so 0.5 for 50 %",
        ),
    ),
    (
        "mask maker whose `include` or `filter_fn` selects no weight",
        small,
        lambda m, _: fxsparse.masks.magnitude(m, 0.5, include="*attn*"),
        (
            fxsparse.MaskError,
            "no weight selected: include='*attn*' picks none of the modules with a weight ('0', '2'); include globs "
            "match module names like these",
        ),
    ),
    (
        "shrink of masks that zero no whole unit (magnitude, n_m, block)",
        small,
        lambda m, _: shrunk_with_warning(fxsparse.transform(m, fxsparse.masks.magnitude(m, 0.5)), "removed nothing"),
        None,
    ),
    (
        "shrink of an output captured with torch.fx, without example inputs",
        small,
        lambda m, _: fxsparse.shrink(fxsparse.transform(m, fxsparse.masks.channels(m, 0.5, example_inputs=X24))),
        (fxsparse.MaskError, "this output was captured with torch.fx, which records no input shapes"),
    ),
    (
        "shrink of masks that zero every unit of a group",
        small,
        lambda m, _: fxsparse.shrink(
            fxsparse.transform(m, {"0.weight": ZERO34, "0.bias": torch.zeros(3), "2.weight": torch.zeros(2, 3)}),
            example_inputs=X24,
        ),
        (fxsparse.MaskError, "the masks zero every unit of group 0.weight[0] (3 units)"),
    ),
    (
        "shrink of a model whose outputs hold no tensor",
        ReturnsAWidth,
        lambda m, _: fxsparse.shrink(
            fxsparse.transform(m, fxsparse.masks.channels(m, 0.5, example_inputs=X24), example_inputs=X24),
            example_inputs=X24,
        ),
        (fxsparse.MaskError, "found no tensor in the outputs of ReturnsAWidth"),
    ),
    (
        "shrink checked on inputs whose outputs are all zero",
        lambda: nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 2, bias=False)),
        lambda m, _: fxsparse.shrink(
            fxsparse.transform(m, fxsparse.masks.channels(m, 0.5, example_inputs=X24)),
            example_inputs=(torch.zeros(2, 4),),
        ),
        (fxsparse.MaskError, "on the example inputs are all zero (or not finite): they cannot tell a wrong"),
    ),
]


def data_sparsifier(model: nn.Module) -> Any:
    from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier

    sparsifier = DataNormSparsifier(sparsity_level=0.5)
    sparsifier.add_data("first", model.get_parameter("0.weight").detach().clone())
    return sparsifier


def structured_pruner(model: nn.Module) -> Any:
    """A SaliencyPruner prepared on a copy (prepare changes the model it is given)."""
    import copy

    from torch.ao.pruning._experimental.pruner import SaliencyPruner

    pruner = SaliencyPruner({"sparsity_level": 0.5})
    pruner.prepare(copy.deepcopy(model), [{"tensor_fqn": "0.weight"}])
    pruner.step()
    return pruner


@pytest.mark.parametrize(("name", "make", "call", "expected"), CASES, ids=[case[0] for case in CASES])
def test_bad_input(
    name: str, make: Callable[[], nn.Module], call: Callable[[nn.Module, Path], Any],
    expected: tuple[type, str] | None, tmp_path: Path,
) -> None:  # fmt: skip
    model = make()
    state = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor) and not isinstance(v, nn.parameter.UninitializedTensorMixin)
    }
    if expected is None:
        assert call(model, tmp_path) is not None
    else:
        error, message = expected
        with pytest.raises(error) as raised:
            call(model, tmp_path)
        assert message in str(raised.value)
    if state:  # nothing half-done: the model is as it was
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not (tmp_path / "ran").exists()


def test_the_docs_table_every_case() -> None:
    table = DOCS.read_text()
    missing = [name for name, *_ in CASES if f"| {name} |" not in table]
    assert missing == []


def test_update_masks_check_and_from_parametrized_refuse_an_onnx_program_naming_it() -> None:
    program = onnx_program()
    calls: dict[str, Callable[[Any], Any]] = {
        "update_masks": lambda p: fxsparse.update_masks(p, {"0.weight": ONES}),
        "check": lambda p: fxsparse.check(p, {"0.weight": ONES}),
        "check without masks": fxsparse.check,
        "from_parametrized": fxsparse.masks.from_parametrized,
    }
    for name, call in calls.items():
        function = name.split()[0]
        with pytest.raises(
            fxsparse.MaskError, match=rf"^{function} takes fxsparse's output as a torch.nn.Module .*ONNXProgram"
        ):
            call(program)
