"""Rank helpers and an autograd-aware all_gather.

Every helper falls back to single-process behaviour (rank 0, world size 1) when no
``torch.distributed`` process group is initialised, so losses run anywhere.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from cl_core.shm_group import SLOT_BYTES, ShmGroup

_shm: ShmGroup | None = None  # small collectives through /dev/shm (use_shared_memory)


def use_shared_memory(slot_bytes: int = SLOT_BYTES) -> bool:
    """Route the small collectives below (at most ``slot_bytes`` of CPU tensor, 4 MiB by
    default: BatchNorm statistics, gathered embeddings, their gradients, and with
    :func:`share_gradient_reduction` DDP's gradient buckets) through shared memory when
    every rank of the process group is on this host (:class:`cl_core.shm_group.ShmGroup`); larger ones, and
    every collective elsewhere, stay on the process group. A collective: call it on every
    rank. Returns whether it is on."""
    global _shm
    release_shared_memory()
    _shm = ShmGroup.create(slot_bytes)
    return _shm is not None


def release_shared_memory() -> None:
    global _shm
    if _shm is not None:
        _shm.close()
        _shm = None


def _shm_for(x: torch.Tensor) -> ShmGroup | None:
    return _shm if _shm is not None and _shm.fits(x) else None


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the summed gradient of its own slice.

    Rank r's loss L_r depends on every rank's embeddings through the gathered keys.
    Summing the incoming gradients over ranks (all_reduce) and keeping the local slice
    gives rank s the gradient sum_r dL_r/dz_s, so DDP's averaging of parameter
    gradients yields the gradient of the mean loss over the global batch.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        shm = _shm_for(x)
        if shm is not None:
            return tuple(shm.all_gather(x).unbind(0))
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g = torch.stack(grads)  # (W, N, D)
        shm = _shm_for(g)
        if shm is not None:
            return shm.all_reduce_sum(g)[dist.get_rank()]
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g[dist.get_rank()]


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (N, ...) from all ranks along dim 0, keeping gradients.

    Assumes every rank holds the same N (true for contrastive batches with drop-last
    batching). Returns ``x`` unchanged without a process group.
    """
    if world_size() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks, without gradient (for logging)."""
    if world_size() == 1:
        return x.detach()
    shm = _shm_for(x)
    if shm is not None:
        return shm.all_reduce_sum(x) / world_size()
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / world_size()


@torch.no_grad()
def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (N, ...) from all ranks along dim 0, without gradient (keys for
    queues and memory banks). Returns ``x.detach()`` without a process group."""
    if world_size() == 1:
        return x.detach()
    shm = _shm_for(x)
    if shm is not None:
        return shm.all_gather(x).flatten(0, 1)
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.detach().contiguous())
    return torch.cat(out, dim=0)


def all_reduce_sum_(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks, without gradient (e.g. Sinkhorn marginals, DINO's
    center). Returns ``x``; a no-op without a process group."""
    if world_size() > 1:
        shm = _shm_for(x)
        if shm is not None:
            x.copy_(shm.all_reduce_sum(x))
        else:
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


# a type comment, not annotations: DDP compares the hook's annotations with the real types, and
# under `from __future__ import annotations` they would be strings
def _ddp_average_hook(process_group, bucket):
    # type: (dist.ProcessGroup | None, dist.GradBucket) -> torch.futures.Future[torch.Tensor]
    """DDP's gradient all-reduce (the bucket divided by the world size, then summed over
    ranks, as its built-in hook does) through shared memory when it is on and the bucket
    fits (:func:`use_shared_memory`); otherwise the built-in hook on the process group.
    ``bucket``: a ``dist.GradBucket``; returns a ``torch.futures.Future`` of its tensor."""
    grads = bucket.buffer()
    shm = _shm_for(grads)
    if shm is None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        # allreduce_hook's annotation omits None, which it takes as the default group
        return default_hooks.allreduce_hook(process_group, bucket)  # type: ignore[arg-type]
    grads.div_(world_size())
    grads.copy_(shm.all_reduce_sum(grads))
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(grads)
    return done


def share_gradient_reduction(model: torch.nn.Module) -> bool:
    """Let a CPU model's DDP gradient all-reduce go through shared memory whenever
    :func:`use_shared_memory` is on and a bucket fits, like the small collectives (call
    it before the first backward; it may come before :func:`use_shared_memory`). A no-op,
    returning False, for a model that is not DDP or not on the CPU."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel) or model.device_type != "cpu":
        return False
    model.register_comm_hook(None, _ddp_average_hook)
    return True


def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from ``src`` (e.g. a shuffle permutation); a no-op alone."""
    if world_size() > 1:
        dist.broadcast(x, src)
    return x


def all_gather_object(obj: object) -> list:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` without a process group."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (a decision taken on one clock)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())
