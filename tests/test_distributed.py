"""Two gloo processes with batch B each give the loss and gradients of one process with 2B."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cl_core.losses import NTXentLoss

B, D_IN, D_OUT, WORLD = 6, 10, 4, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 8), nn.ReLU(), nn.Linear(8, D_OUT))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * B, D_IN, generator=g), torch.randn(WORLD * B, D_IN, generator=g)


def _worker(rank: int, port: int, out: dict, temperature: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = nn.parallel.DistributedDataParallel(_model())
        x0, x1 = _data()
        sl = slice(rank * B, (rank + 1) * B)
        loss = NTXentLoss(temperature)(model(x0[sl]), model(x1[sl]))
        loss.backward()  # DDP averages the parameter gradients over ranks
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        out[rank] = {
            "loss": (mean_loss / WORLD).item(),
            "grads": [p.grad.clone() for p in model.parameters()],
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_two_gloo_processes_equal_one_process_with_global_batch(temperature):
    model = _model()
    x0, x1 = _data()
    loss = NTXentLoss(temperature)(model(x0), model(x1))
    loss.backward()
    ref_grads = [p.grad for p in model.parameters()]

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), out, temperature), nprocs=WORLD, join=True)
        results = dict(out)
    for rank in range(WORLD):
        assert results[rank]["loss"] == pytest.approx(loss.item(), rel=1e-5)
        for g, ref in zip(results[rank]["grads"], ref_grads, strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


def _gather_only(rank: int, port: int, out: dict) -> None:
    """Without gathering, each rank sees only its own negatives: the loss differs."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x0, x1 = _data()
        sl = slice(rank * B, (rank + 1) * B)
        m = _model()
        out[rank] = (NTXentLoss(0.5, gather_distributed=False)(m(x0[sl]), m(x1[sl])).item(),
                     NTXentLoss(0.5)(m(x0[sl]), m(x1[sl])).item())
    finally:
        dist.destroy_process_group()


def test_gather_adds_the_other_workers_negatives():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_gather_only, args=(_free_port(), out), nprocs=WORLD, join=True)
        local, gathered = out[0]
    assert gathered > local  # more negatives, larger loss at init
