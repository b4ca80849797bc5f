"""Writing WebDataset tar shards and their manifest.

Layout of a shard set (one directory)::

    train-000000.tar ... val-000000.tar ... test-000000.tar ...
    manifest.json        written last: its presence means the set is complete

A shard set lives in a local directory or under an ``s3://`` prefix (see ``storage``).

Each sample is ``KEY.png`` (or ``KEY.jpg``), ``KEY.cls`` (class index, when labeled) and
``KEY.json`` (``{"id": source id, "index": position in the source}``).

The manifest records each shard's ``name``, ``num_samples``, ``sha256`` and ``bytes``
(file size). Before reading a split, :func:`check_shards` compares the stored sizes with
the manifest: a missing shard is an error, a shorter one was cut short (its complete
samples are still read), a longer one was changed; equal sizes are checked against the
sha256 while the shards stream (``tario.tar_samples(..., verify=...)``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from cl_core.data import storage
from cl_core.data.sources import SampleRef, Source, UndecodableImage
from cl_core.data.tario import RERUN_HINT, ShardChecksumError, tar_samples

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
MAX_LISTED_CORRUPT = 100
SHARD_MTIME = 946684800  # 2000-01-01T00:00:00Z, the mtime of every tar member
SHARD_FIELDS = ("name", "num_samples", "sha256", "bytes")  # a shard's record in the manifest


class ShardError(FileNotFoundError):
    """A shard the manifest lists cannot be found in storage; the message names it."""


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


def subsample_refs(refs: Sequence[SampleRef], n: int, *, seed: int, stratified: bool) -> list[SampleRef]:
    """A deterministic random ``n`` of ``refs`` (all of them when there are no more),
    stratified by label when labeled: every class keeps its share, the remainders going to
    the classes with the largest fractional parts (ties to the lower label)."""
    if n >= len(refs):
        return list(refs)
    rng = np.random.default_rng(seed)
    groups: dict[int, list[SampleRef]] = {}
    for r in refs:
        groups.setdefault(r.label if stratified else -1, []).append(r)
    labels = sorted(groups)
    exact = {lab: n * len(groups[lab]) / len(refs) for lab in labels}
    take = {lab: int(exact[lab]) for lab in labels}
    for lab in sorted(labels, key=lambda lab: (-(exact[lab] - take[lab]), lab))[: n - sum(take.values())]:
        take[lab] += 1
    out = [groups[lab][i] for lab in labels for i in sorted(rng.permutation(len(groups[lab]))[: take[lab]])]
    return sorted(out, key=lambda r: r.index)


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
    renamed). Undecodable images are skipped and returned in ``corrupt``; any other error
    (a source file that cannot be read) fails the shard."""
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
            for r, encode in source.encoded(refs):
                try:
                    data, ext = encode()
                except UndecodableImage as e:  # only a decode failure is a corrupt sample; I/O errors fail the shard
                    corrupt.append({"id": r.id, "error": str(e)[:200]})
                    continue
                sample: dict[str, object] = {
                    "__key__": f"s{r.index:09d}",
                    ext: data,
                    "json": {"id": r.id, "index": r.index},
                }
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
        "bytes": path.stat().st_size,
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
            "shards": [{k: r[k] for k in SHARD_FIELDS if k in r} for r in results],
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


@dataclass
class ShardCheck:
    """The readable part of a split, from :func:`check_shards`.

    ``urls``/``counts``: the shards to read and how many samples each yields (a truncated
    shard counts its complete samples; one with none left is dropped). ``verify``: for
    ``tario.tar_samples(..., verify=...)``. ``truncated``: one record per shard cut short.
    ``lost_samples``: samples the manifest lists that the truncated shards no longer hold.
    """

    urls: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    verify: dict[str, dict[str, Any]] = field(default_factory=dict)
    truncated: list[dict[str, Any]] = field(default_factory=list)
    lost_samples: int = 0


def stored_sizes(directory: str | Path) -> dict[str, int]:
    """File name -> size in bytes of every file directly in ``directory`` (a local path or
    a storage URI), from one listing; empty when the directory does not exist."""
    return storage.sizes(directory)


def check_shards(directory: str | Path, manifest: dict, split: str) -> ShardCheck:
    """Compare a split's shards in storage with the manifest (one listing of ``directory``).

    Raises:
        ShardError: a listed shard is not in storage.
        ShardChecksumError: a shard is larger than the manifest records.
        tario.TarFormatError: a truncated shard is also corrupt before its cut.
    """
    where = storage.join(directory, MANIFEST)
    sizes = stored_sizes(directory)
    records = manifest["splits"][split]["shards"]
    missing = [storage.join(directory, r["name"]) for r in records if r["name"] not in sizes]
    if missing:
        more = f" ({len(missing) - 1} more of the {split} split's shards are missing too)" if len(missing) > 1 else ""
        raise ShardError(f"{missing[0]}: shard listed in {where} is missing from storage{more}; {RERUN_HINT}")
    out = ShardCheck()
    for r in records:
        url, size, expected = storage.join(directory, r["name"]), sizes[r["name"]], r.get("bytes")
        count = int(r["num_samples"])
        if expected is not None and size > expected:
            raise ShardChecksumError(
                f"{url}: {size} bytes where {where} records {expected}; the shard was changed "
                f"after it was written; {RERUN_HINT}"
            )
        if expected is not None and size < expected:
            out.verify[url] = {"sha256": r.get("sha256"), "truncated": True}
            readable = sum(1 for _ in tar_samples([{"url": url}], verify={url: out.verify[url]}))
            out.truncated.append(
                {
                    "url": url,
                    "expected_samples": count,
                    "readable_samples": readable,
                    "expected_bytes": expected,
                    "bytes": size,
                }
            )
            out.lost_samples += count - readable
            count = readable
        else:
            out.verify[url] = {"sha256": r.get("sha256"), "truncated": False}
        if count > 0:
            out.urls.append(url)
            out.counts.append(count)
    return out
