import json
import subprocess
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds

from cl_core.augment import EvalTransform, SimCLRTransform
from cl_core.data import shards as S
from cl_core.data.reader import ShardStream, load_split, plan_epoch, training_loader
from cl_core.data.sources import ImageFolderSource, SourceError, digits_source, npz_source


def write_set(source, out, *, per_shard=8, min_shards=2, seed=0):
    refs = source.refs()
    splits = S.split_refs(refs, val_fraction=0.2, test_fraction=0.2, seed=seed, stratified=source.labeled)
    results = {}
    for split, items in splits.items():
        results[split] = [
            S.write_shard(source, items[a:b], out / f"{split}-{i:06d}.tar")
            for i, (a, b) in enumerate(S.plan_shards(len(items), per_shard, min_shards))
        ]
    manifest = S.build_manifest(
        source=source, split_sizes={k: len(v) for k, v in splits.items()}, shard_results=results, seed=seed, config={}
    )
    S.write_manifest(out, manifest)
    return manifest


def test_round_trip_and_manifest_sums(npz_file, tmp_path):
    src = npz_source(npz_file)
    out = tmp_path / "shards"
    out.mkdir()
    m = write_set(src, out)
    assert m["num_samples"] == 60 and m["num_corrupt"] == 0 and m["num_classes"] == 3
    assert sum(m["splits"][s]["num_samples"] for s in S.SPLITS) == 60
    for s in S.SPLITS:
        split = m["splits"][s]
        assert sum(sh["num_samples"] for sh in split["shards"]) == split["num_samples"]
        assert sum(split["class_counts"].values()) == split["num_samples"]
        for sh in split["shards"]:
            assert S.sha256_file(out / sh["name"]) == sh["sha256"]
    # stratified: 20% of each class of 20 in val and in test
    assert m["splits"]["val"]["class_counts"] == {"0": 4, "1": 4, "2": 4}
    # every source image lands exactly once, pixel-exact, with its label
    ids, tf = [], EvalTransform(12, mean=(0, 0, 0), std=(1, 1, 1))
    x, y = np.load(npz_file)["images"], np.load(npz_file)["labels"]
    for s in S.SPLITS:
        urls, _ = S.shard_urls(out, m, s)
        for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
            idx = sample["json"]["index"]
            ids.append(idx)
            assert sample["cls"] == y[idx]
            got = (tf(sample["png"]) * 255).round().byte().permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(got, x[idx])
    assert sorted(ids) == list(range(60))


def test_plain_tar_and_webdataset_read_shards(npz_file, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    m = write_set(npz_source(npz_file), out)
    name = m["splits"]["train"]["shards"][0]["name"]
    listing = subprocess.run(["tar", "-tf", str(out / name)], capture_output=True, text=True, check=True).stdout.split()
    exts = Counter(f.rsplit(".", 1)[1] for f in listing)
    assert exts["png"] == exts["cls"] == exts["json"] == m["splits"]["train"]["shards"][0]["num_samples"]
    n = sum(1 for _ in wds.WebDataset(str(out / name), shardshuffle=False))
    assert n == exts["png"]
    assert json.loads((out / "manifest.json").read_text())["format"] == "clpipe-shards/1"


def test_corrupt_image_is_counted_and_skipped(image_folder, tmp_path):
    bad = image_folder / "class1" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    trunc = image_folder / "class2" / "truncated.png"
    trunc.write_bytes((image_folder / "class2" / "002.png").read_bytes()[:40])
    src = ImageFolderSource(image_folder)
    assert src.class_names == ["class0", "class1", "class2"] and len(src.refs()) == 32
    out = tmp_path / "s"
    out.mkdir()
    m = write_set(src, out)
    assert m["num_corrupt"] == 2 and m["num_samples"] == 30
    assert sorted(c["id"] for c in m["corrupt"]) == ["class1/broken.png", "class2/truncated.png"]


def test_a_source_read_error_fails_the_shard_and_a_passing_one_is_retried(image_folder, tmp_path, monkeypatch):
    """Only an image that does not decode is a corrupt sample. A file that cannot be read (gone,
    or on another node's disk only) is retried with backoff, then fails the shard with one line
    naming it; no shard or temp file is left. A read that fails once and then works loses
    nothing."""
    from cl_core.data import sources

    monkeypatch.setattr(sources, "READ_BACKOFF_S", 0.0)
    src = ImageFolderSource(image_folder)
    refs = src.refs()
    gone = image_folder / refs[1].id
    gone.unlink()
    with pytest.raises(sources.SourceReadError) as e:
        S.write_shard(src, refs, tmp_path / "a.tar")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and f"cannot read {gone} (FileNotFoundError" in msg
    assert f"after {sources.READ_ATTEMPTS} attempts" in msg and "s3://" in msg
    assert not list(tmp_path.glob("a.tar")) and not list(tmp_path.glob(".a.tar.*"))  # no shard, no temp file

    src = ImageFolderSource(image_folder)  # the file list without the deleted one
    calls = []
    real = sources.storage.read_bytes

    def flaky(path):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        return real(path)

    monkeypatch.setattr(sources.storage, "read_bytes", flaky)
    r = S.write_shard(src, src.refs(), tmp_path / "b.tar")
    assert r["num_samples"] == len(src.refs()) and r["corrupt"] == [] and calls[0] == calls[1]


def test_flat_folder_is_unlabeled(tmp_path, image_folder):
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in list((image_folder / "class0").iterdir())[:5]:
        (flat / f.name).write_bytes(f.read_bytes())
    src = ImageFolderSource(flat)
    assert not src.labeled and all(r.label == -1 for r in src.refs()) and len(src.refs()) == 5


def test_source_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        npz_source(tmp_path / "nope.npz")
    np.savez(tmp_path / "f.npz", images=np.zeros((3, 4, 4), dtype=np.float32))
    with pytest.raises(SourceError, match="must be uint8"):
        npz_source(tmp_path / "f.npz")
    np.savez(tmp_path / "g.npz", pixels=np.zeros((3, 4, 4), dtype=np.uint8))
    with pytest.raises(SourceError, match="no 'images' array"):
        npz_source(tmp_path / "g.npz")
    with pytest.raises(SourceError, match="not a directory"):
        ImageFolderSource(tmp_path / "missing")


def test_digits_source():
    src = digits_source()
    refs = src.refs()
    assert len(refs) == 1797 and src.class_names == [str(i) for i in range(10)]
    data, ext = src.encode(refs[0])
    assert ext == "png" and data[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "counts,world,workers,batch",
    [
        ([10, 10, 10, 10, 9], 2, 1, 4),
        ([7, 3, 12, 5, 5, 8], 2, 2, 5),
        ([100], 1, 1, 16),
        ([4, 4, 4], 3, 0, 3),
    ],
)
def test_epoch_plan_covers_every_sample_with_equal_steps(counts, world, workers, batch):
    for epoch in range(3):
        plan = plan_epoch(counts, world_size=world, loader_workers=workers, batch_size=batch, epoch=epoch, seed=1)
        dealt = sorted(i for r in plan.slots for s in r for i in s.shards)
        assert dealt == list(range(len(counts)))  # disjoint and complete
        for r in plan.slots:
            assert sum(s.num_batches for s in r) == plan.steps
            for s in r:
                assert s.num_batches * batch >= s.num_samples
        assert plan.unique_samples == sum(counts)
        assert plan.samples_seen - sum(counts) < world * max(1, workers) * batch + world * batch


def test_epoch_plan_needs_a_shard_per_worker():
    with pytest.raises(ValueError, match="min_shards"):
        plan_epoch([5], world_size=2, loader_workers=1, batch_size=2, epoch=0, seed=0)


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_stream_sees_every_training_sample_once_per_epoch(npz_file, tmp_path, loader_workers):
    out = tmp_path / "s"
    out.mkdir()
    m = write_set(npz_source(npz_file), out, per_shard=5, min_shards=4)
    urls, counts = S.shard_urls(out, m, "train")
    tf = EvalTransform(8)
    seen: list[int] = []
    world = 2

    def key(view):  # identify a sample by its exact pixels
        return hash(view.numpy().tobytes())

    index = {key(img): i for i, img in enumerate(load_split(urls, tf)[0])}
    steps = set()
    for rank in range(world):
        stream = ShardStream(
            urls,
            counts,
            transform=lambda im: [tf(im), tf(im)],
            batch_size=4,
            rank=rank,
            world_size=world,
            loader_workers=loader_workers,
            shuffle_buffer=10,
            seed=0,
        )
        stream.set_epoch(1)
        batches = list(training_loader(stream, num_workers=loader_workers))
        steps.add(len(batches))
        for views, labels, idx in batches:
            assert views[0].shape == (4, 3, 8, 8) and labels.shape == (4,)
            seen += [index[key(v)] for v in views[0]]
            assert idx.tolist() == [index[key(v)] for v in views[0]]  # the dense split index of each sample
    assert len(steps) == 1  # every rank the same number of batches
    assert set(seen) == set(range(sum(counts)))  # every training sample at least once
    plan = stream.plan()
    assert len(seen) == plan.samples_seen and plan.unique_samples == sum(counts)


def test_stream_is_deterministic(npz_file, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    m = write_set(npz_source(npz_file), out, per_shard=5, min_shards=4)
    urls, counts = S.shard_urls(out, m, "train")

    def first_batch():
        stream = ShardStream(
            urls,
            counts,
            transform=SimCLRTransform(8),
            batch_size=4,
            rank=0,
            world_size=1,
            loader_workers=0,
            shuffle_buffer=10,
            seed=7,
        )
        return next(iter(training_loader(stream, num_workers=0)))[0][0]

    assert torch.equal(first_batch(), first_batch())
