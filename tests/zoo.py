"""A named zoo of small models, each with inputs and the names of the parameters to mask.

Every model is built with a fixed seed and random weights; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class ModelUnderTest(nn.Module):
    """The model of torch's own test/ao/sparsity/test_parametrization.py."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16, bias=bias)
        self.seq = nn.Sequential(nn.Linear(16, 16, bias=bias), nn.Linear(16, 16, bias=bias))
        self.linear.weight = nn.Parameter(torch.zeros_like(self.linear.weight) + 1.0)
        self.seq[0].weight = nn.Parameter(torch.zeros_like(self.seq[0].weight) + 2.0)
        self.seq[1].weight = nn.Parameter(torch.zeros_like(self.seq[1].weight) + 3.0)
        if bias:
            self.linear.bias = nn.Parameter(torch.zeros_like(self.linear.bias) + 10.0)
            self.seq[0].bias = nn.Parameter(torch.zeros_like(self.seq[0].bias) + 20.0)
            self.seq[1].bias = nn.Parameter(torch.zeros_like(self.seq[1].bias) + 30.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(self.linear(x))


class ListsAndDicts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8, bias=False)])
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 4), "b": nn.Linear(8, 4)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.heads["a"](x) - self.heads["b"](x)


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.shared(torch.relu(self.shared(x))))


class FunctionalLinear(nn.Module):
    """Owns its parameters and uses them through F.linear: traced into, not opened."""

    def __init__(self, n_in: int = 8, n_out: int = 6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = FunctionalLinear()
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(x)))


class AddmmConv1D(nn.Module):
    """Like transformers' Conv1D: weight stored [in, out], applied with torch.addmm."""

    def __init__(self, n_in: int = 8, n_out: int = 8) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)


class AddmmNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc = AddmmConv1D(8, 12)
        self.c_proj = AddmmConv1D(12, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class MatmulNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight.t()) + self.weight.sum()


class TiedEmbeddingHead(nn.Module):
    def __init__(self, vocab: int = 20, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.hidden(self.embed(ids))))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1d = nn.Conv1d(4, 4, 3, stride=2, bias=False)
        self.fc = nn.Linear(4 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))  # [B, 4, 6, 6]
        y = y.mean(dim=3)  # [B, 4, 6]
        y = self.conv1d(y)  # [B, 4, 2]
        return self.fc(torch.cat([y, y[:, :, :1]], dim=2).flatten(1))


class SharedModule(nn.Module):
    """One Linear registered under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.second = self.first
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.second(torch.relu(self.first(x))))


class MyLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5


class SubclassAndHook(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.custom = MyLinear(8, 8)
        self.hooked = nn.Linear(8, 8)
        self.hooked.register_forward_hook(_double_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hooked(self.custom(x))


def _double_output(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
    return output * 2


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    masked: tuple[str, ...]  # mask keys: parameter or module names
    tied: bool = False
    integer_inputs: bool = False
    scriptable: bool = True  # False where a module is kept as a call (TorchScript cannot swap its parameters)


def _float(*shape: int) -> Callable[[], tuple[torch.Tensor, ...]]:
    return lambda: (torch.randn(*shape),)


ZOO: dict[str, Case] = {
    case.name: case
    for case in [
        Case("seed_model", ModelUnderTest, _float(3, 16), ("linear.weight", "seq.0.weight", "seq.1.weight")),
        Case("seed_model_no_bias", lambda: ModelUnderTest(bias=False), _float(3, 16), ("linear", "seq.0", "seq.1")),
        Case(
            "nested_sequential",
            lambda: nn.Sequential(
                nn.Linear(8, 8),
                nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 6))),
                nn.Linear(6, 4, bias=False),
            ),
            _float(5, 8),
            ("0.weight", "1.0.weight", "1.2.0", "2.weight"),
        ),
        Case(
            "lists_and_dicts", ListsAndDicts, _float(4, 8), ("blocks.0", "blocks.1.weight", "heads.a", "heads.b.weight")
        ),
        Case("linear_called_twice", CalledTwice, _float(4, 8), ("shared.weight", "out.weight")),
        Case("functional_linear", FunctionalNet, _float(4, 8), ("proj.weight", "head.weight")),
        Case("addmm_custom", AddmmNet, _float(4, 8), ("c_fc.weight", "c_proj.weight")),
        Case("matmul_custom", MatmulNet, _float(4, 8), ("weight",)),
        Case("masked_bias", lambda: nn.Sequential(nn.Linear(8, 8)), _float(4, 8), ("0.weight", "0.bias")),
        Case(
            "tied_embedding_head",
            TiedEmbeddingHead,
            lambda: (torch.randint(0, 20, (2, 5)),),
            ("lm_head.weight", "hidden.weight"),
            tied=True,
            integer_inputs=True,
        ),
        Case("conv_net", ConvNet, _float(2, 3, 6, 6), ("conv.weight", "conv1d", "fc.weight")),
        Case("shared_module", SharedModule, _float(4, 8), ("first.weight", "norm.weight")),
        Case("subclass_and_hook", SubclassAndHook, _float(4, 8), ("custom.weight", "hooked.weight"), scriptable=False),
    ]
}


def build(case: Case, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return case.build().to(dtype).eval()


def inputs(case: Case, dtype: torch.dtype = torch.float32, seed: int = 1) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)
    args = case.inputs()
    return args if case.integer_inputs else tuple(a.to(dtype) for a in args)


def parameter_name(model: nn.Module, key: str) -> str:
    names = dict(model.named_parameters(remove_duplicate=False))
    return key if key in names else (f"{key}.weight" if key else "weight")


def make_masks(model: nn.Module, case: Case, kind: str, seed: int = 2) -> dict[str, torch.Tensor]:
    """Masks for the case's keys: "random" (float 0/1), "bool", "zeros", "ones", "soft" or "single"."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for key in case.masked:
        weight = model.get_parameter(parameter_name(model, key))
        shape, dtype = weight.shape, weight.dtype
        if kind == "random":
            mask = (torch.rand(shape, generator=generator) > 0.5).to(dtype)
        elif kind == "bool":
            mask = torch.rand(shape, generator=generator) > 0.5
        elif kind == "zeros":
            mask = torch.zeros(shape, dtype=dtype)
        elif kind == "ones":
            mask = torch.ones(shape, dtype=dtype)
        elif kind == "soft":
            mask = torch.rand(shape, generator=generator, dtype=dtype)
        elif kind == "single":
            mask = torch.zeros(shape, dtype=dtype)
            mask.view(-1)[0] = 1
        else:
            raise ValueError(kind)
        masks[key] = mask
    return masks


MASK_KINDS = ("random", "bool", "zeros", "ones", "soft", "single")
