"""The preflight of local paths on a cluster (pipelines.ray_env.preflight) without a
cluster: which locations are checked, and the refusal where no node can check them. The
check itself (a marker file looked for by a task on each node) runs on two nodes in
tests/pipelines/test_multinode.py (one filesystem: passes) and on two hosts in
tests/infra/test_twohost.py (a private work dir: refused; a shared one: passes)."""

from __future__ import annotations

import pytest

from pipelines import ray_env
from pipelines.config import ConfigError, load_config


def test_every_local_location_the_workers_use_is_listed(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(overrides=[f"work_dir={tmp_path}"])
    assert cfg.node_paths() == [
        ("data.output", str(tmp_path), True),
        ("ray.storage_path", str(tmp_path / "ray_results"), True),
        ("mlflow.tracking_uri", str(tmp_path), True),
        ("mlflow.artifact_location", str(tmp_path / "mlartifacts"), True),
    ]
    folder = tmp_path / "images"
    folder.mkdir()
    cfg = load_config(
        overrides=[
            f"work_dir={tmp_path}",
            f"data.source={{kind: image_folder, path: {folder}}}",
            "data.output=s3://b/data",
            "ray.storage_path=s3://b/ray",
            "mlflow.tracking_uri=http://mlflow:5000",
        ]
    )
    assert cfg.node_paths() == [("data.source.path", str(folder), False)]  # read by the shard tasks


def test_a_joined_cluster_with_no_cpu_yet_refuses_local_paths(tmp_path, monkeypatch):
    nodes = [{"NodeID": "head", "Alive": True, "Resources": {"memory": 1e9}}]  # a head with CPU: 0
    monkeypatch.setattr("ray.nodes", lambda: nodes)
    monkeypatch.setattr(ray_env, "_joined", True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError) as e:
        ray_env.preflight(load_config(overrides=[f"work_dir={tmp_path}"]))
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"data.output: {tmp_path} is a local path and no node")
    assert "set data.output: s3://BUCKET/prefix" in line and "ray.shared_fs: true" in line
    # everything in S3 and on a server: nothing to check
    ray_env.preflight(
        load_config(
            overrides=[
                f"work_dir={tmp_path}",
                "data.output=s3://b/d",
                "ray.storage_path=s3://b/r",
                "mlflow.tracking_uri=http://mlflow:5000",
            ]
        )
    )


def test_a_ray_of_this_process_on_one_node_is_not_checked(tmp_path, monkeypatch):
    monkeypatch.setattr("ray.nodes", lambda: [{"NodeID": "me", "Alive": True, "Resources": {"CPU": 2.0}}])
    monkeypatch.setattr(ray_env, "_joined", False)
    monkeypatch.setattr("ray.remote", lambda *a, **k: pytest.fail("no node check on one local node"))
    ray_env.preflight(load_config(overrides=[f"work_dir={tmp_path}"]))
