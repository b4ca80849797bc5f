"""Data-loading throughput: WebDataset tar shards vs loose PNG files (ImageFolder).

Both sides read the same PNG bytes (written once by the project's ``ArraySource.encode``),
decode with PIL and convert to RGB, apply the same ``SimCLRTransform`` (two views) and
batch with a DataLoader of the same batch size, worker count and prefetch factor:

- WebDataset: the project's own path -- ``split_refs`` / ``plan_shards`` / ``write_shard``
  / manifest -> ``shard_urls`` -> ``ShardStream`` + ``training_loader`` (rank 0 of 1).
- stock WebDataset: the same shards through ``wds.WebDataset(...).shuffle().decode("pil")``
  as WebDataset's docs show it (Python's ``tarfile`` underneath), split across DataLoader
  workers with ``split_by_worker``, batched in the workers.
- ImageFolder: ``root/<class>/<index>.png`` read by ``torchvision.datasets.ImageFolder``
  (its loader converts to RGB), ``DataLoader(shuffle=True, drop_last=True)``.

Each repetition runs one full epoch of every configuration in turn (alternating, so drift
in machine speed hits all sides alike) and times it from creating the loader iterator to
the last batch, so worker start-up counts, as it does in training. Repetition 0 is a
warm-up and is discarded; the table gives medians over the others. Throughput counts
images delivered (one image = one pair of views). The WebDataset reader pads every
DataLoader worker's slot to whole batches with repeats, so it can deliver a few more
images per epoch than there are (``delivered`` vs ``distinct``; ``distinct/s`` is the
rate of distinct images per epoch). The ratios use distinct/s (padding repeats do not count), of the fastest shard size.

Run (about 1-2 minutes on 2 cores with the defaults)::

    .venv/bin/python bench/loader.py                      # 10,000 synthetic 32x32 images
    .venv/bin/python bench/loader.py --source digits      # scikit-learn digits, 1,797 8x8
    .venv/bin/python bench/loader.py --samples-per-shard 64,256,1000   # compare shard sizes
    .venv/bin/python bench/loader.py --transform tensor   # the readers alone: decode, no augmentation
    .venv/bin/python bench/loader.py --format jpeg --image-size 224 --num-images 2000 --batch-size 64
        # 224 px JPEGs: two SimCLR views per image, and the loader's part of decode_on: device

With ``--format jpeg`` the images are stored as JPEG (quality 90) in the shards and in the
folder alike, and one more row times the loader's part of ``views.decode_on: device``
(the JPEG header, the crop boxes and flips; the bytes travel, the decoding and the views
are made on the training device, not timed here). ``distinct_per_s_per_worker`` is the
rate per DataLoader worker, each with a core of its own.

Results go to bench/results/loader[-digits][-decode-only][-jpeg-SIZE].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchvision
import webdataset as wds
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms.functional import pil_to_tensor

from cl_core.augment import SimCLRTransform
from cl_core.data import shards as S
from cl_core.data.device_decode import CropPlan, collate_encoded, decode_encoded
from cl_core.data.reader import ShardStream, training_loader
from cl_core.data.sources import ArraySource, Source, digits_source, npz_source

RESULTS = Path(__file__).resolve().parent / "results"
PREFETCH = 4  # what training_loader uses; the ImageFolder loader gets the same


def synthetic_npz(path: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` RGB noise images with a class-coloured disc (even class) or square (odd)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    palette = rng.integers(0, 256, (10, 3))
    images = rng.integers(0, 128, (n, size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.25, 0.75, (2, n, 1, 1)) * size
    r = rng.uniform(0.12, 0.3, (n, 1, 1)) * size
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    square = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    mask = np.where((labels % 2 == 0)[:, None, None], disc, square)
    images[mask] = palette[np.broadcast_to(labels[:, None, None], mask.shape)[mask]]
    np.savez(path, images=images, labels=labels)


class TensorViews:
    """Decode-only stand-in for the views: one uint8 tensor per image, as a 1-element list."""

    def __call__(self, image) -> list[torch.Tensor]:
        return [pil_to_tensor(image)]


def _stock_sample(sample: tuple, transform) -> tuple:
    img, label = sample
    return transform(img.convert("RGB")), int(label)


def stock_webdataset_loader(urls: list[str], transform, batch_size: int, workers: int, buffer: int, epoch: int):
    """WebDataset as its docs show it: ``tarfile_to_samples`` (Python's tarfile), the generic
    ``decode("pil")``, shard split across DataLoader workers, a shuffle buffer, batching
    in the workers. Each worker drops its last partial batch."""
    ds = (
        wds.WebDataset(
            urls,
            shardshuffle=len(urls),
            seed=epoch,
            nodesplitter=wds.single_node_only,
            workersplitter=wds.split_by_worker,
            empty_check=False,
        )
        .shuffle(buffer)
        .decode("pil")
        .to_tuple("png;jpg", "cls")
        .map(partial(_stock_sample, transform=transform))
        .batched(batch_size, partial=False)
    )
    return wds.WebLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=PREFETCH if workers else None)


class JpegSource(Source):
    """Another source's images stored as JPEG (quality 90) instead of PNG."""

    def __init__(self, inner: ArraySource):
        self.inner, self.class_names = inner, inner.class_names

    def refs(self):
        return self.inner.refs()

    def encode(self, ref):
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(self.inner.images[ref.index])).convert("RGB").save(
            buf, format="JPEG", quality=90
        )
        return buf.getvalue(), "jpg"

    def describe(self) -> dict:
        return {"kind": "jpeg", "of": self.inner.describe()}


def write_shards(source: Source, refs: list, directory: Path, per_shard: int, min_shards: int):
    """The shard stage's writing path, train split only: (urls, counts)."""
    directory.mkdir(parents=True)
    ranges = S.plan_shards(len(refs), per_shard, min_shards)
    results = [S.write_shard(source, refs[a:b], directory / f"train-{i:06d}.tar") for i, (a, b) in enumerate(ranges)]
    manifest = S.build_manifest(
        source=source,
        split_sizes={"train": len(refs)},
        shard_results={"train": results},
        seed=0,
        config={"samples_per_shard": per_shard, "min_shards": min_shards},
    )
    S.write_manifest(directory, manifest)
    return S.shard_urls(directory, S.read_manifest(directory), "train")


def write_image_folder(source: Source, refs: list, root: Path) -> None:
    """The same PNG bytes as in the shards, as ``root/<class>/<index>.png``."""
    for r in refs:
        data, ext = source.encode(r)
        (root / str(r.label)).mkdir(parents=True, exist_ok=True)
        (root / str(r.label) / f"{r.index:06d}.{ext}").write_bytes(data)


def time_epoch(loader) -> dict:
    """One full epoch, timed from creating the iterator (worker start-up included)."""
    t0 = time.perf_counter()
    images, first = 0, None
    for batch in loader:  # (views, labels[, index])
        images += batch[1].numel()
        first = first if first is not None else time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "images": images, "first_batch_s": first, "images_per_s": images / seconds}


def machine() -> dict:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    return {
        "cpu_model": cpu or None,
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "webdataset": getattr(wds, "__version__", None),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", choices=["synthetic", "digits"], default="synthetic")
    p.add_argument(
        "--format",
        choices=["png", "jpeg"],
        default="png",
        help="how the images are stored, in the shards and in the folder alike (jpeg: quality 90)",
    )
    p.add_argument("--num-images", type=int, default=10000, help="synthetic source only")
    p.add_argument("--image-size", type=int, default=32, help="synthetic side and view side")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers, both sides")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per side (after 1 warm-up)")
    p.add_argument("--samples-per-shard", default="256", help="comma-separated; 256 = pipeline default")
    p.add_argument("--shuffle-buffer", type=int, default=500, help="500 = pipeline default")
    p.add_argument(
        "--transform",
        choices=["simclr", "tensor"],
        default="simclr",
        help="simclr: two SimCLR views (the training path); tensor: decode + to-tensor only",
    )
    p.add_argument("--data-dir", type=Path, help="where to write the data (default: a temp dir)")
    p.add_argument("--out", type=Path, help="JSON path (default: bench/results/loader[-digits].json)")
    a = p.parse_args(argv)
    suffix = (
        ("" if a.source == "synthetic" else f"-{a.source}")
        + ("" if a.transform == "simclr" else "-decode-only")
        + ("" if a.format == "png" else f"-jpeg-{a.image_size}")
    )
    out = a.out or RESULTS / f"loader{suffix}.json"
    sizes = [int(s) for s in a.samples_per_shard.split(",")]
    torch.set_num_threads(1)  # the main process only receives batches; leave the cores to the workers
    log = partial(print, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-loader-", dir=a.data_dir) as tmp:
        tmp, t0 = Path(tmp), time.perf_counter()
        if a.source == "digits":
            source = digits_source()
        else:
            synthetic_npz(tmp / "images.npz", a.num_images, a.image_size)
            source = npz_source(tmp / "images.npz")
        if a.format == "jpeg":
            source = JpegSource(source)
        refs = S.split_refs(source.refs(), val_fraction=0.0, test_fraction=0.0, seed=0, stratified=True)["train"]
        shard_sets = {n: write_shards(source, refs, tmp / f"shards-{n}", n, max(1, a.workers)) for n in sizes}
        write_image_folder(source, refs, tmp / "folder")
        log(f"data: {len(refs)} images as {len(sizes)} shard set(s) + a folder in {time.perf_counter() - t0:.1f}s")

        # one instance, both sides; "tensor" measures the readers alone (decode, no augmentation)
        transform = SimCLRTransform(a.image_size) if a.transform == "simclr" else TensorViews()
        folder = ImageFolder(str(tmp / "folder"), transform=transform)  # default loader: PIL .convert("RGB")
        streams = {
            n: ShardStream(
                urls,
                counts,
                transform=transform,
                batch_size=a.batch_size,
                rank=0,
                world_size=1,
                loader_workers=a.workers,
                shuffle_buffer=a.shuffle_buffer,
                seed=0,
            )
            for n, (urls, counts) in shard_sets.items()
        }
        # name -> rep -> (loader, distinct images per epoch or None for "as delivered")
        sides: dict[str, Callable[[int], tuple[Iterable, int | None]]] = {}
        for n, (urls, _) in shard_sets.items():

            def ours(rep: int, n: int = n):
                streams[n].set_epoch(rep)
                return training_loader(streams[n], num_workers=a.workers), streams[n].plan().unique_samples

            sides[f"webdataset ({n}/shard, {len(urls)} shards)"] = ours
        urls0 = shard_sets[sizes[0]][0]
        sides[f"stock webdataset ({sizes[0]}/shard)"] = lambda rep: (
            stock_webdataset_loader(urls0, transform, a.batch_size, a.workers, a.shuffle_buffer, rep),
            None,
        )
        sides["imagefolder"] = lambda rep: (
            DataLoader(
                folder,
                batch_size=a.batch_size,
                shuffle=True,
                drop_last=True,
                generator=torch.Generator().manual_seed(rep),
                num_workers=a.workers,
                prefetch_factor=PREFETCH if a.workers else None,
            ),
            None,
        )
        if a.format == "jpeg" and a.transform == "simclr":
            # views.decode_on: device, the loader's part alone: JPEG headers, crop boxes and flips; the bytes
            # travel (the decode, the crops and the colour run batched on the training device)
            n0 = sizes[0]
            plan_stream = ShardStream(
                *shard_sets[n0],
                transform=CropPlan([a.image_size] * 2, [(0.08, 1.0)] * 2, 0.5),
                batch_size=a.batch_size,
                rank=0,
                world_size=1,
                loader_workers=a.workers,
                shuffle_buffer=a.shuffle_buffer,
                seed=0,
                decode=decode_encoded,
                collate=collate_encoded,
            )

            def bytes_only(rep: int):
                plan_stream.set_epoch(rep)
                return training_loader(plan_stream, num_workers=a.workers), plan_stream.plan().unique_samples

            sides[f"decode_on: device, the loader's part ({n0}/shard)"] = bytes_only
        names = list(sides)
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for rep in range(a.repeats + 1):
            for name, make in sides.items():
                loader, distinct = make(rep)
                r = time_epoch(loader)
                r["distinct"] = distinct if distinct is not None else r["images"]
                r["distinct_per_s"] = r["distinct"] / r["seconds"]
                log(
                    f"rep {rep}{' (warm-up)' if rep == 0 else ''}: {name}: {r['images']} images in "
                    f"{r['seconds']:.2f}s = {r['images_per_s']:.0f} img/s"
                )
                if rep > 0:
                    runs[name].append(r)

    keys = ("images_per_s", "distinct_per_s", "seconds", "first_batch_s")
    summary = {
        name: {k: statistics.median(r[k] for r in rs) for k in keys}
        | {"images": rs[0]["images"], "distinct": rs[0]["distinct"]}
        for name, rs in runs.items()
    }
    best = max([n for n in names if n.startswith("webdataset")], key=lambda k: summary[k]["distinct_per_s"])
    for s_ in summary.values():  # the DataLoader workers are the cores' only load
        s_["distinct_per_s_per_worker"] = s_["distinct_per_s"] / max(1, a.workers)
    stock = next(n for n in names if n.startswith("stock"))
    ratio = summary[best]["distinct_per_s"] / summary["imagefolder"]["distinct_per_s"]
    print(
        f"\n{len(refs)} images ({a.source}), batch {a.batch_size}, {a.workers} DataLoader workers, "
        f"median of {a.repeats} epochs after 1 warm-up\n"
    )
    print("| loader | images/s | distinct/s | epoch s | first batch s | delivered | distinct |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, s in summary.items():
        print(
            f"| {name} | {s['images_per_s']:.0f} | {s['distinct_per_s']:.0f} | {s['seconds']:.2f} "
            f"| {s['first_batch_s']:.2f} | {s['images']} | {s['distinct']} |"
        )
    ratio_stock = summary[best]["distinct_per_s"] / summary[stock]["distinct_per_s"]
    print(f"\nratio webdataset/imagefolder distinct images/s: {ratio:.3f}  ({best})")
    print(f"ratio webdataset/stock webdataset distinct images/s: {ratio_stock:.3f}")

    result = {
        "benchmark": "loader",
        "machine": machine(),
        "settings": {
            "source": a.source,
            "num_images": len(refs),
            "image_size": a.image_size,
            "batch_size": a.batch_size,
            "workers": a.workers,
            "repeats": a.repeats,
            "warmup_epochs": 1,
            "samples_per_shard": sizes,
            "shuffle_buffer": a.shuffle_buffer,
            "prefetch_factor": PREFETCH,
            "transform": "SimCLRTransform(image_size), defaults, 2 views"
            if a.transform == "simclr"
            else "PILToTensor only (readers alone)",
            "decode": "PIL, convert RGB",
            "format": a.format,
            "imagefolder": "DataLoader(shuffle=True, drop_last=True)",
        },
        "summary": summary,
        "ratio_webdataset_over_imagefolder": ratio,
        "ratio_of": best,
        "ratio_webdataset_over_stock_webdataset": ratio_stock,
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"saved {out}")
    return result


if __name__ == "__main__":
    main()
