"""labels: the few labels of semi-supervised learning (ShardSet -> LabelSubsets).

Per label fraction, a stratified subset of the *training* split (deterministic per
seed, nested: 1% inside 10%), written as its own small shard set so the fine-tune and
distill stages stream it like any other split. The chosen sample ids are an MLflow
artifact (``label_subsets.json``); val and test samples are never candidates.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import mlflow
import webdataset as wds

from cl_core.data import shards as S
from cl_core.data import storage
from cl_core.data.subsets import fraction_name, label_subsets
from cl_core.data.tario import tar_samples
from pipelines.config import LabelsConfig
from pipelines.console import console
from pipelines.graph import StageContext
from pipelines.stages._data import checked_split

IDS_FILE = "label_subsets.json"


class _SubsetWriter:
    """Writes one label subset's shards while the training split streams past: the
    already-encoded samples (raw member bytes) of the ``ranges`` of its sorted indices,
    each shard written to a temporary name and renamed when complete. Holds one open
    shard, never the samples."""

    def __init__(self, directory: Path, ranges: list[tuple[int, int]]):
        self.directory, self.ranges = directory, ranges
        self.count = 0  # samples written
        self.shard = 0  # index of the open (or next) shard
        self.results: list[dict] = []
        self._sink: wds.TarWriter | None = None
        self._tmp = ""

    def _path(self) -> Path:
        return self.directory / f"train-{self.shard:06d}.tar"

    def add(self, sample: dict) -> None:
        if self._sink is None:
            fd, self._tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{self._path().name}.", suffix=".tmp")
            os.close(fd)
            self._sink = wds.TarWriter(self._tmp, mtime=S.SHARD_MTIME)
        self._sink.write({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")})
        self.count += 1
        if self.count == self.ranges[self.shard][1]:
            self._sink.close()
            self._sink = None
            path = self._path()
            os.replace(self._tmp, path)
            a, b = self.ranges[self.shard]
            self.results.append(
                {"name": path.name, "num_samples": b - a, "sha256": S.sha256_file(path), "bytes": path.stat().st_size}
            )
            self.shard += 1

    def abort(self) -> None:
        if self._sink is not None:
            self._sink.close()
            Path(self._tmp).unlink(missing_ok=True)
            self._sink = None


def _train_samples(train):
    """The training split's samples as raw member bytes, in manifest order."""
    return tar_samples(({"url": u} for u in train.urls), verify=train.verify)


def labels(ctx: StageContext, cfg: LabelsConfig, inputs: dict) -> dict:
    shard_set = inputs["shard"]
    if not shard_set["labeled"]:
        raise ValueError(
            "labels: the source has no labels, so there is nothing to fine-tune on; "
            "use a labeled source (image_folder with class folders, npz with 'labels')"
        )
    manifest = S.read_manifest(shard_set["shard_dir"])
    train = checked_split(shard_set["shard_dir"], manifest, "train")
    # two passes over the split, so that no image is held: its labels and ids, then the
    # chosen samples straight into their subsets' shards
    ys: list[int] = []
    ids: list[str] = []
    for smp in _train_samples(train):
        ys.append(int(smp["cls"]))
        ids.append(json.loads(smp["json"])["id"])
    missing = sorted(set(range(manifest["num_classes"])) - set(ys))
    if missing:
        names = [manifest["class_names"][c] for c in missing]
        raise ValueError(
            f"labels: class(es) {names} have no training samples, so no label subset can cover them; "
            "add images of those classes or lower data.val_fraction/test_fraction"
        )
    try:
        chosen = label_subsets(ys, cfg.fractions, seed=ctx.seed)
    except ValueError as e:
        raise ValueError(f"labels.fractions: {e}") from None
    out = ctx.output_dir
    record: dict = {"seed": ctx.seed, "num_train": len(ys), "subsets": {}}
    outputs: dict = {"subsets": {}, "num_classes": manifest["num_classes"]}
    writers: dict[float, _SubsetWriter] = {}
    for f, idx in chosen.items():
        d = out / fraction_name(f)
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        ranges = S.plan_shards(len(idx), manifest["config"]["samples_per_shard"], manifest["config"]["min_shards"])
        writers[f] = _SubsetWriter(d, ranges)
    members = {f: set(idx) for f, idx in chosen.items()}
    try:
        for i, smp in enumerate(_train_samples(train)):
            for f, writer in writers.items():
                if i in members[f]:
                    writer.add(smp)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for f, idx in chosen.items():
        name = fraction_name(f)
        d = out / name
        results = writers[f].results
        if writers[f].count != len(idx) or len(results) != len(writers[f].ranges):
            raise RuntimeError(
                f"labels: the second read of the training split gave {writers[f].count} of the "
                f"{len(idx)} samples of the {name} subset; the shards changed while the stage ran"
            )
        counts = Counter(ys[i] for i in idx)
        sub_manifest = {
            "format": "clpipe-label-subset/1",
            "fraction": f,
            "seed": ctx.seed,
            "num_samples": len(idx),
            "num_classes": manifest["num_classes"],
            "class_names": manifest["class_names"],
            "labeled": True,
            "parent_manifest_sha256": shard_set["manifest_sha256"],
            "splits": {
                "train": {
                    "num_samples": len(idx),
                    "class_counts": {str(c): counts[c] for c in sorted(counts)},
                    "shards": results,
                }
            },
        }
        S.write_manifest(d, sub_manifest)
        where = str(d)
        if shard_set.get("output_root"):  # S3: beside the shard sets, shards first, manifest last
            where = S.publish(d, storage.join(shard_set["output_root"], ctx.name, ctx.key[:16], name))
            shutil.rmtree(d)  # S3 holds the set now
        record["subsets"][name] = {
            "fraction": f,
            "num_samples": len(idx),
            "ids": [ids[i] for i in idx],
            "class_counts": sub_manifest["splits"]["train"]["class_counts"],
        }
        outputs["subsets"][name] = {
            "fraction": f,
            "shard_dir": where,
            "num_samples": len(idx),
            "min_per_class": min(counts.values()),
        }
        mlflow.log_metrics({f"{name}/num_labels": len(idx), f"{name}/min_per_class": min(counts.values())})
        console.print(
            f"labels: {f:g} of {len(ys)} training images -> {len(idx)} labels "
            f"({min(counts.values())}-{max(counts.values())} per class)"
        )
    (out / IDS_FILE).write_text(json.dumps(record, indent=1))
    mlflow.log_artifact(str(out / IDS_FILE))
    outputs["ids_path"] = str(out / IDS_FILE)
    return outputs
