"""Writing WebDataset tar shards and their manifest.

Layout of a shard set (one directory)::

    train-000000.tar ... val-000000.tar ... test-000000.tar ...
    manifest.json        written last: its presence means the set is complete

A shard set lives in a local directory or under an ``s3://`` prefix (see ``storage``).

Each sample is ``KEY.png`` (or ``KEY.jpg``), ``KEY.cls`` (class index, when labeled) and
``KEY.json`` (``{"id": source id, "index": position in the source}``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import webdataset as wds

from cl_core.data import storage
from cl_core.data.sources import SampleRef, Source

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
MAX_LISTED_CORRUPT = 100
SHARD_MTIME = 946684800  # 2000-01-01T00:00:00Z, the mtime of every tar member


def split_refs(
    refs: Sequence[SampleRef], *, val_fraction: float, test_fraction: float, seed: int, stratified: bool
) -> dict[str, list[SampleRef]]:
    """Deterministic train/val/test split; stratified by label when labeled (every class
    keeps its share in each split, rounding per class)."""
    rng = np.random.default_rng(seed)
    groups: dict[int, list[SampleRef]] = {}
    for r in refs:
        groups.setdefault(r.label if stratified else -1, []).append(r)
    out: dict[str, list[SampleRef]] = {s: [] for s in SPLITS}
    for label in sorted(groups):
        g = groups[label]
        perm = rng.permutation(len(g))
        n_test = int(round(test_fraction * len(g)))
        n_val = int(round(val_fraction * len(g)))
        out["test"] += [g[i] for i in perm[:n_test]]
        out["val"] += [g[i] for i in perm[n_test : n_test + n_val]]
        out["train"] += [g[i] for i in perm[n_test + n_val :]]
    for s in SPLITS:  # interleave classes so every shard holds a mix
        order = rng.permutation(len(out[s]))
        out[s] = [out[s][i] for i in order]
    return out


def plan_shards(n: int, samples_per_shard: int, min_shards: int) -> list[tuple[int, int]]:
    """Near-equal [start, stop) ranges: ceil(n / samples_per_shard) shards, at least
    ``min_shards`` (so that every reader slot gets a shard), never an empty one."""
    if n == 0:
        return []
    k = min(n, max(min_shards, -(-n // samples_per_shard)))
    bounds = np.linspace(0, n, k + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shard(source: Source, refs: Sequence[SampleRef], path: str | Path) -> dict:
    """Encode ``refs`` into one tar shard at ``path`` (written to a temp name, then
    renamed). Undecodable images are skipped and returned in ``corrupt``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    corrupt: list[dict] = []
    classes: Counter[int] = Counter()
    count = 0
    try:
        # a fixed integer mtime: plain ustar headers (no pax record per member) and
        # byte-identical shards, hence equal sha256s, for equal inputs
        with wds.TarWriter(tmp, mtime=SHARD_MTIME) as sink:
            for r in refs:
                try:
                    data, ext = source.encode(r)
                except Exception as e:  # noqa: BLE001 - any decode failure is a corrupt sample
                    corrupt.append({"id": r.id, "error": str(e)[:200]})
                    continue
                sample: dict[str, object] = {"__key__": f"s{r.index:09d}", ext: data, "json": {"id": r.id, "index": r.index}}
                if r.label >= 0:
                    sample["cls"] = r.label
                    classes[r.label] += 1
                sink.write(sample)
                count += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {
        "name": path.name,
        "num_samples": count,
        "sha256": sha256_file(path),
        "class_counts": {str(k): v for k, v in sorted(classes.items())},
        "corrupt": corrupt,
    }


def build_manifest(
    *,
    source: Source,
    split_sizes: dict[str, int],
    shard_results: dict[str, list[dict]],
    seed: int,
    config: dict,
) -> dict:
    """Assemble the manifest from the per-shard results of :func:`write_shard`."""
    corrupt = [c for s in SPLITS for r in shard_results.get(s, []) for c in r["corrupt"]]
    splits = {}
    for s in SPLITS:
        results = shard_results.get(s, [])
        classes: Counter[str] = Counter()
        for r in results:
            classes.update(r["class_counts"])
        splits[s] = {
            "num_samples": sum(r["num_samples"] for r in results),
            "class_counts": dict(sorted(classes.items(), key=lambda kv: int(kv[0]))),
            "shards": [{k: r[k] for k in ("name", "num_samples", "sha256")} for r in results],
        }
    return {
        "format": "clpipe-shards/1",
        "source": source.describe(),
        "labeled": source.labeled,
        "num_classes": len(source.class_names),
        "class_names": source.class_names,
        "num_samples": sum(splits[s]["num_samples"] for s in SPLITS),
        "num_source_samples": sum(split_sizes.values()),
        "num_corrupt": len(corrupt),
        "corrupt": corrupt[:MAX_LISTED_CORRUPT],
        "seed": seed,
        "splits": splits,
        "config": config,
    }


def write_manifest(directory: str | Path, manifest: dict) -> str:
    """Write ``manifest.json`` atomically (a local rename, or one S3 PUT); call it after
    every shard is in place. Returns its location."""
    data = json.dumps(manifest, indent=2).encode()
    where = storage.join(directory, MANIFEST)
    storage.write_bytes(where, data)
    return where


def read_manifest(directory: str | Path) -> dict:
    """The manifest of the shard set at ``directory`` (a local path or ``s3://`` URI)."""
    path = storage.join(directory, MANIFEST)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: no manifest; the shard set is missing or incomplete, rerun the shard stage")
    return json.loads(storage.read_bytes(path))


def publish(local: str | Path, dest: str) -> str:
    """Upload the shard set written at ``local`` to ``dest`` (``s3://...``): every shard
    first, the manifest last, so a set with a manifest is complete. Returns ``dest``."""
    manifest = Path(local) / MANIFEST
    for f in sorted(Path(local).rglob("*")):
        if f.is_file() and f != manifest and not f.name.startswith("."):
            storage.upload_file(f, storage.join(dest, f.relative_to(local).as_posix()))
    storage.upload_file(manifest, storage.join(dest, MANIFEST))
    return dest


def shard_urls(directory: str | Path, manifest: dict, split: str) -> tuple[list[str], list[int]]:
    """Absolute paths and sample counts of a split's shards."""
    shards = manifest["splits"][split]["shards"]
    return [storage.join(directory, s["name"]) for s in shards], [s["num_samples"] for s in shards]
