"""Small collectives of ranks on one host through shared memory.

A step with global BatchNorm makes two collectives per BatchNorm layer (the statistics
forward, the gradient sums backward) plus the contrastive loss's gather: about 16 small
all_gathers / all_reduces per step for a four-block CNN with SimCLR's head. gloo sends
each over TCP, and each costs the waiting process a wake-up, which on a virtual
machine's busy cores takes milliseconds, a large part of a small model's step. Ranks on
the same host can exchange such tensors through a shared file in ``/dev/shm`` instead:
each rank writes its tensor to its own slot, publishes a sequence number, and polls
until every rank has published the same number.

Layout: one int64 sequence number per rank (each on its own 64-byte line), then two
buffers of ``world x slot_bytes``. Collective ``k`` uses buffer ``k % 2``: a rank can be
at most one collective ahead of the slowest (it waits for everyone's ``k`` before leaving
collective ``k``), so it never overwrites a buffer another rank still reads. The order of
the writes (data, then the sequence number) and of the reads (sequence numbers, then data)
is what x86's total store order guarantees; elsewhere :meth:`ShmGroup.create` declines and
the caller keeps gloo.

An all_reduce is the all_gather summed in rank order, so every rank gets the same bits.
"""

from __future__ import annotations

import itertools
import mmap
import os
import platform
import secrets
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

SHM_DIR = Path("/dev/shm")
SLOT_BYTES = 4 << 20  # the largest tensor sent this way (a small CNN's gradients); larger: the process group
_LINE = 64  # one cache line per sequence number
_SPINS = 100  # busy polls (about 1 us each) before sleeping
_MIN_SLEEP_S, _MAX_SLEEP_S = 2e-5, 1e-3

# the open groups by key, for the custom op below (an op's arguments are tensors and numbers)
_GROUPS: dict[int, ShmGroup] = {}
_KEYS = itertools.count()


@torch.library.custom_op("clpipe::shm_all_gather", mutates_args=())
def _shm_all_gather(x: torch.Tensor, group: int, world: int) -> torch.Tensor:
    """The all_gather as an opaque operator: ``torch.compile`` keeps it inside the graph as
    one call (no graph break, so a compiled network with global BN stays one graph), and
    its fake implementation gives the output's shape without running it. ``world`` is the
    group's, passed in so that the fake implementation is a function of its arguments
    alone. The op is registered as functional: a compiled graph may drop a call whose
    result is unused, and then the other ranks would wait for this one, so every caller
    must use the result."""
    return _GROUPS[group]._all_gather(x)


@_shm_all_gather.register_fake
def _(x: torch.Tensor, group: int, world: int) -> torch.Tensor:
    return x.new_empty((world, *x.shape))


class ShmGroup:
    """all_gather / all_reduce of small CPU tensors among the ranks of a process group
    that share ``/dev/shm`` (see the module's docstring). Make it with :meth:`create`."""

    def __init__(self, path: Path, rank: int, world: int, slot_bytes: int, timeout_s: float):
        self.rank, self.world, self.slot_bytes, self.timeout_s = rank, world, slot_bytes, timeout_s
        size = _LINE * world + 2 * world * slot_bytes
        with open(path, "r+b") as f:
            self._mm = mmap.mmap(f.fileno(), size)
        self._seq = np.ndarray((world, _LINE // 8), dtype=np.int64, buffer=self._mm)[:, 0]
        self._data = np.ndarray((2, world, slot_bytes), dtype=np.uint8, buffer=self._mm, offset=_LINE * world)
        self.count = 0  # collectives made
        self.key = next(_KEYS)
        _GROUPS[self.key] = self

    @classmethod
    def create(cls, slot_bytes: int = SLOT_BYTES, timeout_s: float = 1800.0) -> ShmGroup | None:
        """A group of every rank of the default process group (a collective: call it on
        all ranks), or None on every rank when some rank cannot map the same file (another
        host, a private ``/dev/shm``), on a CPU other than x86-64, or without a group."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        rank, world = dist.get_rank(), dist.get_world_size()
        usable = platform.machine().lower() in ("x86_64", "amd64") and SHM_DIR.is_dir()
        name: list[str | None] = [None]
        if rank == 0 and usable:
            path = SHM_DIR / f"clpipe-collectives-{os.getpid()}-{secrets.token_hex(8)}"
            try:
                with open(path, "wb") as f:
                    f.truncate(_LINE * world + 2 * world * slot_bytes)
                name = [str(path)]
            except OSError:
                usable = False
        dist.broadcast_object_list(name, src=0)
        group = None
        if name[0] is not None and usable:
            try:
                group = cls(Path(name[0]), rank, world, slot_bytes, timeout_s)
            except OSError:
                group = None
        ok = [False] * world
        dist.all_gather_object(ok, group is not None)
        if rank == 0 and name[0] is not None:
            Path(name[0]).unlink(missing_ok=True)  # every rank has it mapped (or gave up): no file is left behind
        if not all(ok):
            if group is not None:
                group.close()
            return None
        assert group is not None
        # the same memory on every rank: each writes its rank, then reads all of them
        seen = group.all_gather(torch.tensor([rank], dtype=torch.int64))
        if seen.view(-1).tolist() != list(range(world)):
            raise RuntimeError(f"shared-memory collectives: rank {rank} read ranks {seen.view(-1).tolist()}")
        return group

    def fits(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.numel() * x.element_size() <= self.slot_bytes

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """(world, *x.shape): every rank's ``x``, in rank order, without gradient. One
        custom operator (``clpipe::shm_all_gather``), so compiled networks trace it."""
        if not self.fits(x):
            raise ValueError(
                f"shared-memory all_gather: {x.numel() * x.element_size()} bytes on {x.device}; "
                f"at most {self.slot_bytes} bytes of CPU tensor"
            )
        return torch.ops.clpipe.shm_all_gather(x.detach(), self.key, self.world)

    def _all_gather(self, x: torch.Tensor) -> torch.Tensor:
        self.count += 1
        buf = self.count & 1
        raw = x.contiguous().view(-1).view(torch.uint8).numpy()
        self._data[buf, self.rank, : raw.size] = raw
        self._seq[self.rank] = self.count  # after the data: published
        self._wait(self.count)
        # a new tensor of x's dtype, not a dtype view of a uint8 copy: an operator's output
        # must own its storage at its own element size
        out = torch.empty((self.world, *x.shape), dtype=x.dtype)
        out.view(-1).view(torch.uint8).numpy().reshape(self.world, raw.size)[:] = self._data[buf, :, : raw.size]
        return out

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (in rank order: the same bits on every rank), a new tensor."""
        parts = self.all_gather(x)
        out = parts[0].clone()
        for r in range(1, self.world):
            out += parts[r]
        return out

    def _wait(self, count: int) -> None:
        """Until every rank has published ``count``: busy polls first (a peer that is a few
        microseconds behind), then sleeps a tenth of the time waited so far (20 us to 1 ms),
        which leaves the core to the loader processes while a peer is far behind."""
        seq = self._seq
        for _ in range(_SPINS):
            if int(seq.min()) >= count:
                return
        start = time.monotonic()
        while int(seq.min()) < count:
            waited = time.monotonic() - start
            if waited > self.timeout_s:
                late = [r for r in range(self.world) if int(seq[r]) < count]
                raise TimeoutError(
                    f"shared-memory collective {count}: rank(s) {late} did not arrive within {self.timeout_s:g} s"
                )
            time.sleep(min(_MAX_SLEEP_S, max(_MIN_SLEEP_S, waited / 10)))

    def close(self) -> None:
        _GROUPS.pop(self.key, None)
        self._seq = self._data = None  # type: ignore[assignment]
        self._mm.close()
