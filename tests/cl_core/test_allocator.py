"""The training loop's CPU allocator setting (cl_core.allocator): freed blocks are kept
and reused instead of being mapped, zero-filled and unmapped on every step."""

import resource
import sys
import threading

import pytest
import torch

from cl_core import allocator

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or allocator._glibc() is None, reason="glibc only")


def _faults(n: int = 16, mib: int = 64) -> list[int]:
    """Minor page faults of each of ``n`` rounds of allocating, filling and freeing ``mib``
    MiB (a training step's activation)."""
    out = []
    for _ in range(n):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(mib << 18)  # float32: mib MiB
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out


@pytest.fixture
def restore():
    was = allocator.caching()
    yield
    allocator.cache_freed_memory(was)


def test_cached_blocks_are_reused_without_page_faults(restore):
    assert allocator.cache_freed_memory(False) and not allocator.caching()
    system = _faults()
    assert allocator.cache_freed_memory(True) and allocator.caching()
    cached = _faults()
    pages = (64 << 20) / resource.getpagesize()
    assert min(system) > 0.9 * pages  # glibc maps every 64 MiB block anew: each page faults
    # torch's 64-byte aligned requests reuse a kept block once freed neighbours have
    # merged: a few rounds first, then none (a training loop's steady state)
    assert max(cached[-6:]) < 0.01 * pages, (system, cached)


def test_large_blocks_still_allocate_from_threads(restore):
    """Threads use their own arenas (64 MiB heaps); with mmap off for large blocks glibc
    must still serve a larger one there."""
    allocator.cache_freed_memory(True)
    out = []
    t = threading.Thread(target=lambda: out.append(float(torch.ones(48 << 20).sum())))  # 192 MiB
    t.start()
    t.join()
    assert out == [float(48 << 20)]


def test_the_loop_applies_the_setting(restore, npz_file, tmp_path):
    from cl_core.data import shards as S
    from cl_core.data.sources import npz_source
    from tests.cl_core.test_engine import _loop
    from tests.cl_core.test_shards import write_set

    (tmp_path / "s").mkdir()
    urls = S.shard_urls(tmp_path / "s", write_set(npz_source(npz_file), tmp_path / "s", per_shard=6), "train")
    _loop(urls, epochs=1, cpu_allocator="system")
    assert not allocator.caching()
    _loop(urls, epochs=1)  # the default: cache
    assert allocator.caching()
