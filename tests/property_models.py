"""Random models and masks for the property tests (tests/test_properties.py, tools/property_check.py).

A model is a chain of blocks drawn by hypothesis: a Linear (bias on or off), a nested
Sequential of two, a Linear called twice (a reused layer), or a pair of Linears sharing
one weight (a tied pair), with ReLUs between. Masks are drawn per weight: binary, soft,
all zero, all one; widths go down to 1, so a weight can have one element.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn
from torch.ao.pruning import FakeSparsity
from torch.nn.utils import parametrize

import fxsparse

BLOCKS = ("linear", "nested", "reused", "tied")
MASKS = ("binary", "soft", "zeros", "ones", "one kept")


class Chain(nn.Module):
    def __init__(self, blocks: list[tuple[str, int, bool]], width: int) -> None:
        super().__init__()
        self.kinds = [kind for kind, _, _ in blocks]
        layers: list[nn.Module] = []
        for kind, out, bias in blocks:
            if kind == "linear":
                layers.append(nn.Linear(width, out, bias=bias))
                width = out
            elif kind == "nested":
                layers.append(nn.Sequential(nn.Linear(width, out, bias=bias), nn.ReLU(), nn.Linear(out, width)))
            elif kind == "reused":
                layers.append(nn.Linear(width, width, bias=bias))
            else:
                pair = nn.ModuleList([nn.Linear(width, width, bias=bias), nn.Linear(width, width, bias=not bias)])
                pair[1].weight = pair[0].weight
                layers.append(pair)
        self.layers = nn.ModuleList(layers)
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kind, layer in zip(self.kinds, self.layers, strict=True):
            if kind == "reused":
                x = layer(torch.relu(layer(x)))
            elif kind == "tied":
                x = layer[1](torch.relu(layer[0](x)))
            else:
                x = layer(x)
            x = torch.relu(x)
        return x


@st.composite
def models(draw: Any) -> tuple[nn.Module, int]:
    width = draw(st.integers(1, 6))
    blocks = draw(
        st.lists(st.tuples(st.sampled_from(BLOCKS), st.integers(1, 6), st.booleans()), min_size=1, max_size=4)
    )
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return Chain(blocks, width), width


@st.composite
def masks_for(draw: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    aliases: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    masks = {}
    for names in aliases.values():
        if not draw(st.booleans()):
            continue
        name = draw(st.sampled_from(names))  # a tied pair's mask under either name
        parameter = model.get_parameter(name)
        kind = draw(st.sampled_from(MASKS))
        masks[name] = _mask(kind, parameter.shape, generator)
    return masks


def _mask(kind: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    if kind == "binary":
        return torch.rand(shape, generator=generator) > 0.5
    if kind == "soft":
        return torch.rand(shape, generator=generator)
    if kind == "one kept":
        mask = torch.zeros(shape, dtype=torch.bool)
        mask.view(-1)[int(torch.randint(mask.numel(), (1,), generator=generator))] = True
        return mask
    return torch.zeros(shape, dtype=torch.bool) if kind == "zeros" else torch.ones(shape)


def fake_sparsity(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """The reference: FakeSparsity on every alias of each masked parameter.

    Built from torch alone (the aliases from ``named_parameters``), not from anything of
    fxsparse's: a planning bug must not hide by being on both sides.
    """
    reference = copy.deepcopy(model)
    aliases: dict[int, list[str]] = {}
    for name, parameter in reference.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    names_of = {name: names for names in aliases.values() for name in names}
    for key, mask in masks.items():
        for alias in names_of[key]:
            owner, _, name = alias.rpartition(".")
            parametrize.register_parametrization(reference.get_submodule(owner), name, FakeSparsity(mask.clone()))
    return reference


def check_properties(model: nn.Module, width: int, masks: dict[str, torch.Tensor]) -> None:
    """What every model and masks must satisfy; raises AssertionError otherwise."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = fxsparse.transform(model, masks)
    x = torch.randn(3, width)
    with torch.no_grad():
        assert torch.equal(out(x), fake_sparsity(model, masks)(x)), "output differs from FakeSparsity"
    # the input model is unchanged
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    # state_dict round trip: into a transform with other masks, then equal again
    other = fxsparse.transform(model, {name: torch.ones_like(mask) for name, mask in masks.items()})
    other.load_state_dict(out.state_dict())
    with torch.no_grad():
        assert torch.equal(other(x), out(x)), "state_dict round trip changed the output"
    assert all(torch.equal(other.state_dict()[k], v) for k, v in out.state_dict().items())
    if masks:  # frozen: the masks folded into the weights, the same outputs, the model's own keys
        frozen = fxsparse.freeze(out)
        with torch.no_grad():
            assert torch.equal(frozen(x), out(x)), "freeze changed the output"
        assert set(frozen.state_dict()) == set(model.state_dict())
