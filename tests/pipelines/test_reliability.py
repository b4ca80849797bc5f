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
    _failure_message,
    verify_checkpoint,
    write_checkpoint_dir,
)
from tests.cl_core.test_shards import write_set


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


@pytest.mark.parametrize(
    "damage,message",
    [
        (
            lambda d: (d / "state.pt").write_bytes((d / "state.pt").read_bytes()[:100]),
            "checkpoint file state.pt does not match its recorded sha256",
        ),
        (lambda d: (d / "models" / "teacher.pt").unlink(), "checkpoint file models/teacher.pt is missing"),
        (lambda d: (d / CHECKPOINT_INFO).unlink(), "checkpoint has no checkpoint.json, so it may be incomplete"),
    ],
)
def test_a_damaged_or_incomplete_checkpoint_is_refused_naming_it(tmp_path, damage, message):
    _checkpoint(tmp_path)
    damage(tmp_path)
    with pytest.raises(CheckpointError) as e:
        verify_checkpoint(tmp_path, "/runs/pretrain-abc/checkpoint_2026")
    assert str(e.value).startswith(f"/runs/pretrain-abc/checkpoint_2026: {message}")
    assert "clpipe run --rerun" in str(e.value) and "\n" not in str(e.value)


def test_a_failed_training_run_is_one_line_naming_the_cause_the_fix_and_the_checkpoint():
    """The message a training stage fails with (the fault test drives the restarted case
    through a real Ray; these are the others)."""
    from types import SimpleNamespace

    from ray.exceptions import RayError
    from ray.train.v2.api.exceptions import WorkerGroupError

    ctx = SimpleNamespace(name="distill")
    died = WorkerGroupError(
        "Training failed due to worker errors:\n[Rank 1]\nThe actor died unexpectedly",
        {
            1: RayError("The actor died unexpectedly before finishing this task."),
            0: RuntimeError("Connection reset by peer\nmore"),
        },
    )
    latest = ("/w/ray_results/distill-abc/checkpoint_2", "student_1pct: epoch 1, batch 6 of 24 (step 6)")
    assert _failure_message(ctx, SimpleNamespace(max_failures=0), died, latest) == (
        "distill: a training worker died (rank 0: RuntimeError: Connection reset by peer; rank 1: RayError: The actor "
        "died unexpectedly before finishing this task.); set distill.max_failures >= 1 to restart automatically; "
        "the last checkpoint is /w/ray_results/distill-abc/checkpoint_2 (student_1pct: epoch 1, batch 6 of 24 "
        "(step 6)); rerunning the same command resumes from it"
    )
    assert _failure_message(ctx, SimpleNamespace(max_failures=2), died, None).endswith(
        ") after 2 restart(s); no checkpoint was written yet; rerunning the same command starts the stage over"
    )
    msg = _failure_message(ctx, SimpleNamespace(max_failures=0), ValueError("x" * 300), None)
    assert msg.startswith("distill: training failed (ValueError: xxx") and " ...); no checkpoint" in msg
    assert "max_failures" not in msg and "\n" not in msg  # a bug is not fixed by restarting


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


@pytest.mark.slow
def test_one_percent_corrupt_images_are_counted_in_the_manifest_and_mlflow(tmp_path, capsys, local_ray):
    """A 300-image folder with 3 undecodable files: the shard stage skips and counts them,
    lists them in the manifest, logs ``num_corrupt`` to its MLflow run and names them. A
    second run with the same seed into another work dir writes the same shards and label
    subsets, byte for byte."""
    import numpy as np
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from pipelines import tracking
    from pipelines.cli import main
    from tests.conftest import make_images

    x, y = make_images(300)
    root = tmp_path / "folder"
    for i, (img, c) in enumerate(zip(x, y, strict=True)):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(img)).save(root / f"c{c}" / f"{i:03d}.png")
    bad = [root / "c0" / "000.png", root / "c1" / "001.png", root / "c2" / "002.png"]
    for b in bad:
        b.write_bytes(b.read_bytes()[:50])  # cut inside the image data
    work = tmp_path / "work"
    args = ["run", "--set", f"data.source={{kind: image_folder, path: {root}}}", "--until", "labels"]
    assert main([*args, "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "undecodable" in ln)
    assert "shard: skipped 3 undecodable image(s): " in line and all(f"c{i}/00{i}.png" in line for i in range(3))
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("clpipe").experiment_id
    run = client.search_runs([exp], filter_string=f"tags.`{tracking.TAG_STAGE}` = 'shard'")[0]
    assert run.data.metrics["num_corrupt"] == 3 and run.data.metrics["num_samples"] == 297
    shard_dir = next((work / "shard").iterdir())
    manifest = S.read_manifest(shard_dir)
    assert manifest["num_corrupt"] == 3 and sorted(c["id"] for c in manifest["corrupt"]) == [
        "c0/000.png",
        "c1/001.png",
        "c2/002.png",
    ]
    # the same seed, another work dir: the same shards (checksums, order) and the same label subsets
    again = tmp_path / "again"
    assert main([*args, "--work-dir", str(again)]) == 0
    other = S.read_manifest(next((again / "shard").iterdir()))
    for split in ("train", "val", "test"):
        assert other["splits"][split]["shards"] == manifest["splits"][split]["shards"]
    subsets = [sorted(p.parent for p in (w / "labels").glob("*/*/manifest.json")) for w in (work, again)]
    assert len(subsets[0]) == len(subsets[1]) >= 1, subsets
    for a, b in zip(*subsets, strict=True):
        assert S.read_manifest(a)["splits"]["train"]["shards"] == S.read_manifest(b)["splits"]["train"]["shards"]
