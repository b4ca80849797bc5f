"""Global BatchNorm on gloo: two workers with half the batch each normalise, learn and
update their running statistics exactly as one BatchNorm over the whole batch (what
SyncBatchNorm / cross-replica BN computes), and every method whose authors trained with it
gives, on two workers, the loss of one process on the whole batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from cl_core.methods import get_method, known_methods
from cl_core.models.global_bn import GlobalBatchNorm, convert_global_bn, local_statistics
from pipelines.config import PretrainConfig
from pipelines.stages._pretraining import global_bn
from tests.gloo import run_workers

WORLD = 2
SIZES = (5, 3)  # uneven on purpose: the statistics weigh each worker by its count
C = 4


def _input(dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    shape = (sum(SIZES), C, 3, 2) if dim == 4 else (sum(SIZES), C)
    return torch.randn(shape, generator=g) * 3 + 5  # an offset: the variance must not come from E[x^2] - E[x]^2


def _weights(dim: int) -> torch.Tensor:
    """The loss's weight on each output element (a loss whose gradient differs per element)."""
    return torch.randn(_input(dim).shape, generator=torch.Generator().manual_seed(4))


def _bn(dim: int) -> nn.Module:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(C) if dim == 4 else nn.BatchNorm1d(C)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


def _loss(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (y * w).sum()


def _reference(dim: int, steps: int) -> dict:
    bn = _bn(dim)
    x = _input(dim).requires_grad_()
    w = _weights(dim)
    for _ in range(steps):
        y = bn(x)
        _loss(y, w).backward()
    return {
        "y": y.detach(),
        "x_grad": x.grad / steps,
        "w_grad": bn.weight.grad / steps,
        "b_grad": bn.bias.grad / steps,
        "running_mean": bn.running_mean,
        "running_var": bn.running_var,
    }


def _worker(rank: int, world: int, dim: int, steps: int) -> dict:
    bn = convert_global_bn(_bn(dim))
    assert isinstance(bn, GlobalBatchNorm)
    start = sum(SIZES[:rank])
    sl = slice(start, start + SIZES[rank])
    x = _input(dim)[sl].clone().requires_grad_()
    w_all = _weights(dim)
    for _ in range(steps):
        y = bn(x)
        _loss(y, w_all[sl]).backward()  # each rank's share of the global loss
    grads = torch.stack([bn.weight.grad, bn.bias.grad])
    dist.all_reduce(grads)  # the parameter gradient of the whole loss
    return {
        "y": y.detach(),
        "x_grad": x.grad / steps,
        "w_grad": grads[0] / steps,
        "b_grad": grads[1] / steps,
        "running_mean": bn.running_mean,
        "running_var": bn.running_var,
    }


@pytest.mark.parametrize("dim", [2, 4])
def test_two_workers_equal_one_batchnorm_over_the_whole_batch(dim):
    steps = 3
    ref = _reference(dim, steps)
    out = run_workers(_worker, WORLD, dim, steps)
    y = torch.cat([o["y"] for o in out])
    x_grad = torch.cat([o["x_grad"] for o in out])
    torch.testing.assert_close(y, ref["y"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_grad, ref["x_grad"], rtol=1e-4, atol=1e-5)
    for o in out:
        for k in ("w_grad", "b_grad", "running_mean", "running_var"):
            torch.testing.assert_close(o[k], ref[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def _local_only(rank: int, world: int) -> dict:
    """Per-worker statistics: inside local_statistics, and a forward only rank 0 makes
    (no collective, so it cannot hang)."""
    bn = convert_global_bn(_bn(4))
    x = _input(4)[: SIZES[0]] if rank == 0 else _input(4)[SIZES[0] :]
    with local_statistics(bn):
        y = bn(x)
        if rank == 0:
            bn(x)
    assert bn.synchronize
    return {"y": y.detach()}


def test_local_statistics_turns_the_collective_off():
    out = run_workers(_local_only, WORLD)
    x = _input(4)
    torch.testing.assert_close(out[0]["y"], _bn(4)(x[: SIZES[0]]).detach())
    torch.testing.assert_close(out[1]["y"], _bn(4)(x[SIZES[0] :]).detach())


def test_without_a_process_group_it_is_batchnorm_and_keeps_its_state_dict():
    plain = nn.Sequential(nn.Conv2d(3, C, 3), _bn(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    plain(torch.randn(2, 3, 5, 4))
    converted = convert_global_bn(nn.Sequential(*[m for m in plain]))
    assert isinstance(converted[1], GlobalBatchNorm) and converted[1].weight is plain[1].weight
    x = torch.randn(6, 3, 5, 4)
    reference = nn.Sequential(nn.Conv2d(3, C, 3), _bn(4), nn.ReLU(), nn.Flatten(), nn.Linear(C * 6, 2))
    reference.load_state_dict(converted.state_dict())  # same keys, loads into the plain model
    torch.testing.assert_close(converted(x), reference(x))
    torch.testing.assert_close(converted[1].running_mean, reference[1].running_mean)
    converted.eval(), reference.eval()
    torch.testing.assert_close(converted(x), reference(x))


# ----------------------------------------------------------------------------------
# every method whose authors normalise over the global batch


GLOBAL = [m for m in known_methods() if get_method(m).global_bn]
N = 8  # the whole batch; each of the two workers takes 4


def _split(value: Any, rank: int) -> Any:
    if isinstance(value, torch.Tensor):
        half = value.shape[0] // WORLD
        return value[rank * half : (rank + 1) * half]
    if isinstance(value, list):
        return [_split(v, rank) for v in value]
    return value


def _method(name: str, *, gather: bool):
    torch.manual_seed(0)
    cls = get_method(name)
    return cls(gather_distributed=gather, **cls.smoke_kwargs())


def _batch(name: str) -> dict:
    return get_method(name).example_batch(N, 16, generator=torch.Generator().manual_seed(7))


def _method_worker(rank: int, world: int, name: str, convert: bool) -> float:
    method = _method(name, gather=True)
    if convert:
        method = convert_global_bn(method)
    method.set_progress(0, 10)
    torch.manual_seed(1)
    loss = method(**{k: _split(v, rank) for k, v in _batch(name).items()}).loss.detach().clone()
    dist.all_reduce(loss)
    return loss.item() / world


def test_the_config_follows_each_methods_authors():
    on = {m for m in known_methods() if global_bn(PretrainConfig.model_construct(method=m), 2)}
    assert on == {"simclr", "supcon", "byol", "simsiam", "swav", "dino", "barlow_twins", "vicreg", "mocov3"}
    assert not global_bn(PretrainConfig(method="simclr"), 1)
    assert global_bn(PretrainConfig(method="moco", sync_bn=True), 2)
    assert not global_bn(PretrainConfig(method="simclr", sync_bn=False), 2)


@pytest.mark.parametrize("name", GLOBAL)
def test_two_workers_with_global_bn_give_the_whole_batch_loss(name):
    ref = _method(name, gather=False)
    ref.set_progress(0, 10)
    torch.manual_seed(1)
    expected = ref(**_batch(name)).loss.item()
    assert run_workers(_method_worker, WORLD, name, True)[0] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # per-worker statistics give another loss: the comparison above can fail
    assert run_workers(_method_worker, WORLD, name, False)[0] != pytest.approx(expected, rel=1e-4, abs=1e-5)


def _ddp_worker(rank: int, world: int) -> list[torch.Tensor]:
    method = convert_global_bn(_method("simclr", gather=True))
    model = nn.parallel.DistributedDataParallel(method, broadcast_buffers=False)
    model(**{k: _split(v, rank) for k, v in _batch("simclr").items()}).loss.backward()
    return [p.grad for p in method.parameters()]


def test_ddp_gradients_with_global_bn_are_the_whole_batch_gradients():
    ref = _method("simclr", gather=False)
    ref(**_batch("simclr")).loss.backward()
    for rank_grads in run_workers(_ddp_worker, WORLD):
        for g, p in zip(rank_grads, ref.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-5)


def _compiled_worker(rank: int, world: int, shared_memory: bool) -> list[dict]:
    """Convs + global BN, eager then ``nn.Module.compile``'d (as ``compile: true`` does),
    two forward/backward steps each on this rank's share of the batch."""
    from torch._dynamo.utils import counters

    from cl_core import distributed

    if shared_memory:
        assert distributed.use_shared_memory()
    try:
        out = []
        for compiled in (False, True):
            torch.manual_seed(0)
            # layers of different widths: the collectives see several sizes (dynamic shapes on recompiling)
            layers: list[nn.Module] = []
            for c_in, c_out in ((C, 8), (8, 16), (16, 32)):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
            net = convert_global_bn(nn.Sequential(*layers))
            if compiled:
                torch._dynamo.reset()
                counters.clear()
                net.compile()
            start = sum(SIZES[:rank])
            x = _input(4)[start : start + SIZES[rank]].clone().requires_grad_()
            g = torch.Generator().manual_seed(4)
            w = torch.randn(sum(SIZES), 32, 3, 2, generator=g)[start : start + SIZES[rank]]
            for _ in range(2):
                y = net(x)
                _loss(y, w).backward()
            out.append({"y": y.detach(), "x_grad": x.grad.clone(), "running_mean": net[-2].running_mean.clone()})
        breaks = sum(counters["graph_break"].values())
        return [*out, {"graph_breaks": breaks, "graphs": counters["stats"]["unique_graphs"]}]
    finally:
        distributed.release_shared_memory()


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shared_memory", "gloo"])
def test_compiled_networks_with_global_bn_match_eager(shared_memory):
    """``compile: true`` with global BN on two workers: the outputs, gradients and running
    statistics are eager's (a shared-memory all_gather traced as Python once read past its
    buffer), and through shared memory the network is one graph: the collective is one
    custom operator, no graph break per BatchNorm layer (which ran into dynamo's recompile
    limit in a real network)."""
    for eager, compiled, graphs in run_workers(_compiled_worker, WORLD, shared_memory):
        for k in eager:
            torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
        if shared_memory:
            assert graphs == {"graph_breaks": 0, "graphs": 1}
