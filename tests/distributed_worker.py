"""What each rank runs in test_distributed.py (spawned processes import it by name)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import fxsparse

STEPS = 4


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(8, 16, generator=generator) for _ in range(STEPS)]


def train(module: nn.Module, rank: int, world: int) -> list[torch.Tensor]:
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for x in batches():
        optimizer.zero_grad()
        loss = module(x.chunk(world)[rank]).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def run(rank: int, world: int, port: int, mode: str, folder: str) -> None:
    """Masked fine-tuning under DDP or FSDP2 (gloo, loopback); writes what the test compares."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = make_model()
        out = fxsparse.transform(model, fxsparse.masks.magnitude(model, 0.5))
        if mode == "ddp":
            wrapped: nn.Module = nn.parallel.DistributedDataParallel(out)
        else:
            from torch.distributed.fsdp import fully_shard

            fully_shard(out)
            wrapped = out
            # what torch.ao.pruning cannot do after fully_shard: compute new masks from the sharded
            # weights and change them
            fxsparse.update_masks(out, fxsparse.masks.magnitude(out, 0.75))
        losses = train(wrapped, rank, world)
        masks = {name: mask.clone() for name, mask in fxsparse.viz.masks_of(out).items()}
        state = {}
        for name, parameter in out.named_parameters():
            full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
            state[name] = full.detach().clone()
        torch.save({"losses": losses, "masks": masks, "parameters": state}, Path(folder) / f"{mode}-{rank}.pt")
    finally:
        dist.destroy_process_group()
