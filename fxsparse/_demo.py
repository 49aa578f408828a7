"""The models and masks behind ``fxsparse demo``: small, deterministic, nothing downloaded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .masks._makers import is_linear_like


class TinyLM(nn.Module):
    """A two-block MLP language model whose output head is tied to its embedding."""

    def __init__(self, vocab: int = 64, width: int = 32, hidden: int = 64, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)) for _ in range(blocks)
        )
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x)
        logits: torch.Tensor = self.lm_head(self.norm(x))
        return logits


@dataclass(frozen=True)
class Demo:
    """A model to prune, its keyword inputs at two shapes, and how to read its output."""

    description: str
    model: nn.Module
    inputs: dict[str, torch.Tensor]
    other_inputs: dict[str, torch.Tensor]  # another batch and sequence length, through the dynamic dimensions
    dynamic_shapes: dict[str, Any]
    logits: Callable[[Any], torch.Tensor]


def _token_ids(vocab: int, batch: int, sequence: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, sequence))


def _sequence_dims(*names: str) -> dict[str, Any]:
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=64)
    return {name: {0: batch, 1: sequence} for name in names}


def tiny_lm(seed: int) -> Demo:
    torch.manual_seed(seed)
    return Demo(
        "TinyLM (fxsparse's own), lm_head tied to embed",
        TinyLM().eval(),
        {"ids": _token_ids(64, 4, 16)},
        {"ids": _token_ids(64, 3, 9)},
        _sequence_dims("ids"),
        lambda output: output,
    )


def tiny_gpt2(seed: int) -> Demo:
    """GPT-2 from a tiny config with random weights: Conv1D projections, lm_head tied to wte."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, use_cache=False
    )
    model: nn.Module = GPT2LMHeadModel(config)
    return Demo(
        "GPT-2 (transformers, tiny config, random weights), lm_head tied to transformer.wte",
        model.eval(),
        {"input_ids": _token_ids(256, 4, 16)},
        {"input_ids": _token_ids(256, 3, 9)},
        _sequence_dims("input_ids"),
        lambda output: output.logits,
    )


DEMOS: dict[str, tuple[Callable[[int], Demo], str | None]] = {
    "tiny-lm": (tiny_lm, None),
    "gpt2-tiny": (tiny_gpt2, "transformers"),  # the package it needs
}


def linear_like(model: nn.Module) -> list[str]:
    """Names of the modules whose weight is a projection: nn.Linear, and transformers' Conv1D (GPT-2)."""
    return [name for name, module in model.named_modules() if is_linear_like(module)]
