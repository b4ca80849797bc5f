"""Memory that does not grow with the data set: a .npz source is memory-mapped (never
read whole), the fine-tune/distill val split is read in batches with a bounded cache,
and the chain's peak RSS per stage hardly moves from 1,000 to 10,000 images
(``bench/scale.py``'s measurement, at a tenth of its sizes)."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cl_core.augment import EvalTransform
from cl_core.data.reader import EvalSplit, load_split
from cl_core.data.sources import ArraySource, MappedImages, NpzSource, SourceError, npz_source
from tests.cl_core.test_monitor import digits_shards  # noqa: F401  (fixture)

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (40, 6, 6, 3), dtype=np.uint8), rng.integers(0, 4, 40)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_source_maps_instead_of_loading(tmp_path, arrays, save):
    x, y = arrays
    save(tmp_path / "a.npz", images=x, labels=y)
    src = npz_source(tmp_path / "a.npz")
    assert isinstance(src, NpzSource) and len(src.refs()) == 40 and src.class_names == ["0", "1", "2", "3"]
    stored = save is np.savez
    assert isinstance(src._images, MappedImages) == stored  # compressed: nothing read until needed
    src.stage(tmp_path)  # compressed: unpacked once, streaming, next to the shards
    assert isinstance(src._images, MappedImages)
    assert list(tmp_path.glob(".*.npy")) == ([] if stored else [tmp_path / ".a-images.npy"])
    # a shard task receives the location, not the pixels
    assert len(pickle.dumps(src)) < x.nbytes
    copy = pickle.loads(pickle.dumps(src))
    plain = ArraySource(x, y.astype(np.int64), [], "a", {})
    assert all(copy.encode(r) == plain.encode(r) for r in src.refs())  # byte-identical PNGs
    assert [(r.id, r.label) for r in copy.refs()] == [(r.id, r.label) for r in plain.refs()]


def test_npz_one_channel_and_errors(tmp_path, arrays):
    x, _ = arrays
    np.savez(tmp_path / "g.npz", images=x[..., :1])
    src = npz_source(tmp_path / "g.npz")
    assert src.images.shape == (40, 6, 6) and not src.labeled
    np.savez(tmp_path / "bad.npz", images=x, labels=np.arange(3))
    with pytest.raises(SourceError, match=r"'labels' must be non-negative integers of shape \(40,\)"):
        npz_source(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SourceError, match="junk.npz is not a readable .npz file"):
        npz_source(tmp_path / "junk.npz")


def test_eval_split_batches_are_the_same_cached_or_streamed(digits_shards):  # noqa: F811
    tf = EvalTransform(16)
    x, y = load_split(digits_shards["val"], tf)
    cached = EvalSplit(digits_shards["val"], tf, batch_size=100)
    streamed = EvalSplit(digits_shards["val"], tf, batch_size=100, cache_bytes=x[:150].numel() * 4)
    for split in (cached, streamed):
        for _ in range(2):  # a second pass: from memory, or read again
            got = list(split.batches())
            assert [len(b[1]) for b in got] == [100] * (len(y) // 100) + ([len(y) % 100] if len(y) % 100 else [])
            assert torch.equal(torch.cat([b[0] for b in got]), x) and torch.equal(torch.cat([b[1] for b in got]), y)
    assert cached.cached and not streamed.cached  # the whole split fitted 64 MiB; 150 images' worth did not


@pytest.mark.slow
def test_peak_memory_of_shard_and_pretrain_is_flat_in_the_data_size(tmp_path):
    """``bench/scale.py``'s check at a tenth of its sizes, on the stages that read the whole
    training split (the shard stage's source, pretraining with its kNN monitor): 1,000 and
    10,000 generated 32 px images, 32 px views. The driver's and the largest Ray worker's
    peak RSS may grow by less than 10%, and their anonymous memory by less than 40 MB (the
    training split held whole would be 9,000 x 3 KB as stored, 100 MB as float views).

    The monitor's bank and val set are capped below the small size here, so the memory it
    is designed to take (the bank's features, one similarity block of at most 64 MiB) is
    the same at both sizes; with the default caps (10,000) it grows up to those bounds
    between 1,000 and 10,000 images (+62 MB measured), which bench/scale.py's 10,000 and
    100,000 images are both past. File-backed resident pages are left out of the absolute
    bound: how much of libtorch a process has mapped depends on what else is in the page
    cache (280 MB more inside the full suite than alone)."""
    sys.path.insert(0, str(BENCH))
    import scale

    res = scale.measure(
        "npz",
        [1_000, 10_000],
        tmp_path,
        interval=0.1,  # bench/scale.py's: each sample walks every process of the machine
        log=lambda *a: None,
        until="pretrain",
        overrides=[
            "sweep.enabled=false",
            "pretrain.views.image_size=32",
            "pretrain.monitor.max_bank=500",
            "pretrain.monitor.max_val=200",
        ],
    )
    assert set(res["stages"]) == {"shard", "pretrain"}, res["stages"].keys()
    for name, row in res["stages"].items():
        for role in ("driver", "worker"):
            r = row[role]
            assert r["growth"] < scale.GROWTH_LIMIT and r["large_anon_mb"] - r["small_anon_mb"] < 40, (name, role, r)


def test_knn_blocks_are_bounded_and_give_the_same_votes():
    from cl_core.evaluate import knn_predict

    g = torch.Generator().manual_seed(0)
    bank, labels, queries = (
        torch.randn(3000, 16, generator=g),
        torch.randint(0, 5, (3000,), generator=g),
        torch.randn(700, 16, generator=g),
    )
    whole = knn_predict(bank, labels, queries, num_classes=5)
    small = knn_predict(bank, labels, queries, num_classes=5, max_elements=3000 * 7)  # 7 queries per block
    assert torch.equal(whole, small)


def test_a_shard_task_releases_the_source_file(tmp_path, arrays):
    x, y = arrays
    np.savez(tmp_path / "a.npz", images=x, labels=y)
    src = npz_source(tmp_path / "a.npz")
    src.encode(src.refs()[0])  # one positioned read: the file is open, not mapped
    assert src._images._fd is not None and src._images._array is None
    src.release()
    assert src._images._fd is None and src.encode(src.refs()[1])[1] == "png"  # reopened on the next read
    src.release()
