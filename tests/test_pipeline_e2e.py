"""The default pipeline (the SimCLRv2 chain) end to end on a local Ray (2 CPUs) with a tiny budget."""

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


TINY = ["--set", "sweep.enabled=false", "--set", "pretrain.epochs=2", "--set", "pretrain.batch_size_per_worker=32", "--set", "finetune.epochs=3",
        "--set", "distill.epochs=2", "--set", "labels.fractions=[0.01, 0.1]", "--set", "finetune.min_steps=0"]
STAGES = ["shard", "labels", "pretrain", "finetune", "distill", "evaluate", "register"]


def _latest_children(client: MlflowClient, exp_id: str) -> dict:
    parent = client.search_runs([exp_id], filter_string=f"tags.`{tracking.TAG_KIND}` = 'pipeline'",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    return {r.data.tags[tracking.TAG_STAGE]: r for r in _runs(client, exp_id, parent.info.run_id)}


def _recomputed(children: dict) -> set[str]:
    return {s for s, r in children.items() if r.data.tags[tracking.TAG_CACHE_HIT] == "false"}


def test_the_simclrv2_chain_logs_registers_and_caches(local_ray, tmp_path, capsys):
    import mlflow.artifacts
    import mlflow.pyfunc
    import numpy as np

    from cl_core.augment import EvalTransform
    from cl_core.data.reader import load_split
    from cl_core.models.saved import load_model

    work = tmp_path / "work"
    args = ["run", "--work-dir", str(work), *TINY]
    assert main(args) == 0
    out = capsys.readouterr().out
    for col in ("supervised", "teacher", "student", "encoder"):
        assert col in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("clpipe").experiment_id
    children = _latest_children(client, exp_id)
    assert set(children) == set(STAGES) and _recomputed(children) == set(STAGES)
    assert all(r.info.status == "FINISHED" for r in children.values())

    # lineage: upstream run ids and artifact URIs on every stage run
    fin = children["finetune"]
    up = json.loads(fin.data.tags[tracking.TAG_UPSTREAM])
    assert up == {s: children[s].info.run_id for s in ("shard", "pretrain", "labels")}
    uris = json.loads(fin.data.tags[tracking.TAG_UPSTREAM_URIS])
    assert uris["pretrain"] == children["pretrain"].info.artifact_uri

    shard = children["shard"]
    assert shard.data.metrics["num_samples"] == 1797 and shard.data.metrics["num_corrupt"] == 0
    pre = children["pretrain"]
    assert pre.data.params["method.head_layers"] == "3" and pre.data.params["method.temperature"] == "0.5"
    assert [m.step for m in client.get_metric_history(pre.info.run_id, "val/knn_top1")] == [1, 2]

    # label subsets: the ids are an artifact; 1% of 1,259 = 13 labels, 10% = 126, every class covered
    ids = mlflow.artifacts.load_dict(f"runs:/{children['labels'].info.run_id}/label_subsets.json")
    assert {k: v["num_samples"] for k, v in ids["subsets"].items()} == {"1pct": 13, "10pct": 126}
    assert set(ids["subsets"]["1pct"]["ids"]) <= set(ids["subsets"]["10pct"]["ids"])
    assert all(len(v["class_counts"]) == 10 for v in ids["subsets"].values())

    # finetune: teacher and baseline per fraction, val top-1 per epoch, the selected epoch logged
    for name in ("teacher_10pct", "baseline_10pct", "teacher_1pct", "baseline_1pct"):
        assert [m.step for m in client.get_metric_history(fin.info.run_id, f"{name}/val/top1")] == [1, 2, 3]
        assert 1 <= fin.data.metrics[f"{name}/selected_epoch"] <= 3
    assert [m.step for m in client.get_metric_history(children["distill"].info.run_id, "student_10pct/val/top1")] == [1, 2]

    ev = children["evaluate"]
    for frac in ("1pct", "10pct"):
        for col in ("teacher_top1", "student_top1", "baseline_top1", "encoder_knn_top1", "encoder_linear_top1"):
            assert 0.0 <= ev.data.metrics[f"test/{frac}/{col}"] <= 1.0
    assert ev.data.metrics["test/10pct/labels"] == 126
    artifacts = {a.path for a in client.list_artifacts(ev.info.run_id)}
    assert {"results.md", "results.json", "confusion_10pct.png", "confusion_1pct.png"} <= artifacts

    # the registry: three models, candidate and champion aliases, lineage and metric tags
    for role in ("encoder", "teacher", "student"):
        mv = client.get_model_version_by_alias(f"default-{role}", "champion")
        assert str(mv.version) == "1" and str(client.get_model_version_by_alias(f"default-{role}", "candidate").version) == "1"
        assert mv.tags["clpipe.pipeline_run_id"] == children["register"].data.tags["mlflow.parentRunId"]
        assert mv.tags["label_fraction"] == "0.1" and mv.tags["seed"] == "0"
        assert mv.tags["clpipe.manifest_sha256"] == tracking.load_outputs(shard.info.run_id)["manifest_sha256"]
        assert float(mv.tags["test_top1"]) >= 0
    stage_of = {"encoder": "pretrain", "teacher": "finetune", "student": "distill"}
    for role, stage in stage_of.items():
        mv = client.get_model_version(f"default-{role}", "1")
        assert mv.tags["clpipe.stage_run_id"] == children[stage].info.run_id
    student = load_model("models:/default-student@champion")  # state_dict + builder, nothing unpickled
    shard_dir = tracking.load_outputs(shard.info.run_id)["shard_dir"]
    x, y = load_split([str(next(Path(shard_dir).glob("test-*.tar")))], EvalTransform(16))
    logits = student(x).detach().numpy()
    assert logits.argmax(1).shape == y.shape
    served = mlflow.pyfunc.load_model("models:/default-student@champion", model_config={"device": "cpu"})
    assert np.allclose(served.predict(x.numpy()), logits, atol=1e-4)
    assert np.isclose(float(client.get_model_version("default-student", "1").tags["test_top1"]),
                      float(ev.data.metrics["test/10pct/student_top1"]), atol=1e-5)

    # the same command again: every stage cached, nothing recomputed
    assert main(args) == 0
    assert capsys.readouterr().out.count("cached, reusing run") == len(STAGES)
    assert _recomputed(_latest_children(client, exp_id)) == set()

    # only the distillation temperature changes: distill, evaluate and register rerun
    assert main([*args, "--set", "distill.temperature=1.0"]) == 0
    capsys.readouterr()
    assert _recomputed(_latest_children(client, exp_id)) == {"distill", "evaluate", "register"}
    assert str(client.get_model_version_by_alias("default-student", "candidate").version) == "2"

    # --rerun register: a new version with the same test top-1 is candidate but not champion
    before = client.get_model_version_by_alias("default-teacher", "champion").version
    assert main([*args, "--rerun", "register"]) == 0
    assert "champion stays version" in capsys.readouterr().out
    assert _recomputed(_latest_children(client, exp_id)) == {"register"}
    assert client.get_model_version_by_alias("default-teacher", "champion").version == before
    assert str(client.get_model_version_by_alias("default-teacher", "candidate").version) == "3"

    # --rerun finetune forces finetune and everything downstream of it
    assert main([*args, "--rerun", "finetune"]) == 0
    capsys.readouterr()
    assert _recomputed(_latest_children(client, exp_id)) == {"finetune", "distill", "evaluate", "register"}

    # --only evaluate: evaluate alone, against the cached upstream outputs
    assert main([*args, "--only", "evaluate"]) == 0
    capsys.readouterr()
    children = _latest_children(client, exp_id)
    assert set(children) == {"shard", "labels", "pretrain", "finetune", "distill", "evaluate"}
    assert _recomputed(children) == {"evaluate"}


def test_chain_input_errors_are_one_clear_line(local_ray, tmp_path, capsys):
    work = tmp_path / "work"
    args = ["run", "--work-dir", str(work), *TINY]
    # a label fraction that leaves a class without labels fails in the labels stage, before any training
    assert main([*args, "--set", "labels.fractions=[0.004]"]) == 1
    err = capsys.readouterr().err
    assert "stage labels failed" in err and "leaves a class with no labels" in err and "fraction >= 0.008" in err
    assert len(err.strip().splitlines()) == 1
    # a student backbone that does not exist is a config error
    assert main([*args, "--set", "distill.student_backbone=resnet7"]) == 2
    assert "distill.student_backbone: unknown backbone 'resnet7'; known backbones: resnet18, resnet50, small_cnn" in capsys.readouterr().err
    # --only with an upstream stage that never ran
    assert main([*args, "--only", "distill"]) == 1
    assert "upstream stage" in capsys.readouterr().err
    # a teacher whose class count differs from the data's
    assert main([*args, "--set", "finetune.num_classes=5", "--set", "pretrain.epochs=1"]) == 1
    err = capsys.readouterr().err
    assert "finetune.num_classes: the teacher would predict 5 classes but the shard set" in err and "has 10" in err
    # a missing upstream artifact: the teacher file deleted after finetune finished
    short = [*args, "--set", "pretrain.epochs=1", "--set", "finetune.epochs=1", "--set", "distill.epochs=1",
             "--set", "finetune.baseline=false"]  # shard, labels and pretrain are cached from the run above
    assert main([*short, "--only", "finetune"]) == 0
    capsys.readouterr()
    teacher = next(work.glob("finetune/*/models/teacher_10pct.pt"))
    teacher.unlink()
    assert main([*short, "--only", "distill"]) == 1
    err = capsys.readouterr().err
    assert "upstream stage finetune" in err and "lost its artifact" in err and str(teacher) in err


def test_a_source_with_no_decodable_image_fails_the_shard_stage_clearly(local_ray, tmp_path, capsys):
    folder = tmp_path / "broken"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        (folder / c / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    args = ["run", "--work-dir", str(tmp_path / "work"), "--set", f"data.source={{kind: image_folder, path: {folder}}}"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "stage shard failed" in err and "none of the 2 images" in err and "could be decoded" in err


def test_ray_train_poll_interval_reaches_the_controller(local_ray, monkeypatch):
    """``ray.train_poll_seconds`` is set where Ray Train reads it: the driver's environment,
    which Ray propagates to each Train controller (and from there to the workers)."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from pipelines import ray_env
    from pipelines.config import RayConfig

    monkeypatch.delenv(ray_env.TRAIN_POLL_ENV, raising=False)
    ray_env.init(RayConfig(train_poll_seconds=0.25))  # Ray is up: only the setting changes
    assert get_env_vars_to_propagate()[ray_env.TRAIN_POLL_ENV] == "0.25"
