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


def _write_copy(samples: list[dict], path: Path) -> dict:
    """Write already-encoded samples (raw member bytes) to one shard, atomically."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with wds.TarWriter(tmp, mtime=S.SHARD_MTIME) as sink:
            for smp in samples:
                sink.write({k: v for k, v in smp.items() if k == "__key__" or not k.startswith("__")})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"name": path.name, "num_samples": len(samples), "sha256": S.sha256_file(path), "bytes": path.stat().st_size}


def labels(ctx: StageContext, cfg: LabelsConfig, inputs: dict) -> dict:
    shard_set = inputs["shard"]
    if not shard_set["labeled"]:
        raise ValueError("labels: the source has no labels, so there is nothing to fine-tune on; "
                         "use a labeled source (image_folder with class folders, npz with 'labels')")
    manifest = S.read_manifest(shard_set["shard_dir"])
    train = checked_split(shard_set["shard_dir"], manifest, "train")
    samples = list(tar_samples(({"url": u} for u in train.urls), verify=train.verify))  # raw bytes, in manifest order
    ys = [int(s["cls"]) for s in samples]
    ids = [json.loads(s["json"])["id"] for s in samples]
    missing = sorted(set(range(manifest["num_classes"])) - set(ys))
    if missing:
        names = [manifest["class_names"][c] for c in missing]
        raise ValueError(f"labels: class(es) {names} have no training samples, so no label subset can cover them; "
                         "add images of those classes or lower data.val_fraction/test_fraction")
    try:
        chosen = label_subsets(ys, cfg.fractions, seed=ctx.seed)
    except ValueError as e:
        raise ValueError(f"labels.fractions: {e}") from None
    out = ctx.output_dir
    record: dict = {"seed": ctx.seed, "num_train": len(samples), "subsets": {}}
    outputs: dict = {"subsets": {}, "num_classes": manifest["num_classes"]}
    for f, idx in chosen.items():
        name = fraction_name(f)
        d = out / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        ranges = S.plan_shards(len(idx), manifest["config"]["samples_per_shard"], manifest["config"]["min_shards"])
        results = [_write_copy([samples[i] for i in idx[a:b]], d / f"train-{j:06d}.tar") for j, (a, b) in enumerate(ranges)]
        counts = Counter(ys[i] for i in idx)
        sub_manifest = {
            "format": "clpipe-label-subset/1", "fraction": f, "seed": ctx.seed, "num_samples": len(idx),
            "num_classes": manifest["num_classes"], "class_names": manifest["class_names"], "labeled": True,
            "parent_manifest_sha256": shard_set["manifest_sha256"],
            "splits": {"train": {"num_samples": len(idx), "class_counts": {str(c): counts[c] for c in sorted(counts)},
                                 "shards": results}},
        }
        S.write_manifest(d, sub_manifest)
        where = str(d)
        if shard_set.get("output_root"):  # S3: beside the shard sets, shards first, manifest last
            where = S.publish(d, storage.join(shard_set["output_root"], ctx.name, ctx.key[:16], name))
            shutil.rmtree(d)  # S3 holds the set now
        record["subsets"][name] = {"fraction": f, "num_samples": len(idx), "ids": [ids[i] for i in idx],
                                   "class_counts": sub_manifest["splits"]["train"]["class_counts"]}
        outputs["subsets"][name] = {"fraction": f, "shard_dir": where, "num_samples": len(idx),
                                    "min_per_class": min(counts.values())}
        mlflow.log_metrics({f"{name}/num_labels": len(idx), f"{name}/min_per_class": min(counts.values())})
        console.print(f"labels: {f:g} of {len(samples)} training images -> {len(idx)} labels "
                      f"({min(counts.values())}-{max(counts.values())} per class)")
    (out / IDS_FILE).write_text(json.dumps(record, indent=1))
    mlflow.log_artifact(str(out / IDS_FILE))
    outputs["ids_path"] = str(out / IDS_FILE)
    return outputs
