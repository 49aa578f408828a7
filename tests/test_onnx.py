"""emit="onnx": each mask a named initializer feeding a visible Mul; onnxruntime agrees with eager torch."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import fxsparse

from hf_zoo import FAMILIES, build, dynamic_shapes, random_masks
from reference import eager, fake_sparsity
from zoo import ZOO, inputs, make_masks, parameter_name
from zoo import build as build_case


def run(model: onnx.ModelProto, feeds: dict[str, torch.Tensor]) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {name: value.numpy() for name, value in feeds.items()})  # type: ignore[no-any-return]


def mask_readers(model: onnx.ModelProto, mask: str) -> list[str]:
    """Op types of the nodes reading ``mask``, looking through a Cast (a bool mask cast to the weight's dtype)."""
    readers = []
    for node in model.graph.node:
        if mask in node.input:
            if node.op_type == "Cast":
                readers += [n.op_type for n in model.graph.node if node.output[0] in n.input]
            else:
                readers.append(node.op_type)
    return readers


@pytest.mark.parametrize(
    ("name", "kind"),
    [("seed_model", "random"), ("seed_model", "bool"), ("conv_net", "random"), ("tied_embedding_head", "random"),
     ("addmm_custom", "bool")],
)  # fmt: skip
def test_masks_are_named_initializers_feeding_a_mul(name: str, kind: str) -> None:
    case = ZOO[name]
    model = build_case(case)
    masks = make_masks(model, case, kind)
    args = inputs(case)
    program = fxsparse.transform(model, masks, emit="onnx", example_inputs=args)
    proto = program.model_proto
    initializers = {i.name for i in proto.graph.initializer}
    for key in masks:
        mask = f"{parameter_name(model, key)}_mask"
        assert mask in initializers
        assert mask_readers(proto, mask) == ["Mul"]
    (result,) = run(proto, dict(zip([i.name for i in proto.graph.input], args, strict=True)))
    # onnxruntime's kernels are not torch's: equal within float32 round-off.
    np.testing.assert_allclose(result, eager(model, masks, *args).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_fake_sparsity_export_folds_the_mask_away() -> None:
    """What fxsparse fixes: exported through FakeSparsity, the mask is gone into an anonymous weight."""
    case = ZOO["seed_model"]
    model = build_case(case)
    masks = make_masks(model, case, "random")
    args = inputs(case)
    folded = torch.onnx.export(fake_sparsity(model, masks), args, dynamo=True, verbose=False).model_proto
    assert not any("mask" in i.name for i in folded.graph.initializer)
    assert not any(node.op_type == "Mul" for node in folded.graph.node)
    ours = fxsparse.transform(model, masks, emit="onnx", example_inputs=args).model_proto
    assert sum(node.op_type == "Mul" for node in ours.graph.node) == len(masks)


def test_gpt2_with_dynamic_batch_and_sequence() -> None:
    family = FAMILIES["gpt2"]
    model = build(family)
    masks = random_masks(model)
    example = family.inputs(2, 8)
    program = fxsparse.transform(
        model, masks, emit="onnx", example_kwargs=example, dynamic_shapes=dynamic_shapes(example)
    )
    proto = program.model_proto
    for name in masks:
        assert mask_readers(proto, f"{name}_mask") == ["Mul"]
    out = fxsparse.transform(model, masks, example_kwargs=example, dynamic_shapes=dynamic_shapes(example))
    for batch, sequence in [(2, 8), (3, 5)]:
        feeds = family.inputs(batch, sequence)
        (logits,) = run(proto, feeds)
        with torch.no_grad():
            expected = out(**feeds).logits.numpy()
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_missing_onnxscript_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "onnxscript" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    case = ZOO["seed_model"]
    with pytest.raises(fxsparse.EmitError, match=r"onnxscript is missing.*pip install 'fxsparse\[onnx\]'"):
        fxsparse.transform(build_case(case), {"linear": torch.ones(16, 16)}, emit="onnx", example_inputs=inputs(case))


class SharedTwice(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = self.b = torch.nn.Linear(4, 4)  # one module, two names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_a_module_shared_under_two_names_keeps_its_mask() -> None:
    x = torch.randn(2, 4)
    program = fxsparse.transform(
        SharedTwice().eval(), {"a.weight": torch.rand(4, 4) > 0.5}, emit="onnx", example_inputs=(x,)
    )
    proto = program.model_proto
    (mask,) = [i.name for i in proto.graph.initializer if i.name.endswith("weight_mask")]
    assert mask_readers(proto, mask) == ["Mul"]
