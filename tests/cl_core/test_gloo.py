"""The gloo harness itself: per-rank results, fresh process state on every call, and a
failing rank reported (with a stuck peer) without leaking into the next call."""

import pytest
import torch
import torch.distributed as dist

from tests import gloo


def _sum_of_ranks(rank: int, world: int, scale: float) -> dict:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return {"rank": rank, "sum": t.item() * scale, "draw": torch.rand(3), "threads": torch.get_num_threads()}


def _rank1_raises(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 gives up before the collective")
    dist.all_reduce(torch.zeros(1))  # rank 0 waits here for a peer that never comes


def _leave_state_behind(rank: int, world: int) -> None:
    torch.manual_seed(1234 + rank)
    torch.set_num_threads(2)


def test_results_by_rank_from_fresh_generators():
    first = gloo.run_workers(_sum_of_ranks, 2, 10.0)
    assert [r["rank"] for r in first] == [0, 1] and all(r["sum"] == 10.0 for r in first)
    gloo.run_workers(_leave_state_behind, 2)  # reseeds and changes the thread count
    again = gloo.run_workers(_sum_of_ranks, 2, 1.0)
    for a, b in zip(first, again, strict=True):  # as if each call had a newly spawned process
        torch.testing.assert_close(a["draw"], b["draw"])
        assert b["threads"] == 1


def test_a_failing_rank_is_reported_and_the_next_call_gets_a_new_group(monkeypatch):
    monkeypatch.setattr(gloo, "PEER_GRACE", 3.0)
    with pytest.raises(gloo.WorkerFailed) as e:
        gloo.run_workers(_rank1_raises, 2)
    text = str(e.value)
    assert "tests.cl_core.test_gloo._rank1_raises failed on 2 processes" in text
    assert "rank 1: ValueError: rank 1 gives up before the collective" in text
    assert "rank 0: no result within 3 s" in text  # the peer stuck in all_reduce is named too
    assert [r["sum"] for r in gloo.run_workers(_sum_of_ranks, 2, 1.0)] == [1.0, 1.0]
