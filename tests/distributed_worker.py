"""What each rank runs in test_distributed.py (spawned processes import it by name)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

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


def unmasked_gradients_seen(out: nn.Module, seen: list[str]) -> Any:
    """A DDP communication hook that notes every masked weight whose gradient reaches the all-reduce
    with a nonzero entry where its mask is zero, then all-reduces as DDP does by default."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    names = {id(parameter): name for name, parameter in out.named_parameters()}
    masks = {id(out.get_parameter(name)): mask for name, mask in fxsparse.masks.of(out).items()}

    def hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        for parameter, gradient in zip(bucket.parameters(), bucket.gradients(), strict=True):
            mask = masks.get(id(parameter))
            if mask is not None and bool(gradient[mask == 0].any()):
                seen.append(names[id(parameter)])
        return allreduce_hook(None, bucket)  # type: ignore[arg-type]

    # DDP checks the annotations themselves, which `from __future__ import annotations` made strings.
    hook.__annotations__.update(bucket=dist.GradBucket, **{"return": torch.futures.Future[torch.Tensor]})
    return hook


def run(rank: int, world: int, port: int, mode: str, folder: str) -> None:
    """Masked fine-tuning under DDP or FSDP2 (gloo, loopback), the masked graph or folded
    (``ddp-fold``, ``fsdp-fold``); writes what the test compares."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = make_model()
        out = fxsparse.transform(model, fxsparse.masks.magnitude(model, 0.5), fold=mode.endswith("-fold"))
        unmasked: list[str] = []
        if mode.startswith("ddp"):
            ddp = nn.parallel.DistributedDataParallel(out)
            ddp.register_comm_hook(None, unmasked_gradients_seen(out, unmasked))
            wrapped: nn.Module = ddp
        else:
            from torch.distributed.fsdp import fully_shard

            fully_shard(out)
            wrapped = out
            # what torch.ao.pruning cannot do after fully_shard: compute new masks from the sharded
            # weights and change them (a folded model's newly pruned entries: set to zero, shard by
            # shard; no optimizer has state yet, as the warning it gives says)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                fxsparse.update_masks(out, fxsparse.masks.magnitude(out, 0.75))
        losses = train(wrapped, rank, world)
        masks = {name: mask.clone() for name, mask in fxsparse.viz.masks_of(out).items()}
        state = {}
        for name, parameter in out.named_parameters():
            full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
            state[name] = full.detach().clone()
        results = {"losses": losses, "masks": masks, "parameters": state, "unmasked": unmasked}
        torch.save(results, Path(folder) / f"{mode}-{rank}.pt")
    finally:
        dist.destroy_process_group()
