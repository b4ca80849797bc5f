"""shard: source images -> WebDataset tar shards + manifest (ShardSet)."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import ray
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cl_core.data import shards as S
from cl_core.data import storage
from cl_core.data.sources import Source, SourceError, SourceReadError, open_source
from cl_core.data.text import write_text_shards
from pipelines.config import DataConfig
from pipelines.console import console
from pipelines.graph import StageContext


@ray.remote(num_cpus=1)
def _write_shard_task(source: Source, refs: list, path: str, dest: str | None) -> tuple[dict, str]:
    """Write one shard at ``path``; with ``dest`` (an ``s3://`` URI) upload it there and
    drop the local file (the task may run on any node). Returns the shard's record and
    the id of the node that wrote it."""
    node = ray.get_runtime_context().get_node_id()
    try:
        if dest is None:
            return S.write_shard(source, refs, path), node
        with tempfile.TemporaryDirectory() as d:
            result = S.write_shard(source, refs, Path(d) / Path(path).name)
            storage.upload_file(Path(d) / Path(path).name, dest)
        return result, node
    finally:  # a worker runs many shard tasks: none keeps the pages of a mapped source it touched
        source.release()


def _gather(pending: dict[str, list], total: int) -> tuple[dict[str, list], dict[str, Any]]:
    """The shard tasks' results per split, in order, collected as they finish with a
    progress display (a bar on a terminal, a line every 10% or 30 s otherwise), and the
    rate: images/s and MB/s of shards written. A source file that could not be read fails
    the stage with its own one line (not the remote traceback); nothing is skipped or
    cached."""
    where = {ref: (split, i) for split, refs in pending.items() for i, ref in enumerate(refs)}
    results: dict[str, list] = {split: [None] * len(refs) for split, refs in pending.items()}
    waiting = list(where)
    done_images = done_bytes = 0
    nodes: dict[str, int] = {}  # node id -> shards written there
    t0 = time.perf_counter()
    last_line, last_tenth = t0, 0
    bar = (
        Progress(
            TextColumn("shard"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("images"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        if console.is_terminal
        else None
    )
    task = bar.add_task("shard", total=total) if bar else None
    with bar or contextlib.nullcontext():
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=1.0, fetch_local=True)
            for ref in ready:
                try:
                    r, node = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    if isinstance(e.cause, SourceReadError):
                        raise e.cause from None
                    raise
                split, i = where[ref]
                results[split][i] = r
                nodes[node] = nodes.get(node, 0) + 1
                done_images += r["num_samples"] + len(r["corrupt"])
                done_bytes += r["bytes"]
            now = time.perf_counter()
            if bar is not None and task is not None:
                bar.update(task, completed=done_images)
            elif ready and (done_images * 10 // max(1, total) > last_tenth or now - last_line >= 30):
                last_tenth, last_line = done_images * 10 // max(1, total), now
                console.print(
                    f"shard: {done_images}/{total} images ({done_images / (now - t0):.0f} images/s, "
                    f"{done_bytes / 1e6 / (now - t0):.1f} MB/s)"
                )
    seconds = time.perf_counter() - t0
    rate = {
        "images_per_sec": done_images / seconds,
        "mb_per_sec": done_bytes / 1e6 / seconds,
        "seconds": seconds,
        "bytes": done_bytes,
        "nodes": nodes,
    }
    return results, rate


def plan_splits(source: Source, refs: list, cfg: DataConfig, seed: int) -> dict[str, list]:
    """train/val/test: a random stratified split, except that a source with an official
    test set (IDX's t10k files) keeps exactly that set as the test split; val is then
    ``val_fraction`` of the rest and ``test_fraction`` is not used."""
    test = source.official_test()

    def cut(items: list, n: int | None) -> list:
        return items if n is None else S.subsample_refs(items, n, seed=seed, stratified=source.labeled)

    if test is None:
        splits = S.split_refs(
            cut(refs, cfg.max_samples),
            val_fraction=cfg.val_fraction,
            test_fraction=cfg.test_fraction,
            seed=seed,
            stratified=source.labeled,
        )
        splits["test"] = cut(splits["test"], cfg.max_test_samples)
        return splits
    splits = S.split_refs(
        cut([r for r in refs if r.index not in test], cfg.max_samples),
        val_fraction=cfg.val_fraction,
        test_fraction=0.0,
        seed=seed,
        stratified=source.labeled,
    )
    official = [r for r in refs if r.index in test]
    splits["test"] = cut(official, cfg.max_test_samples)
    console.print(
        f"shard: the test split is the source's official test set ({len(splits['test'])} of its "
        f"{len(official)} images); data.test_fraction is not used"
    )
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
        raise SourceError(
            f"data.source: {source.describe()} holds no images; point data.source.path at a folder or .npz with images"
        )
    splits = plan_splits(source, refs, cfg, ctx.seed)
    out = ctx.output_dir
    dest = destination(ctx, cfg.output)
    where: str = dest or str(out)
    if dest is not None:
        storage.check(dest)
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
        source.stage(out)  # e.g. a compressed .npz unpacked once where every node can map it
        src_ref = ray.put(source)
        pending: dict[str, list] = {}
        # SPREAD: the tasks go to every node of the cluster, not first to fill this one
        write = _write_shard_task.options(scheduling_strategy="SPREAD")
        for split, items in splits.items():
            ranges = S.plan_shards(len(items), cfg.samples_per_shard, cfg.min_shards)
            pending[split] = [
                write.remote(
                    src_ref,
                    items[a:b],
                    str(out / f"{split}-{i:06d}.tar"),
                    storage.join(dest, f"{split}-{i:06d}.tar") if dest else None,
                )
                for i, (a, b) in enumerate(ranges)
            ]
        n_tasks = sum(len(v) for v in pending.values())
        n_nodes = sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0))
        console.print(
            f"shard: {len(refs)} source images -> {n_tasks} shards in parallel Ray tasks on {n_nodes} "
            f"node(s){f', uploaded to {dest}' if dest else ''}"
        )
        total = sum(len(v) for v in splits.values())
        results, rate = _gather(pending, total)
        del src_ref
        for scratch in out.glob(".*.npy"):  # what source.stage unpacked
            scratch.unlink()
        console.print(
            f"shard: {total} images, {rate['bytes'] / 1e6:.1f} MB of shards in {rate['seconds']:.1f} s: "
            f"{rate['images_per_sec']:.0f} images/s, {rate['mb_per_sec']:.1f} MB/s"
        )
        mlflow.log_metrics(
            {
                "images_per_sec": rate["images_per_sec"],
                "mb_per_sec": rate["mb_per_sec"],
                "write_seconds": rate["seconds"],
            }
        )
        mlflow.set_tag("clpipe.shard.nodes", json.dumps(rate["nodes"], sort_keys=True))
        manifest = S.build_manifest(
            source=source,
            split_sizes={k: len(v) for k, v in splits.items()},
            shard_results=results,
            seed=ctx.seed,
            config=cfg.model_dump(mode="json"),
        )
        if manifest["num_samples"] == 0:
            raise SourceError(
                f"data.source: none of the {len(refs)} images in {source.describe()} could be decoded "
                f"(first error: {manifest['corrupt'][0]['error'] if manifest['corrupt'] else 'n/a'})"
            )
        if manifest["splits"]["train"]["num_samples"] == 0:
            raise SourceError("data: the train split is empty; lower data.val_fraction / data.test_fraction")
        S.write_manifest(out, manifest)  # a local copy, logged to MLflow
        if dest is not None:
            S.write_manifest(dest, manifest)  # after every shard: the set is complete
    if manifest["num_corrupt"]:
        first = ", ".join(c["id"] for c in manifest["corrupt"][:5])
        console.print(
            f"[yellow]shard: skipped {manifest['num_corrupt']} undecodable image(s): {first}"
            f"{' ...' if manifest['num_corrupt'] > 5 else ''} (listed in manifest.json)[/]"
        )
    return {**_report(out, manifest, where), "output_root": dest and cfg.output}


def _text_shards(ctx: StageContext, cfg: DataConfig) -> dict:
    """Text sources: ``KEY.txt`` shards and a byte-level BPE tokenizer trained on the train split."""
    if cfg.output and storage.is_s3(cfg.output):
        raise ValueError(
            "data.output: text shard sets are written to the work dir only; remove data.output or use an image source"
        )
    out = ctx.output_dir
    if (out / S.MANIFEST).exists():
        manifest = S.read_manifest(out)
    else:
        shutil.rmtree(out, ignore_errors=True)
        console.print(
            f"shard: text source {cfg.source.path} -> shards and a {cfg.tokenizer_vocab_size}-token BPE tokenizer"
        )
        manifest = write_text_shards(
            str(cfg.source.path),
            out,
            val_fraction=cfg.val_fraction,
            test_fraction=cfg.test_fraction,
            samples_per_shard=cfg.samples_per_shard,
            min_shards=cfg.min_shards,
            seed=ctx.seed,
            tokenizer_vocab_size=cfg.tokenizer_vocab_size,
            config=cfg.model_dump(mode="json"),
        )
    if manifest["num_corrupt"]:
        first = ", ".join(c["id"] for c in manifest["corrupt"][:5])
        console.print(
            f"[yellow]shard: skipped {manifest['num_corrupt']} bad line(s): {first} (listed in manifest.json)[/]"
        )
    mlflow.log_artifact(str(out / manifest["tokenizer"]))
    mlflow.log_metric("tokenizer_vocab_size", manifest["tokenizer_vocab_size"])
    return _report(out, manifest)


def _report(out: Path, manifest: dict, where: str | None = None) -> dict:
    """Log the manifest and counts; the outputs point at ``where`` (default ``out``)."""
    where = where or str(out)
    mlflow.log_artifact(str(out / S.MANIFEST))
    metrics = {f"{s}/num_samples": manifest["splits"][s]["num_samples"] for s in S.SPLITS}
    metrics |= {f"{s}/num_shards": len(manifest["splits"][s]["shards"]) for s in S.SPLITS}
    metrics |= {
        "num_samples": manifest["num_samples"],
        "num_corrupt": manifest["num_corrupt"],
        "num_classes": manifest["num_classes"],
    }
    mlflow.log_metrics(metrics)
    console.print(
        "shard: "
        + ", ".join(f"{s} {manifest['splits'][s]['num_samples']}" for s in S.SPLITS)
        + f" samples; {manifest['num_corrupt']} corrupt; at {where}"
    )
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
