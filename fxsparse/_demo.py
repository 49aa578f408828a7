"""The model and masks behind ``fxsparse demo``: small, deterministic, nothing downloaded."""

from __future__ import annotations

import torch
from torch import nn


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


def magnitude_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Per-layer unstructured masks keeping the largest-magnitude ``1 - sparsity`` of each Linear weight."""
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            weight = module.weight.detach().abs().flatten()
            pruned = round(sparsity * weight.numel())
            keep = torch.ones_like(weight, dtype=torch.bool)
            if pruned:
                keep[weight.argsort()[:pruned]] = False
            masks[name] = keep.view_as(module.weight)
    return masks
