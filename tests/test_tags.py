"""Node tags: typed, written by fxsparse only, and the only way fxsparse knows its own nodes (issue 13, item 4)."""

from __future__ import annotations

import ast
import copy
import io
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse import Role, Tag, _capture, _rewrite, tag_of


class GatedModel(nn.Module):
    """A model with its own ``torch.mul(gate_mask, gate)``: the very pattern fxsparse's masks make."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = nn.Parameter(torch.randn(4))
        self.register_buffer("gate_mask", torch.tensor([1.0, 0.0, 1.0, 0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * torch.mul(self.gate_mask, self.gate)


def _eager_reference(model: GatedModel, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    weight = mask * model.fc.weight
    return torch.nn.functional.linear(x, weight, model.fc.bias) * (model.gate_mask * model.gate)


def test_a_models_own_mask_multiply_is_not_taken_for_an_fxsparse_mask() -> None:
    torch.manual_seed(0)
    model = GatedModel()
    mask = torch.rand(4, 4) > 0.5
    x = torch.randn(3, 4)
    out = fxsparse.transform(model, {"fc": mask})
    masked = [tag.param for node in out.graph.nodes if (tag := tag_of(node)) is not None and tag.role is Role.MASKED]
    assert masked == ["fc.weight"]
    assert set(fxsparse.viz.masks_of(out)) == {"fc.weight"}
    frozen = fxsparse.freeze(out)
    assert "gate_mask" in frozen.state_dict()  # freeze used to delete the model's own buffer
    assert torch.equal(frozen.get_buffer("gate_mask"), model.gate_mask)
    assert torch.equal(frozen(x), _eager_reference(model, mask, x))


def test_a_models_own_mask_multiply_stays_its_own_when_an_output_is_transformed_again() -> None:
    torch.manual_seed(0)
    model = GatedModel()
    first = fxsparse.transform(model, {"fc": torch.rand(4, 4) > 0.5})
    again = fxsparse.transform(first, {"fc.bias": torch.ones(4)})  # FX traces first's code again: tags are lost
    masked = sorted(str(tag.param) for node in again.graph.nodes if (tag := tag_of(node)) and tag.role is Role.MASKED)
    assert masked == ["fc.bias", "fc.weight"]
    frozen = fxsparse.freeze(again)
    assert "gate_mask" in frozen.state_dict()
    x = torch.randn(2, 4)
    assert torch.equal(frozen(x), again(x))


def test_every_tag_is_typed_with_a_role() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.MultiheadAttention(4, 2, batch_first=True))
    out = fxsparse.transform(model[:2], {"0": torch.ones(4, 4)})
    tags = [tag_of(node) for node in out.graph.nodes if tag_of(node) is not None]
    assert tags and all(isinstance(tag, Tag) and isinstance(tag.role, Role) for tag in tags)
    assert set(fxsparse.ROLES) == {role.value for role in Role}
    # A tag still reads as the mapping fxsparse documented before (``tag["role"] == "masked"``).
    product = next(tag for tag in tags if tag.role is Role.MASKED)
    assert product["role"] == "masked" and dict(product) == {
        "role": "masked",
        "param": "0.weight",
        "mask": "0.weight_mask",
    }


def test_tags_survive_copies_and_pickles_as_tags() -> None:
    out = fxsparse.transform(nn.Sequential(nn.Linear(3, 3)), {"0": torch.eye(3)})
    buffer = io.BytesIO()
    torch.save(out, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(out), pickle.loads(pickle.dumps(out)), torch.load(buffer, weights_only=False)):
        roles = [tag.role for node in clone.graph.nodes if (tag := tag_of(node)) is not None]
        assert roles.count(Role.MASKED) == 1 and all(isinstance(role, Role) for role in roles)


def test_an_exported_output_has_its_masks_tagged() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    program = fxsparse.transform(
        model, {"0": torch.rand(4, 4) > 0.5}, emit="export", example_inputs=(torch.randn(2, 4),)
    )
    assert set(fxsparse.viz.masks_of(program)) == {"0.weight"}
    assert fxsparse.viz.diff(torch.fx.symbolic_trace(model), program).roles  # the drawings see the product


def test_the_plan_is_data_that_pickles_and_shares_no_tensor_with_the_output() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(1, 1, 3))
    masks = {"0": torch.rand(4, 4) > 0.5, "1": torch.rand(1, 1, 3, 3)}
    plan = fxsparse.plan(model, masks)
    restored = pickle.loads(pickle.dumps(plan))
    assert [p.name for p in restored.parameters] == [p.name for p in plan.parameters]
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(restored.parameters, plan.parameters, strict=True))
    # The rewrite registers copies: the plan stays data of its own, whatever the output does to its buffers.
    root = copy.deepcopy(model)
    graph, plan = _capture.trace(root, plan)
    _rewrite.rewrite(root, graph, plan)
    for p in plan.parameters:
        assert root.get_buffer(p.mask_name).data_ptr() != p.mask.data_ptr()


def test_an_exported_program_knows_its_masks_by_record_not_by_name_after_save_and_load() -> None:
    torch.manual_seed(0)
    model = GatedModel()
    mask = torch.rand(4, 4) > 0.5
    x = torch.randn(2, 4)
    program = fxsparse.transform(model, {"fc": mask}, emit="export", example_inputs=(x,))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    before = torch.fx.symbolic_trace(model)
    for candidate in (program, loaded):
        masks = fxsparse.viz.masks_of(candidate)
        assert list(masks) == ["fc.weight"]  # the model's own gate_mask beside gate is not a mask
        assert torch.equal(masks["fc.weight"], mask)
        roles = fxsparse.viz.diff(before, candidate).roles
        assert sorted(str(role) for role in roles.values()) == ["mask", "masked", "weight"]
        assert "density 0." in fxsparse.viz.draw(candidate).source
    assert torch.equal(loaded.module()(x), _eager_reference(model, mask, x))


@pytest.mark.parametrize("emit", ["script", "trace"])
def test_a_torchscript_output_knows_its_masks_by_record_not_by_name(emit: str) -> None:
    torch.manual_seed(0)
    model = GatedModel()
    mask = torch.rand(4, 4) > 0.5
    x = torch.randn(2, 4)
    compiled = fxsparse.transform(model, {"fc": mask}, emit=emit, example_inputs=(x,))
    buffer = io.BytesIO()
    torch.jit.save(compiled, buffer)
    buffer.seek(0)
    for candidate in (compiled, torch.jit.load(buffer)):
        masks = fxsparse.viz.masks_of(candidate)
        assert list(masks) == ["fc.weight"] and torch.equal(masks["fc.weight"], mask)
        # Writing a "mask" into the model's own gate_mask would change what the model computes.
        with pytest.raises(fxsparse.MaskError, match="'gate' is not masked"):
            fxsparse.update_masks(candidate, {"gate": torch.zeros(4)})
        assert torch.equal(candidate.gate_mask, model.gate_mask)
        fxsparse.update_masks(candidate, {"fc": torch.ones(4, 4, dtype=torch.bool)})
        assert torch.equal(candidate(x), _eager_reference(model, torch.ones(4, 4), x))


def test_a_frozen_torchscript_output_has_no_masks_to_update() -> None:
    model = GatedModel()
    frozen = fxsparse.freeze(fxsparse.transform(model, {"fc": torch.ones(4, 4)}), emit="script")
    assert fxsparse.viz.masks_of(frozen) == {}
    with pytest.raises(fxsparse.MaskError, match="no masks to update"):
        fxsparse.update_masks(frozen, {"gate": torch.zeros(4)})


def _hand_spelled_tags(tree: ast.AST) -> list[str]:
    """The tag key used as a literal (``meta["fxsparse"]``, ``meta.get("fxsparse")``), and a role
    compared with its string value (``role == "masked"``, ``role in ("weight", ...)``)."""
    roles = {role.value for role in Role}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            key = node.slice.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            key = node.args[0].value if node.func.attr == "get" and isinstance(node.args[0], ast.Constant) else None
        elif isinstance(node, ast.Compare) and "role" in ast.unparse(node.left):
            strings = {n.value for c in node.comparators for n in ast.walk(c) if isinstance(n, ast.Constant)}
            key = next(iter(strings & roles), None)
            key = f"role {key}" if key is not None else None
        else:
            continue
        if key == fxsparse.META_KEY or (isinstance(key, str) and key.startswith("role ")):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_but_tags_spells_the_tag_key_or_a_role_by_hand() -> None:
    assert _hand_spelled_tags(ast.parse('meta.get("fxsparse", {})\nx = data["role"] in ("opened", "x")'))
    package = Path(fxsparse.__file__).parent
    found = [
        f"{path.relative_to(package)}:{where}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "_tags.py"
        for where in _hand_spelled_tags(ast.parse(path.read_text()))
    ]
    assert not found, "read tags through fxsparse._tags (tag_of, Role):\n" + "\n".join(found)
