"""The default pipeline end to end on a local Ray (2 CPUs) with a tiny budget."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines import tracking
from pipelines.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from pipelines import ray_env
    from pipelines.config import RayConfig

    ray_env.init(RayConfig(num_cpus=2))
    yield
    ray.shutdown()


def _runs(client: MlflowClient, exp_id: str, parent: str):
    return client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


def test_default_pipeline_logs_everything_and_reruns_from_cache(local_ray, tmp_path, capsys):
    work = tmp_path / "work"
    args = ["run", "--work-dir", str(work), "--set", "pretrain.epochs=2", "--set", "pretrain.batch_size_per_worker=32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "kNN top-1" in out and "linear probe top-1" in out and "mlflow ui --backend-store-uri sqlite:///" in out

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("clpipe")
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TAG_KIND}` = 'pipeline'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.params["pretrain.temperature"] == "0.5" and parent.data.params["pretrain.epochs"] == "2"
    children = {r.data.tags[tracking.TAG_STAGE]: r for r in _runs(client, exp.experiment_id, parent.info.run_id)}
    assert set(children) == {"shard", "pretrain", "evaluate"}
    assert all(r.info.status == "FINISHED" and r.data.tags[tracking.TAG_CACHE_HIT] == "false" for r in children.values())

    shard = children["shard"]
    assert shard.data.metrics["num_samples"] == 1797 and shard.data.metrics["num_corrupt"] == 0
    assert "manifest.json" in {a.path for a in client.list_artifacts(shard.info.run_id)}

    pre = children["pretrain"]
    assert json.loads(pre.data.tags[tracking.TAG_UPSTREAM]) == {"shard": shard.info.run_id}
    assert pre.data.params["method"] == "simclr" and pre.data.params["views.image_size"] == "16"
    for key in ("train/loss", "train/lr", "val/knn_top1", "train/images_per_sec", "epoch/unique_samples"):
        history = client.get_metric_history(pre.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
    assert client.get_metric_history(pre.info.run_id, "epoch/unique_samples")[0].value == shard.data.metrics["train/num_samples"]
    artifacts = {a.path for a in client.list_artifacts(pre.info.run_id)}
    assert {"checkpoint", "curves.png"} <= artifacts
    assert {"checkpoint/state.pt", "checkpoint/config.json"} <= {a.path for a in client.list_artifacts(pre.info.run_id, "checkpoint")}
    outputs = tracking.load_outputs(pre.info.run_id)
    import mlflow.pytorch
    import torch

    encoder = mlflow.pytorch.load_model(outputs["model_uri"])
    assert encoder(torch.randn(2, 3, 16, 16)).shape == (2, outputs["feat_dim"])

    ev = children["evaluate"]
    for name in ("pretrained", "random_init"):
        for kind in ("knn_top1", "linear_top1"):
            assert 0.1 < ev.data.metrics[f"test/{name}/{kind}"] <= 1.0
    assert ev.data.metrics["test/num_samples"] == 269

    # the same command again: every stage served from the cache, nothing recomputed
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("cached, reusing run") == 3
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TAG_KIND}` = 'pipeline'",
                                 order_by=["attributes.start_time DESC"])
    assert len(parents) == 2
    again = {r.data.tags[tracking.TAG_STAGE]: r for r in _runs(client, exp.experiment_id, parents[0].info.run_id)}
    assert set(again) == {"shard", "pretrain", "evaluate"}
    for stage, r in again.items():
        assert r.data.tags[tracking.TAG_CACHE_HIT] == "true"
        assert r.data.tags[tracking.TAG_CACHED_FROM] == children[stage].info.run_id
    assert len(list(Path(work, "ray_results").iterdir())) == 1

    # a changed pretrain section reuses the shards but retrains
    assert main([*args, "--set", "pretrain.temperature=0.2"]) == 0
    out = capsys.readouterr().out
    assert "shard: cached" in out and "pretrain: cached" not in out


def test_pretrain_resumes_from_its_ray_checkpoint(local_ray, tmp_path, capfd):
    """A pretrain stage rerun under the same key (as after a killed driver) continues
    from the last Ray Train checkpoint instead of starting over."""
    import mlflow

    from pipelines.config import load_config
    from pipelines.graph import StageContext
    from pipelines.stages.pretrain import pretrain

    work = tmp_path / "work"
    args = ["run", "--work-dir", str(work), "--set", "pretrain.epochs=1", "--set", "pretrain.batch_size_per_worker=32"]
    assert main(args) == 0
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("clpipe")
    runs = {r.data.tags[tracking.TAG_STAGE]: r for r in client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{tracking.TAG_KIND}` = 'stage'")}
    key = runs["pretrain"].data.tags[tracking.TAG_KEY]
    shard_outputs = tracking.load_outputs(runs["shard"].info.run_id)

    cfg = load_config(overrides=[f"work_dir={work}", "pretrain.epochs=2", "pretrain.batch_size_per_worker=32"])
    capfd.readouterr()
    with mlflow.start_run(experiment_id=exp.experiment_id) as run:
        ctx = StageContext("pretrain", key, run.info.run_id, run.info.run_id, cfg, tmp_path / "out", {})
        ctx.output_dir.mkdir()
        out = pretrain(ctx, cfg.pretrain, {"shard": shard_outputs})
    assert "resumed from checkpoint at epoch 1" in capfd.readouterr().out
    assert out["final_metrics"]["epoch"] == 2.0
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2]


def test_a_source_with_no_decodable_image_fails_the_shard_stage_clearly(local_ray, tmp_path, capsys):
    folder = tmp_path / "broken"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        (folder / c / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    args = ["run", "--work-dir", str(tmp_path / "work"), "--set", f"data.source={{kind: image_folder, path: {folder}}}"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "stage shard failed" in err and "none of the 2 images" in err and "could be decoded" in err
