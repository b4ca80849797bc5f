"""Reading a shard set's split in a stage driver: the storage check against the
manifest (missing, truncated or changed shards) and the report of any loss."""

from __future__ import annotations

import json

import mlflow

from cl_core.data.shards import ShardCheck, check_shards
from pipelines.console import console


def checked_split(shard_dir: str, manifest: dict, split: str, name: str | None = None) -> ShardCheck:
    """The split's shards as storage holds them. A missing shard, or one larger than the
    manifest records, is an error naming its URL; a truncated shard keeps its readable
    samples, and the loss is printed and logged to the stage's MLflow run
    (``data/<name>_lost_samples``, tag ``clpipe.data.<name>_truncated``; ``name``
    defaults to the split's)."""
    check = check_shards(shard_dir, manifest, split)
    name = name or split
    if check.truncated:
        expected = sum(t["expected_samples"] for t in check.truncated)
        first = check.truncated[0]["url"]
        console.print(
            f"[yellow]{split} split of {shard_dir}: {len(check.truncated)} truncated shard(s) ({first}"
            f"{' ...' if len(check.truncated) > 1 else ''}): {check.lost_samples} of their {expected} "
            "samples are lost, the readable ones are used; rerun the shard stage to restore them[/]"
        )
        if mlflow.active_run() is not None:
            mlflow.log_metric(f"data/{name}_lost_samples", check.lost_samples)
            mlflow.set_tag(f"clpipe.data.{name}_truncated", json.dumps(check.truncated)[:5000])
    return check
