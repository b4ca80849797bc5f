"""A two-(or more-)process gloo harness for the distributed tests.

``run_workers(fn, world_size, *args)`` calls ``fn(rank, world_size, *args)`` on each of
``world_size`` CPU processes that share an initialised gloo process group (one torch thread
each) and returns what every rank returned, indexed by rank. If any rank fails,
``WorkerFailed`` is raised with every failing rank's error and traceback (a rank that raises
often makes its peers fail in a collective too, so all of them are shown).

The processes are started once per world size and kept for the next call (spawning two
processes that import torch costs seconds, a call then costs milliseconds). Every call
starts from the state a freshly spawned process has: the torch, NumPy and ``random``
generators are put back to the states they had right after start-up, and torch runs one
thread. A pool whose call failed or timed out is killed and the next call spawns a new one,
so a rank stuck in a collective never leaks into another test.

``fn`` and its arguments are pickled, so ``fn`` must be a top-level function of an
importable module, and what it returns must survive ``torch.save``.
"""

from __future__ import annotations

import atexit
import io
import os
import queue
import random
import socket
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CALL_TIMEOUT = 600.0  # seconds one call may take on every rank
PARENT_POLL = 2.0  # seconds between a pool process's checks that the test process is still there
PEER_GRACE = 20.0  # after a rank fails: how long its peers get to report before the pool is killed


class WorkerFailed(RuntimeError):
    """A gloo worker raised, exited abnormally, or returned no result."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(rank: int, world_size: int, port: int, tasks: Any, results: Any) -> None:
    """A pool process: join the group, then run one call after another until told to stop."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    fresh = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())
    parent = os.getppid()
    try:
        while True:
            try:
                task = tasks.get(timeout=PARENT_POLL)
            except queue.Empty:
                if os.getppid() != parent:  # the test process died (SIGKILL): nothing will call again
                    return
                continue
            if task is None:
                return
            fn, args = task
            torch.random.set_rng_state(fresh[0])
            np.random.set_state(fresh[1])
            random.setstate(fresh[2])
            torch.set_num_threads(1)
            try:
                buf = io.BytesIO()
                torch.save(fn(rank, world_size, *args), buf)
                results.put((rank, True, buf.getvalue()))
            except Exception:  # noqa: BLE001 - reported to the parent, which fails the test
                results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class _Pool:
    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = free_port()
        self.procs = [
            ctx.Process(target=_serve, args=(r, world_size, port, self.tasks[r], self.results), daemon=True)
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[dict[int, Any], dict[int, str]]:
        """({rank: result}, {rank: error}) of one call; errors also for ranks that died or never answered."""
        for q in self.tasks:
            q.put((fn, args))
        done: dict[int, Any] = {}
        errors: dict[int, str] = {}
        timeout = CALL_TIMEOUT
        while len(done) + len(errors) < self.world_size:
            try:
                rank, ok, payload = self.results.get(timeout=timeout)
            except queue.Empty:
                for r in range(self.world_size):
                    if r not in done and r not in errors:
                        alive = self.procs[r].is_alive()
                        errors[r] = (
                            f"no result within {timeout:.0f} s"
                            if alive
                            else f"the process exited with code {self.procs[r].exitcode}"
                        )
                break
            if ok:
                done[rank] = torch.load(io.BytesIO(payload), weights_only=False)  # our own bytes
            else:
                errors[rank] = payload.rstrip()
                timeout = PEER_GRACE  # its peers may be waiting in a collective that never completes
        return done, errors

    def close(self, kill: bool = False) -> None:
        if not kill:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()


_pools: dict[int, _Pool] = {}


@atexit.register
def _close_pools() -> None:
    for pool in _pools.values():
        pool.close()
    _pools.clear()


def run_workers(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; the per-rank
    results, ``results[rank]``."""
    name = f"{fn.__module__}.{fn.__qualname__}"
    pool = _pools.get(world_size)
    if pool is None or not all(p.is_alive() for p in pool.procs):
        if pool is not None:
            pool.close(kill=True)
        pool = _pools[world_size] = _Pool(world_size)
    done, errors = pool.call(fn, args)
    if errors:
        pool.close(kill=True)  # a rank may still be stuck in a collective: never reuse this group
        del _pools[world_size]
        summary = "".join(f"\n  rank {r}: {tb.splitlines()[-1]}" for r, tb in sorted(errors.items()))
        details = "".join(f"\n\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise WorkerFailed(f"gloo worker {name} failed on {world_size} processes:{summary}{details}")
    return [done[r] for r in range(world_size)]
