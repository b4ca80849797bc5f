"""Checkpoint integrity and the report of truncated shards (no Ray needed)."""

import json

import mlflow
import pytest
import torch

from cl_core.data import shards as S
from cl_core.data.sources import npz_source
from pipelines.stages._data import checked_split
from pipelines.stages._train import (
    CHECKPOINT_INFO,
    CheckpointError,
    verify_checkpoint,
    write_checkpoint_dir,
)
from tests.test_shards import write_set


def _checkpoint(root):
    def write(d):
        torch.save({"step": 7, "w": torch.arange(1000.0)}, d / "state.pt")
        (d / "models").mkdir()
        torch.save({"w": torch.ones(3)}, d / "models" / "teacher.pt")

    write_checkpoint_dir(root, write, "epoch 2, batch 3 of 20 (step 23)")


def test_a_whole_checkpoint_verifies_and_records_its_position(tmp_path):
    _checkpoint(tmp_path)
    info = verify_checkpoint(tmp_path, "s3://b/run/checkpoint_1")
    assert info["position"] == "epoch 2, batch 3 of 20 (step 23)"
    assert set(info["files"]) == {"state.pt", "models/teacher.pt"}


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "state.pt").write_bytes((d / "state.pt").read_bytes()[:100]),
     "checkpoint file state.pt does not match its recorded sha256"),
    (lambda d: (d / "models" / "teacher.pt").unlink(), "checkpoint file models/teacher.pt is missing"),
    (lambda d: (d / CHECKPOINT_INFO).unlink(), "checkpoint has no checkpoint.json, so it may be incomplete"),
])
def test_a_damaged_or_incomplete_checkpoint_is_refused_naming_it(tmp_path, damage, message):
    _checkpoint(tmp_path)
    damage(tmp_path)
    with pytest.raises(CheckpointError) as e:
        verify_checkpoint(tmp_path, "/runs/pretrain-abc/checkpoint_2026")
    assert str(e.value).startswith(f"/runs/pretrain-abc/checkpoint_2026: {message}")
    assert "clpipe run --rerun" in str(e.value) and "\n" not in str(e.value)


def test_a_truncated_shard_is_reported_in_the_console_and_mlflow(npz_file, tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    manifest = write_set(npz_source(npz_file), out, per_shard=6, min_shards=3)
    first = manifest["splits"]["train"]["shards"][0]
    path = out / first["name"]
    path.write_bytes(path.read_bytes()[: first["bytes"] // 2])
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        with mlflow.start_run() as run:
            check = checked_split(str(out), manifest, "train")
    finally:
        mlflow.set_tracking_uri(None)
    assert 0 < check.lost_samples < first["num_samples"]
    assert sum(check.counts) == manifest["splits"]["train"]["num_samples"] - check.lost_samples
    text = capsys.readouterr().out
    assert f"1 truncated shard(s) ({path})" in text and f"{check.lost_samples} of their {first['num_samples']}" in text
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = client.get_run(run.info.run_id).data
    assert logged.metrics["data/train_lost_samples"] == check.lost_samples
    assert json.loads(logged.tags["clpipe.data.train_truncated"])[0]["url"] == str(path)


def test_a_missing_shard_stops_the_stage_naming_its_url(npz_file, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    manifest = write_set(npz_source(npz_file), out, per_shard=6, min_shards=3)
    (out / manifest["splits"]["val"]["shards"][0]["name"]).unlink()
    with pytest.raises(S.ShardError, match="is missing from storage; rerun the shard stage"):
        checked_split(str(out), manifest, "val")
