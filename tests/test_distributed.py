"""Masked fine-tuning under torch.distributed: DDP and FSDP2 (fully_shard), 2 gloo processes on loopback."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import fxsparse

import distributed_worker as worker

WORLD = 2
TIMEOUT = 120  # seconds for the whole run; a hang fails the test instead of the suite


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(mode: str, folder: Path, attempts: int = 2) -> list[dict[str, object]]:
    """Run the ranks; once more on a new port if they fail (the free port can be taken meanwhile)."""
    for attempt in range(attempts):
        context = mp.spawn(worker.run, args=(WORLD, free_port(), mode, str(folder)), nprocs=WORLD, join=False)
        deadline = time.monotonic() + TIMEOUT
        try:
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    for process in context.processes:
                        process.kill()
                    pytest.fail(f"{mode} did not finish in {TIMEOUT} s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            if attempt == attempts - 1:
                raise
            continue
        break
    return [torch.load(folder / f"{mode}-{rank}.pt") for rank in range(WORLD)]


def single_process(
    sparsity_after: float | None,
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The same fine-tuning in one process on the whole batches (the mean of the ranks' losses), by
    FakeSparsity: its losses, its parameters (by the model's names) and its masked weights (mask * weight)."""
    model = worker.make_model()
    masks = fxsparse.masks.magnitude(model, 0.5 if sparsity_after is None else sparsity_after)
    out = fxsparse.transform(model, masks, emit="parametrize")
    losses = worker.train(out, 0, 1)
    raw = {
        name.replace("parametrizations.", "").replace(".original", ""): p.detach() for name, p in out.named_parameters()
    }
    effective = {name: out.get_submodule(name.rpartition(".")[0]).weight.detach() for name in masks}
    return losses, raw, effective


@pytest.mark.parametrize(
    ("mode", "sparsity_after"), [("ddp", None), ("fsdp", 0.75), ("ddp-fold", None), ("fsdp-fold", 0.75)]
)
def test_masked_fine_tuning_across_ranks(mode: str, sparsity_after: float | None, tmp_path: Path) -> None:
    ranks = spawn(mode, tmp_path)
    first = ranks[0]
    for other in ranks[1:]:  # masks and parameters identical on every rank
        for key in ("masks", "parameters"):
            assert all(torch.equal(first[key][k], other[key][k]) for k in first[key])  # type: ignore[index]
    masks: dict[str, torch.Tensor] = first["masks"]  # type: ignore[assignment]
    parameters: dict[str, torch.Tensor] = first["parameters"]  # type: ignore[assignment]
    initial = dict(worker.make_model().named_parameters())
    for name, mask in masks.items():  # pruned weights get no gradient: SGD leaves them as they were (folded: zero)
        pruned = parameters[name][~mask.bool()]
        assert torch.equal(
            pruned, torch.zeros_like(pruned) if mode.endswith("-fold") else initial[name].detach()[~mask.bool()]
        )
    assert all(r["unmasked"] == [] for r in ranks)  # DDP: every gradient masked before the all-reduce
    if sparsity_after is not None:  # the masks changed after sharding
        assert [round(float((~m).float().mean()), 2) for m in masks.values()] == [sparsity_after] * 3
    expected_losses, raw, effective = single_process(sparsity_after)
    mean_losses = torch.stack([torch.stack(r["losses"]) for r in ranks]).mean(dim=0)  # type: ignore[arg-type]
    torch.testing.assert_close(mean_losses, torch.stack(expected_losses), rtol=1e-5, atol=1e-6)
    for name, parameter in parameters.items():
        folded = mode.endswith("-fold") and name in masks  # a folded weight holds mask * weight
        torch.testing.assert_close(parameter, effective[name] if folded else raw[name], rtol=1e-5, atol=1e-6)
