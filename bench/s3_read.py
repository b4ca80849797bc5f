"""Reading images from S3: WebDataset tar shards vs one object per image (one GET each).

A SeaweedFS S3 server is started on 127.0.0.1 (temporary directory, free port block, random
credentials; stopped by PID at the end). The same PNG bytes are uploaded twice:

- shards: the shard stage's writing path (``split_refs`` / ``plan_shards`` /
  ``write_shard``: ``KEY.png`` + ``KEY.cls`` + ``KEY.json``, 256 samples per shard),
  uploaded with ``storage.upload_file``, the manifest last.
- objects: ``images/KEY.png``, one object per image (``PUT`` each), labels in one side
  object ``images/labels.json``.

Both sides then read every image once per epoch with the same decode (PIL, convert RGB:
``reader.decode_sample``), the same ``SimCLRTransform`` (two views), batch size, DataLoader
worker count and prefetch factor:

- shards: the project's reader over ``s3://`` shard URLs -- ``ShardStream`` +
  ``training_loader`` (rank 0 of 1), each shard streamed by one GET through
  ``cl_core.data.storage`` (registered with ``webdataset.gopen``).
- objects: a map-style ``Dataset`` over the object keys, ``get_object`` per image with a
  boto3 client created in each DataLoader worker process (``s3.client()``),
  ``DataLoader(shuffle=True)``, which deals the batches across the workers.

Repetitions alternate the configurations (shards / objects, for each worker count), so
drift in machine speed -- the S3 server shares the cores -- hits all sides alike.
Repetition 0 is a warm-up and is discarded; the table gives medians. Each epoch is timed
from creating the loader iterator to the last batch (worker start-up counts). The
labels index and the manifest are read before the timed epoch on both sides.
The ratio is shards / objects in distinct images per second.

Images: ``synthetic`` (default) are 32x32 RGB noise with a class-coloured disc or square
(``bench/loader.py``'s generator; PNG ~2.8 KB each, about CIFAR's size); ``digits`` are
scikit-learn's 8x8 digits upscaled to ``--image-size`` RGB, cycled to ``--num-images``.

Run (about 2-3 minutes on 2 cores with the defaults)::

    .venv/bin/python bench/s3_read.py                          # 2,048 synthetic 32 px images, 0 and 2 workers
    .venv/bin/python bench/s3_read.py --workers 2 --repeats 5  # one worker count, more repetitions
    .venv/bin/python bench/s3_read.py --transform tensor       # decode only, no augmentation

Results go to bench/results/s3_read[-digits][-decode-only].json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader import TensorViews, machine, synthetic_npz  # noqa: E402  (bench/loader.py)

from cl_core.augment import SimCLRTransform  # noqa: E402
from cl_core.data import shards as S  # noqa: E402
from cl_core.data import storage  # noqa: E402  (routes s3:// of webdataset.gopen to the backend)
from cl_core.data.reader import ShardStream, decode_sample, training_loader  # noqa: E402
from cl_core.data.sources import ArraySource, SampleRef, npz_source  # noqa: E402
from infra import procs, s3, seaweed  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PREFETCH = 4  # what training_loader uses; the object loader gets the same
BUCKET = "clpipe-bench"


def digits_images(n: int, size: int) -> ArraySource:
    """scikit-learn's digits, upscaled (bilinear) to ``size`` px RGB and cycled to ``n`` images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    small = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    big = np.stack(
        [np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR).convert("RGB")) for im in small]
    )
    idx = np.arange(n) % len(big)
    labels = d.target.astype(np.int64)[idx]
    return ArraySource(big[idx], labels, [str(c) for c in range(10)], "digits", {"kind": "digits-upscaled"})


# -- upload ------------------------------------------------------------------------------


def _map(fn: Callable[[Any], Any], items: Sequence, threads: int) -> list:
    if threads <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


def upload_shards(
    source: ArraySource, refs: list[SampleRef], tmp: Path, base: str, per_shard: int, min_shards: int, threads: int
) -> dict:
    """Write the shards locally (encode + tar), upload them, then the manifest."""
    t0 = time.perf_counter()
    directory = tmp / "shards"
    directory.mkdir()
    ranges = S.plan_shards(len(refs), per_shard, min_shards)
    results = [S.write_shard(source, refs[a:b], directory / f"train-{i:06d}.tar") for i, (a, b) in enumerate(ranges)]
    manifest = S.build_manifest(
        source=source,
        split_sizes={"train": len(refs)},
        shard_results={"train": results},
        seed=0,
        config={"samples_per_shard": per_shard, "min_shards": min_shards},
    )
    t1 = time.perf_counter()
    names = [r["name"] for r in results]
    _map(lambda name: storage.upload_file(directory / name, storage.join(base, name)), names, threads)
    storage.write_bytes(storage.join(base, S.MANIFEST), json.dumps(manifest, indent=2).encode())
    t2 = time.perf_counter()
    size = sum((directory / n).stat().st_size for n in names)
    return {
        "write_s": t1 - t0,
        "upload_s": t2 - t1,
        "objects": len(names) + 1,
        "bytes": size,
        "upload_mb_per_s": size / 1e6 / (t2 - t1),
        "upload_objects_per_s": (len(names) + 1) / (t2 - t1),
    }


def upload_objects(source: ArraySource, refs: list[SampleRef], base: str, threads: int) -> dict:
    """Encode every image, then PUT each as ``images/KEY.png``, then ``images/labels.json``."""
    t0 = time.perf_counter()
    encoded = [(f"s{r.index:09d}", source.encode(r)[0], r.label, r.index) for r in refs]  # same key and bytes as shards
    t1 = time.perf_counter()
    bucket, prefix = s3.split_s3(base)

    def put(item: tuple[str, bytes, int, int]) -> None:
        key, data, _, _ = item
        s3.client().put_object(Bucket=bucket, Key=f"{prefix}/{key}.png", Body=data)

    _map(put, encoded, threads)
    index = {key: {"label": label, "index": i} for key, _, label, i in encoded}
    storage.write_bytes(storage.join(base, "labels.json"), json.dumps(index).encode())
    t2 = time.perf_counter()
    size = sum(len(d) for _, d, _, _ in encoded)
    return {
        "encode_s": t1 - t0,
        "upload_s": t2 - t1,
        "objects": len(encoded) + 1,
        "bytes": size,
        "upload_mb_per_s": size / 1e6 / (t2 - t1),
        "upload_objects_per_s": (len(encoded) + 1) / (t2 - t1),
    }


# -- the object-per-image reader ---------------------------------------------------------


class ObjectImages(Dataset):
    """One S3 object per image: ``get_object`` per item, the shard reader's decode, then
    ``transform``. The boto3 client is made in the process that first reads (each
    DataLoader worker gets its own: ``s3.client()`` caches per process)."""

    def __init__(self, base: str, items: list[tuple[str, int, int]], transform: Callable) -> None:
        self.bucket, self.prefix = s3.split_s3(base)
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int, int]:
        key, label, index = self.items[i]
        body = s3.client().get_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}.png")["Body"]
        try:
            data = body.read()
        finally:
            body.close()
        img, label, _ = decode_sample({"__key__": key, "png": data, "cls": label})
        return self.transform(img), label, index


def read_shard_index(base: str) -> tuple[list[str], list[int]]:
    manifest = json.loads(storage.read_bytes(storage.join(base, S.MANIFEST)))
    shards = manifest["splits"]["train"]["shards"]
    return [storage.join(base, s["name"]) for s in shards], [s["num_samples"] for s in shards]


def read_object_index(base: str) -> list[tuple[str, int, int]]:
    labels = json.loads(storage.read_bytes(storage.join(base, "labels.json")))
    return [(key, v["label"], v["index"]) for key, v in labels.items()]


# -- timing ------------------------------------------------------------------------------


def time_epoch(loader) -> dict:
    """One full epoch, timed from creating the iterator (worker start-up included)."""
    t0 = time.perf_counter()
    images, first = 0, None
    for _views, labels, _index in loader:
        images += labels.numel()
        first = first if first is not None else time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "images": images, "first_batch_s": first, "images_per_s": images / seconds}


def seaweed_port(tries: int = 200) -> int:
    """An S3 port whose companion ports (+1..+3 and each +10000, see ``infra.seaweed.ports``)
    are free now; below the ephemeral range, which ``procs.free_port`` draws from."""
    rng = random.Random()
    for _ in range(tries):
        port = rng.randrange(20000, 30000)
        if all(procs.port_free(q) for q in seaweed.ports(port).values()):
            return port
    raise RuntimeError(f"no free port block for SeaweedFS found in 20000-29999 after {tries} tries")


def weed_version() -> str | None:
    try:
        out = subprocess.run([seaweed.weed_binary(), "version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--source", choices=["synthetic", "digits"], default="synthetic")
    p.add_argument("--num-images", type=int, default=2048, help="2048 = 8 shards of 256")
    p.add_argument("--image-size", type=int, default=32, help="stored side and view side")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts, both sides")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per configuration (after 1 warm-up)")
    p.add_argument("--samples-per-shard", type=int, default=256, help="256 = pipeline default")
    p.add_argument("--shuffle-buffer", type=int, default=500, help="500 = pipeline default")
    p.add_argument("--upload-threads", type=int, default=1, help="concurrent PUTs while uploading, both layouts")
    p.add_argument(
        "--transform",
        choices=["simclr", "tensor"],
        default="simclr",
        help="simclr: two SimCLR views (the training path); tensor: decode + to-tensor only",
    )
    p.add_argument("--data-dir", type=Path, help="where to put the server and shard files (default: a temp dir)")
    p.add_argument("--out", type=Path, help="JSON path (default: bench/results/s3_read[-digits].json)")
    a = p.parse_args(argv)
    suffix = ("" if a.source == "synthetic" else f"-{a.source}") + ("" if a.transform == "simclr" else "-decode-only")
    out = a.out or RESULTS / f"s3_read{suffix}.json"
    worker_counts = [int(w) for w in a.workers.split(",")]
    torch.set_num_threads(1)  # the main process only receives batches; leave the cores to the workers
    log = partial(print, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-s3-", dir=a.data_dir) as tmp_name:
        tmp = Path(tmp_name)
        server = seaweed.start(
            tmp / "weed", seaweed_port(), access_key=secrets.token_hex(10), secret_key=secrets.token_hex(20)
        )
        log(f"SeaweedFS S3 at {server.endpoint} (pid {server.pid})")
        try:
            os.environ.update(server.env())  # before any boto3 client is made; workers inherit it
            s3.client().create_bucket(Bucket=BUCKET)
            result = run(a, tmp, worker_counts, log)
        finally:
            server.stop()
            log(f"SeaweedFS pid {server.pid} stopped: {'no' if procs.alive(server.pid) else 'yes'}")
    result["machine"]["seaweedfs"] = weed_version()
    result["machine"]["boto3"] = boto3.__version__
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"saved {out}")
    return result


def run(a: argparse.Namespace, tmp: Path, worker_counts: list[int], log: Callable[..., None]) -> dict:
    if a.source == "digits":
        source = digits_images(a.num_images, a.image_size)
    else:
        synthetic_npz(tmp / "images.npz", a.num_images, a.image_size)
        source = npz_source(tmp / "images.npz")
    refs = S.split_refs(source.refs(), val_fraction=0.0, test_fraction=0.0, seed=0, stratified=True)["train"]
    shard_base, object_base = f"s3://{BUCKET}/shards", f"s3://{BUCKET}/images"

    up_shards = upload_shards(
        source, refs, tmp, shard_base, a.samples_per_shard, max(1, max(worker_counts)), a.upload_threads
    )
    log(
        f"shards: {up_shards['objects'] - 1} x ~{a.samples_per_shard} images, "
        f"{up_shards['bytes'] / 1e6:.1f} MB: written in "
        f"{up_shards['write_s']:.1f}s, uploaded in {up_shards['upload_s']:.1f}s"
    )
    up_objects = upload_objects(source, refs, object_base, a.upload_threads)
    log(
        f"objects: {len(refs)} images, {up_objects['bytes'] / 1e6:.1f} MB: encoded in {up_objects['encode_s']:.1f}s, "
        f"uploaded in {up_objects['upload_s']:.1f}s"
    )

    # what a training job starts from: the manifest (shard URLs, counts) and the labels index,
    # each read once from S3 before the first epoch
    urls, counts = read_shard_index(shard_base)
    items = read_object_index(object_base)
    assert sum(counts) == len(items) == len(refs), (sum(counts), len(items), len(refs))

    # one transform instance, both sides
    transform = SimCLRTransform(a.image_size) if a.transform == "simclr" else TensorViews()
    sides: dict[str, Callable[[int], tuple[Any, int, int]]] = {}  # name -> rep -> (loader, distinct, GETs)
    for w in worker_counts:

        def shards(rep: int, w: int = w) -> tuple[Any, int, int]:
            stream = ShardStream(
                urls,
                counts,
                transform=transform,
                batch_size=a.batch_size,
                rank=0,
                world_size=1,
                loader_workers=w,
                shuffle_buffer=a.shuffle_buffer,
                seed=0,
            )
            stream.set_epoch(rep)
            return training_loader(stream, num_workers=w), stream.plan().unique_samples, len(urls)

        def objects(rep: int, w: int = w) -> tuple[Any, int, int]:
            ds = ObjectImages(object_base, items, transform)
            loader = DataLoader(
                ds,
                batch_size=a.batch_size,
                shuffle=True,
                drop_last=False,
                generator=torch.Generator().manual_seed(rep),
                num_workers=w,
                prefetch_factor=PREFETCH if w else None,
            )
            return loader, len(ds), len(ds)

        sides[f"shards, {w} workers"] = shards
        sides[f"objects, {w} workers"] = objects

    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for rep in range(a.repeats + 1):
        for name, make in sides.items():
            loader, distinct, gets = make(rep)
            r = time_epoch(loader)
            r |= {
                "distinct": distinct,
                "distinct_per_s": distinct / r["seconds"],
                "gets": gets,
                "loadavg_1m": os.getloadavg()[0],
            }  # other work on the machine shows up here
            log(
                f"rep {rep}{' (warm-up)' if rep == 0 else ''}: {name}: {r['images']} images in "
                f"{r['seconds']:.2f}s = {r['images_per_s']:.0f} img/s (load {r['loadavg_1m']:.1f})"
            )
            if rep > 0:
                runs[name].append(r)

    keys = ("images_per_s", "distinct_per_s", "seconds", "first_batch_s")
    summary = {
        name: {k: statistics.median(r[k] for r in rs) for k in keys}
        | {"images": rs[0]["images"], "distinct": rs[0]["distinct"], "gets": rs[0]["gets"]}
        for name, rs in runs.items()
    }
    ratios = {
        str(w): summary[f"shards, {w} workers"]["distinct_per_s"] / summary[f"objects, {w} workers"]["distinct_per_s"]
        for w in worker_counts
    }

    print(
        f"\n{len(refs)} images ({a.source}, {a.image_size} px PNG), SeaweedFS on 127.0.0.1, batch {a.batch_size}, "
        f"{'two SimCLR views' if a.transform == 'simclr' else 'decode only'}, median of {a.repeats} epochs "
        "after 1 warm-up\n"
    )
    print("| layout | workers | images/s | distinct/s | epoch s | first batch s | GETs/epoch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, s in summary.items():
        layout, nw = name.split(", ")
        print(
            f"| {layout} | {nw.split()[0]} | {s['images_per_s']:.0f} | {s['distinct_per_s']:.0f} | {s['seconds']:.2f} "
            f"| {s['first_batch_s']:.2f} | {s['gets']} |"
        )
    print()
    for nw, ratio in ratios.items():
        print(f"ratio shards/objects distinct images/s, {nw} workers: {ratio:.2f}")
    print("\n| upload | objects | MB | prepare s | upload s | MB/s | objects/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, u, prep in (
        ("shards (+ manifest)", up_shards, up_shards["write_s"]),
        ("one object per image (+ labels.json)", up_objects, up_objects["encode_s"]),
    ):
        print(
            f"| {name} | {u['objects']} | {u['bytes'] / 1e6:.1f} | {prep:.2f} | {u['upload_s']:.2f} "
            f"| {u['upload_mb_per_s']:.1f} | {u['upload_objects_per_s']:.0f} |"
        )
    print(f"\nupload time ratio objects/shards: {up_objects['upload_s'] / up_shards['upload_s']:.1f}x")

    return {
        "benchmark": "s3_read",
        "machine": machine(),
        "settings": {
            "source": a.source,
            "num_images": len(refs),
            "image_size": a.image_size,
            "batch_size": a.batch_size,
            "workers": worker_counts,
            "repeats": a.repeats,
            "warmup_epochs": 1,
            "samples_per_shard": a.samples_per_shard,
            "num_shards": len(urls),
            "shuffle_buffer": a.shuffle_buffer,
            "prefetch_factor": PREFETCH,
            "upload_threads": a.upload_threads,
            "transform": "SimCLRTransform(image_size), defaults, 2 views"
            if a.transform == "simclr"
            else "PILToTensor only (readers alone)",
            "decode": "reader.decode_sample: PIL, convert RGB",
            "server": "SeaweedFS `weed server -s3` on 127.0.0.1, same machine, credentials on",
            "shards": "ShardStream + training_loader over s3:// URLs (one streamed GET per shard)",
            "objects": "map-style Dataset, get_object per image, client per worker process, "
            "DataLoader(shuffle=True, drop_last=False)",
        },
        "upload": {
            "shards": up_shards,
            "objects": up_objects,
            "ratio_objects_over_shards_upload_s": up_objects["upload_s"] / up_shards["upload_s"],
        },
        "summary": summary,
        "ratio_shards_over_objects": ratios,
        "runs": runs,
    }


if __name__ == "__main__":
    main()
