"""A two-(or more-)process gloo harness for the distributed tests.

``run_workers(fn, world_size, *args)`` spawns ``world_size`` CPU processes, each inside an
initialised gloo process group (MASTER_ADDR/MASTER_PORT on a free local port) with one
torch thread, calls ``fn(rank, world_size, *args)`` there and returns what every rank
returned, indexed by rank. The group is destroyed when ``fn`` finishes or fails; if any rank
fails, ``WorkerFailed`` is raised with every failing rank's error and traceback (a rank that
raises often makes its peers fail in a collective too, so all of them are shown).

``fn`` and its arguments are pickled by spawn, so ``fn`` must be a top-level function of an
importable module, and what it returns must survive ``torch.save``.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class WorkerFailed(RuntimeError):
    """A gloo worker raised, exited abnormally, or returned no result."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str,
           args: tuple[Any, ...]) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        torch.set_num_threads(1)
        result = fn(rank, world_size, *args)
        path = os.path.join(out_dir, f"rank{rank}.pt")
        torch.save(result, path + ".tmp")
        os.replace(path + ".tmp", path)  # a whole result or none
    except Exception:
        # written before the group goes: destroying it fails the peers, and spawn then
        # terminates the ranks still running
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _failures(out_dir: str, world_size: int) -> str:
    """Every failed rank's last traceback line, then the full tracebacks."""
    errors = {}
    for rank in range(world_size):
        path = os.path.join(out_dir, f"rank{rank}.err")
        if os.path.exists(path):
            with open(path) as f:
                errors[rank] = f.read().rstrip()
    summary = "".join(f"\n  rank {r}: {tb.splitlines()[-1]}" for r, tb in errors.items())
    details = "".join(f"\n\n--- rank {r} ---\n{tb}" for r, tb in errors.items())
    return summary + details


def run_workers(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; the per-rank
    results, ``results[rank]``."""
    name = f"{fn.__module__}.{fn.__qualname__}"
    with tempfile.TemporaryDirectory(prefix="gloo-") as out_dir:
        try:
            mp.spawn(_entry, args=(fn, world_size, free_port(), out_dir, args), nprocs=world_size, join=True)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            # gloo can abort a process while it tears down its threads at exit ("terminate
            # called without an active exception"), after every rank saved its result:
            # those results stand; any other failure is the test's
            done = all(os.path.exists(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world_size))
            if not (isinstance(e, mp.ProcessExitedException) and done and not _failures(out_dir, world_size)):
                # spawn names only the first rank it saw fail, often a peer of the one that raised
                details = _failures(out_dir, world_size) or f"\n  {e}"
                raise WorkerFailed(f"gloo worker {name} failed on {world_size} processes:{details}") from e
        results = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pt")
            if not os.path.exists(path):
                raise WorkerFailed(f"gloo worker {name} (rank {rank} of {world_size}) returned no result")
            results.append(torch.load(path, weights_only=False))  # our own file, any picklable result
    return results
