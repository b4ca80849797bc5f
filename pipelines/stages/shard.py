"""shard: source images -> WebDataset tar shards + manifest (ShardSet)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlflow
import ray

from cl_core.data import shards as S
from cl_core.data import storage
from cl_core.data.sources import Source, SourceError, SourceReadError, open_source
from cl_core.data.text import write_text_shards
from pipelines.config import DataConfig
from pipelines.console import console
from pipelines.graph import StageContext


@ray.remote(num_cpus=1)
def _write_shard_task(source: Source, refs: list, path: str, dest: str | None) -> dict:
    """Write one shard at ``path``; with ``dest`` (an ``s3://`` URI) upload it there and
    drop the local file (the task may run on any node)."""
    if dest is None:
        return S.write_shard(source, refs, path)
    with tempfile.TemporaryDirectory() as d:
        result = S.write_shard(source, refs, Path(d) / Path(path).name)
        storage.upload_file(Path(d) / Path(path).name, dest)
    return result


def _gather(refs: list) -> list:
    """The shard tasks' results. A source file that could not be read fails the stage with
    its own one line (not the remote traceback); nothing is skipped or cached."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, SourceReadError):
            raise e.cause from None
        raise


def plan_splits(source: Source, refs: list, cfg: DataConfig, seed: int) -> dict[str, list]:
    """train/val/test: a random stratified split, except that a source with an official
    test set (IDX's t10k files) keeps exactly that set as the test split; val is then
    ``val_fraction`` of the rest and ``test_fraction`` is not used."""
    test = source.official_test()

    def cut(items: list, n: int | None) -> list:
        return items if n is None else S.subsample_refs(items, n, seed=seed, stratified=source.labeled)

    if test is None:
        splits = S.split_refs(cut(refs, cfg.max_samples), val_fraction=cfg.val_fraction,
                              test_fraction=cfg.test_fraction, seed=seed, stratified=source.labeled)
        splits["test"] = cut(splits["test"], cfg.max_test_samples)
        return splits
    splits = S.split_refs(cut([r for r in refs if r.index not in test], cfg.max_samples), val_fraction=cfg.val_fraction,
                          test_fraction=0.0, seed=seed, stratified=source.labeled)
    official = [r for r in refs if r.index in test]
    splits["test"] = cut(official, cfg.max_test_samples)
    console.print(f"shard: the test split is the source's official test set ({len(splits['test'])} of its "
                  f"{len(official)} images); data.test_fraction is not used")
    return splits


def destination(ctx: StageContext, root: str | None) -> str | None:
    """Where the stage's shard set goes when ``root`` (``data.output``) is ``s3://``:
    ``<root>/<stage>/<key>``; None: the stage's local output dir."""
    if root is None or not storage.is_s3(root):
        return None
    return storage.join(root, ctx.name, ctx.key[:16])


def shard(ctx: StageContext, cfg: DataConfig, inputs: dict) -> dict:
    """Write the train/val/test shards in parallel Ray tasks, then the manifest."""
    if cfg.source.kind == "text":
        return _text_shards(ctx, cfg)
    source = open_source(cfg.source.model_dump(mode="json", exclude_none=True))
    refs = source.refs()
    if not refs:
        raise SourceError(f"data.source: {source.describe()} holds no images; point data.source.path at a folder or .npz with images")
    splits = plan_splits(source, refs, cfg, ctx.seed)
    out = ctx.output_dir
    dest = destination(ctx, cfg.output)
    where: str = dest or str(out)
    if dest is not None:
        storage.check_bucket(dest)
    if dest is not None and ctx.rerun:
        # --rerun shard (the fix printed for a damaged set): delete the set, manifest included, and write
        # it again, instead of finding its manifest and reusing it
        storage.delete_prefix(dest)
    if storage.exists(storage.join(where, S.MANIFEST)):  # a complete set from an earlier, unrecorded run
        manifest = S.read_manifest(where)
        if dest is not None:
            S.write_manifest(out, manifest)  # the local copy that is logged
    else:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        src_ref = ray.put(source)
        pending: dict[str, list] = {}
        for split, items in splits.items():
            ranges = S.plan_shards(len(items), cfg.samples_per_shard, cfg.min_shards)
            pending[split] = [
                _write_shard_task.remote(src_ref, items[a:b], str(out / f"{split}-{i:06d}.tar"),
                                         storage.join(dest, f"{split}-{i:06d}.tar") if dest else None)
                for i, (a, b) in enumerate(ranges)
            ]
        n_tasks = sum(len(v) for v in pending.values())
        console.print(f"shard: {len(refs)} source images -> {n_tasks} shards in parallel Ray tasks"
                      f"{f', uploaded to {dest}' if dest else ''}")
        results = {split: _gather(refs_) for split, refs_ in pending.items()}
        manifest = S.build_manifest(
            source=source, split_sizes={k: len(v) for k, v in splits.items()}, shard_results=results,
            seed=ctx.seed, config=cfg.model_dump(mode="json"),
        )
        if manifest["num_samples"] == 0:
            raise SourceError(f"data.source: none of the {len(refs)} images in {source.describe()} could be decoded "
                              f"(first error: {manifest['corrupt'][0]['error'] if manifest['corrupt'] else 'n/a'})")
        if manifest["splits"]["train"]["num_samples"] == 0:
            raise SourceError("data: the train split is empty; lower data.val_fraction / data.test_fraction")
        S.write_manifest(out, manifest)  # a local copy, logged to MLflow
        if dest is not None:
            S.write_manifest(dest, manifest)  # after every shard: the set is complete
    if manifest["num_corrupt"]:
        first = ", ".join(c["id"] for c in manifest["corrupt"][:5])
        console.print(f"[yellow]shard: skipped {manifest['num_corrupt']} undecodable image(s): {first}"
                      f"{' ...' if manifest['num_corrupt'] > 5 else ''} (listed in manifest.json)[/]")
    return {**_report(out, manifest, where), "output_root": dest and cfg.output}


def _text_shards(ctx: StageContext, cfg: DataConfig) -> dict:
    """Text sources: ``KEY.txt`` shards and a byte-level BPE tokenizer trained on the train split."""
    if cfg.output and storage.is_s3(cfg.output):
        raise ValueError("data.output: text shard sets are written to the work dir only; remove data.output or use an "
                         "image source")
    out = ctx.output_dir
    if (out / S.MANIFEST).exists():
        manifest = S.read_manifest(out)
    else:
        shutil.rmtree(out, ignore_errors=True)
        console.print(f"shard: text source {cfg.source.path} -> shards and a {cfg.tokenizer_vocab_size}-token BPE tokenizer")
        manifest = write_text_shards(str(cfg.source.path), out, val_fraction=cfg.val_fraction,
                                     test_fraction=cfg.test_fraction, samples_per_shard=cfg.samples_per_shard,
                                     min_shards=cfg.min_shards, seed=ctx.seed,
                                     tokenizer_vocab_size=cfg.tokenizer_vocab_size, config=cfg.model_dump(mode="json"))
    if manifest["num_corrupt"]:
        first = ", ".join(c["id"] for c in manifest["corrupt"][:5])
        console.print(f"[yellow]shard: skipped {manifest['num_corrupt']} bad line(s): {first} (listed in manifest.json)[/]")
    mlflow.log_artifact(str(out / manifest["tokenizer"]))
    mlflow.log_metric("tokenizer_vocab_size", manifest["tokenizer_vocab_size"])
    return _report(out, manifest)


def _report(out: Path, manifest: dict, where: str | None = None) -> dict:
    """Log the manifest and counts; the outputs point at ``where`` (default ``out``)."""
    where = where or str(out)
    mlflow.log_artifact(str(out / S.MANIFEST))
    metrics = {f"{s}/num_samples": manifest["splits"][s]["num_samples"] for s in S.SPLITS}
    metrics |= {f"{s}/num_shards": len(manifest["splits"][s]["shards"]) for s in S.SPLITS}
    metrics |= {"num_samples": manifest["num_samples"], "num_corrupt": manifest["num_corrupt"],
                "num_classes": manifest["num_classes"]}
    mlflow.log_metrics(metrics)
    console.print("shard: " + ", ".join(f"{s} {manifest['splits'][s]['num_samples']}" for s in S.SPLITS)
                  + f" samples; {manifest['num_corrupt']} corrupt; at {where}")
    return {
        "shard_dir": where,
        "manifest_path": storage.join(where, S.MANIFEST),
        "manifest_sha256": S.sha256_file(out / S.MANIFEST),
        "num_classes": manifest["num_classes"],
        "labeled": manifest["labeled"],
        "counts": {s: manifest["splits"][s]["num_samples"] for s in S.SPLITS},
        "num_corrupt": manifest["num_corrupt"],
        "modality": manifest.get("modality", "image"),
    }
