"""Small collectives through /dev/shm (cl_core.shm_group): the process group's results,
the same bits on every rank, no file left behind, gloo kept where a rank cannot map the
file, and a one-line error naming a rank that never arrives."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.distributed as dist

from cl_core import distributed, shm_group
from cl_core.models.global_bn import convert_global_bn
from cl_core.shm_group import ShmGroup
from tests.gloo import run_workers

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason="the shared-memory path is x86-64 only (elsewhere gloo is kept)",
)


def _collectives(rank: int, world: int) -> dict:
    torch.manual_seed(rank)
    xs = [torch.randn(5, 7), torch.randn(1, 129), torch.randint(0, 9, (3,)), torch.randn(4, 3).double()]
    ref = {
        "gather": [distributed.gather_nograd(x) for x in xs],
        "sum": [distributed.all_reduce_sum_(x.clone()) for x in xs],
        "mean": [distributed.all_reduce_mean(x) for x in xs],
    }
    before = set(shm_group.SHM_DIR.glob("clpipe-collectives-*"))
    on = distributed.use_shared_memory()
    left = set(shm_group.SHM_DIR.glob("clpipe-collectives-*")) - before
    try:
        out = {
            "gather": [distributed.gather_nograd(x) for x in xs],
            "sum": [distributed.all_reduce_sum_(x.clone()) for x in xs],
            "mean": [distributed.all_reduce_mean(x) for x in xs],
        }
        big = torch.zeros(shm_group.SLOT_BYTES // 4 + 1)  # over the slot: the process group takes it
        big_sum = distributed.all_reduce_sum_(big + rank)
    finally:
        distributed.release_shared_memory()
    return {"on": on, "left": sorted(map(str, left)), "ref": ref, "out": out, "big": float(big_sum[0])}


@pytest.mark.parametrize("world", [2, 3])
def test_shared_memory_collectives_give_the_process_groups_results(world):
    res = run_workers(_collectives, world)
    for r in res:
        assert r["on"] and r["left"] == []
        assert r["big"] == sum(range(world))
        for kind in ("gather", "sum", "mean"):
            for got, want in zip(r["out"][kind], r["ref"][kind], strict=True):
                assert got.dtype == want.dtype and got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for kind in ("sum", "mean"):  # summed in rank order: the same bits on every rank
        for i in range(len(res[0]["out"][kind])):
            assert all(torch.equal(r["out"][kind][i], res[0]["out"][kind][i]) for r in res)


def _one_rank_cannot_map(rank: int, world: int) -> bool:
    init = shm_group.ShmGroup.__init__
    if rank == 1:
        shm_group.ShmGroup.__init__ = _refuse  # type: ignore[method-assign]
    try:
        return distributed.use_shared_memory()
    finally:
        shm_group.ShmGroup.__init__ = init  # type: ignore[method-assign]
        distributed.release_shared_memory()


def _refuse(self, *args, **kwargs):
    raise OSError("no such file (a private /dev/shm)")


def test_a_rank_that_cannot_map_the_file_keeps_every_rank_on_the_process_group():
    assert run_workers(_one_rank_cannot_map, 2) == [False, False]


def _late_rank(rank: int, world: int) -> str:
    group = ShmGroup.create(timeout_s=0.5)
    assert group is not None
    try:
        if rank == 0:
            group.all_gather(torch.zeros(3))
        return "arrived"
    except TimeoutError as e:
        return str(e)
    finally:
        group.close()
        dist.barrier()


def test_a_rank_that_never_arrives_is_named():
    out = run_workers(_late_rank, 2)
    assert out[1] == "arrived"
    assert out[0] == "shared-memory collective 2: rank(s) [1] did not arrive within 0.5 s"


def _ddp_grads(
    rank: int, world: int, shm: bool, hook: bool = False, slot_bytes: int = 4 << 20
) -> tuple[list[torch.Tensor], int]:
    """Gradients of DDP + global BN + SimCLR after one backward, and the number of
    collectives that went through shared memory."""
    from tests.cl_core.test_global_bn import _batch, _method, _split

    if shm:
        assert distributed.use_shared_memory(slot_bytes)
    try:
        method = convert_global_bn(_method("simclr", gather=True))
        model = torch.nn.parallel.DistributedDataParallel(method, broadcast_buffers=False)
        if hook:
            assert distributed.share_gradient_reduction(model)
        model(**{k: _split(v, rank) for k, v in _batch("simclr").items()}).loss.backward()
        return [p.grad for p in method.parameters()], (distributed._shm.count if shm else 0)
    finally:
        distributed.release_shared_memory()


def test_global_bn_and_the_contrastive_gather_give_the_same_gradients_through_shared_memory():
    """The small collectives through shared memory, then DDP's gradient buckets too (the
    comm hook), then buckets larger than the slot (the hook hands them to gloo): the same
    gradients as gloo alone."""
    ref = run_workers(_ddp_grads, 2, False)
    counts = {}
    for case, args in {
        "collectives": (True,),
        "and gradients": (True, True),
        "gradients over the slot": (True, True, 4096),
    }.items():
        out = run_workers(_ddp_grads, 2, *args)
        counts[case] = out[0][1]
        for (rank_grads, _), (ref_grads, _) in zip(out, ref, strict=True):
            for g, want in zip(rank_grads, ref_grads, strict=True):
                torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7)
    # the hook moved DDP's bucket(s) to shared memory; with a 4 KiB slot they stayed on gloo
    assert counts["and gradients"] > counts["collectives"], counts
    assert counts["gradients over the slot"] < counts["and gradients"], counts


def test_gradient_reduction_is_left_alone_without_ddp():
    assert not distributed.share_gradient_reduction(torch.nn.Linear(2, 2))
