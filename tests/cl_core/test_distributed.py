"""Two gloo processes with batch B each give the loss and gradients of one process with 2B."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from cl_core.losses import NTXentLoss
from tests.gloo import run_workers

B, D_IN, D_OUT, WORLD = 6, 10, 4, 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 8), nn.ReLU(), nn.Linear(8, D_OUT))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * B, D_IN, generator=g), torch.randn(WORLD * B, D_IN, generator=g)


def _worker(rank: int, world: int, temperature: float) -> dict:
    model = nn.parallel.DistributedDataParallel(_model())
    x0, x1 = _data()
    sl = slice(rank * B, (rank + 1) * B)
    loss = NTXentLoss(temperature)(model(x0[sl]), model(x1[sl]))
    loss.backward()  # DDP averages the parameter gradients over ranks
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    return {
        "loss": (mean_loss / world).item(),
        "grads": [p.grad.clone() for p in model.parameters()],
    }


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_two_gloo_processes_equal_one_process_with_global_batch(temperature):
    model = _model()
    x0, x1 = _data()
    loss = NTXentLoss(temperature)(model(x0), model(x1))
    loss.backward()
    ref_grads = [p.grad for p in model.parameters()]

    results = run_workers(_worker, WORLD, temperature)
    for rank in range(WORLD):
        assert results[rank]["loss"] == pytest.approx(loss.item(), rel=1e-5)
        for g, ref in zip(results[rank]["grads"], ref_grads, strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


def _gather_only(rank: int, world: int) -> tuple[float, float]:
    """Without gathering, each rank sees only its own negatives: the loss differs."""
    x0, x1 = _data()
    sl = slice(rank * B, (rank + 1) * B)
    m = _model()
    return (
        NTXentLoss(0.5, gather_distributed=False)(m(x0[sl]), m(x1[sl])).item(),
        NTXentLoss(0.5)(m(x0[sl]), m(x1[sl])).item(),
    )


def test_gather_adds_the_other_workers_negatives():
    local, gathered = run_workers(_gather_only, WORLD)[0]
    assert gathered > local  # more negatives, larger loss at init
