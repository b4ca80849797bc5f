"""The default pipeline (the SimCLRv2 chain) end to end on a local Ray (2 CPUs) with a tiny
budget: one run of the chain (the session's ``chain`` fixture) whose outputs every test
here inspects, its cached reruns, and the input errors it reports in one line. How a
config change or ``--rerun`` propagates through the stage graph: tests/pipelines/test_graph.py."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from pipelines import tracking
from pipelines.cli import main
from tests.conftest import STAGES, latest_children, outputs, recomputed

pytestmark = pytest.mark.slow  # on one xdist process with the chain fixture: tests/conftest.py LANES


def _use_the_chains_store(chain, monkeypatch) -> None:
    """MLflow (and models:/ URIs) on the chain's store for this test only."""
    import mlflow

    store = f"sqlite:///{chain.work / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # MLflow exports it too: gone again after the test
    mlflow.set_tracking_uri(store)


def _test_images(chain, limit: int | None = None):
    """(images, labels) of the chain's first test shard, preprocessed as for evaluation."""
    from cl_core.augment import EvalTransform
    from cl_core.data.reader import load_split

    shard_dir = outputs(chain.client, chain.runs["shard"].info.run_id)["shard_dir"]
    return load_split([str(next(Path(shard_dir).glob("test-*.tar")))], EvalTransform(16), limit=limit)


def test_the_chain_logs_lineage_metrics_and_models(chain, monkeypatch):
    import mlflow.pyfunc
    import numpy as np

    from pipelines.models import load_model

    for col in ("supervised", "teacher", "student", "encoder"):
        assert col in chain.out
    assert "mlflow ui --backend-store-uri sqlite:///" in chain.out
    client, children = chain.client, chain.runs
    assert set(children) == set(STAGES) and recomputed(children) == set(STAGES)
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
    ids = json.loads(
        Path(
            client.download_artifacts(children["labels"].info.run_id, "label_subsets.json", str(chain.work.parent))
        ).read_text()
    )
    assert {k: v["num_samples"] for k, v in ids["subsets"].items()} == {"1pct": 13, "10pct": 126}
    assert set(ids["subsets"]["1pct"]["ids"]) <= set(ids["subsets"]["10pct"]["ids"])
    assert all(len(v["class_counts"]) == 10 for v in ids["subsets"].values())

    # finetune: teacher and baseline per fraction, val top-1 at the checked epochs (finetune.val_checks=2 of 3
    # epochs; epoch 0: the starting point, a candidate too), the selected epoch one of them and logged
    for name in ("teacher_10pct", "baseline_10pct", "teacher_1pct", "baseline_1pct"):
        assert [m.step for m in client.get_metric_history(fin.info.run_id, f"{name}/val/top1")] == [0, 2, 3]
        assert fin.data.metrics[f"{name}/selected_epoch"] in (0, 2, 3)
    assert [m.step for m in client.get_metric_history(children["distill"].info.run_id, "student_10pct/val/top1")] == [
        0,
        1,
        2,
    ]

    ev = children["evaluate"]
    for frac in ("1pct", "10pct"):
        for col in ("teacher_top1", "student_top1", "baseline_top1", "encoder_knn_top1", "encoder_linear_top1"):
            assert 0.0 <= ev.data.metrics[f"test/{frac}/{col}"] <= 1.0
    assert ev.data.metrics["test/10pct/labels"] == 126
    artifacts = {a.path for a in client.list_artifacts(ev.info.run_id)}
    assert {"results.md", "results.json", "confusion_10pct.png", "confusion_1pct.png"} <= artifacts

    # the registry: three models, candidate and champion aliases, lineage and metric tags
    manifest_sha = outputs(client, shard.info.run_id)["manifest_sha256"]
    for role in ("encoder", "teacher", "student"):
        mv = client.get_model_version_by_alias(f"default-{role}", "champion")
        assert (
            str(mv.version) == "1"
            and str(client.get_model_version_by_alias(f"default-{role}", "candidate").version) == "1"
        )
        assert mv.tags["clpipe.pipeline_run_id"] == chain.parent.info.run_id
        assert mv.tags["label_fraction"] == "0.1" and mv.tags["seed"] == "0"
        assert mv.tags["clpipe.manifest_sha256"] == manifest_sha
        assert float(mv.tags["test_top1"]) >= 0
    stage_of = {"encoder": "pretrain", "teacher": "finetune", "student": "distill"}
    logged = {stage: outputs(client, children[stage].info.run_id) for stage in stage_of.values()}
    model_ids = {
        "encoder": logged["pretrain"]["model_id"],
        "teacher": logged["finetune"]["models"]["teacher_10pct"]["model_id"],
        "student": logged["distill"]["models"]["student_10pct"]["model_id"],
    }
    for role, stage in stage_of.items():
        mv = client.get_model_version(f"default-{role}", "1")
        assert mv.tags["clpipe.stage_run_id"] == children[stage].info.run_id
        # registered from the model its training stage logged (logged once), described
        assert mv.source == f"models:/{model_ids[role]}" and mv.run_id == children[stage].info.run_id
        model = client.get_logged_model(model_ids[role])
        assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": f"default-{role}", "version": 1}]
        assert model.source_run_id == children[stage].info.run_id
        linked = {"encoder/val_knn_top1"} if role == "encoder" else {f"{role}_10pct/selected_val_top1"}
        assert {m.key for m in model.metrics} >= linked, model.metrics
        assert "test top-1" in mv.description and client.get_registered_model(f"default-{role}").description
    # each training stage logged every model it trained, and register logged none
    assert {m.name for m in client.search_logged_models(experiment_ids=[chain.exp_id])} == {
        "encoder",
        "teacher_1pct",
        "baseline_1pct",
        "teacher_10pct",
        "baseline_10pct",
        "student_1pct",
        "student_10pct",
    }
    _use_the_chains_store(chain, monkeypatch)  # models:/ URIs resolve through it
    student = load_model("models:/default-student@champion")  # state_dict + builder, nothing unpickled
    x, y = _test_images(chain)
    logits = student(x).detach().numpy()
    assert logits.argmax(1).shape == y.shape
    served = mlflow.pyfunc.load_model("models:/default-student@champion", model_config={"device": "cpu"})
    assert np.allclose(served.predict(x.numpy()), logits, atol=1e-4)
    assert np.isclose(
        float(client.get_model_version("default-student", "1").tags["test_top1"]),
        float(ev.data.metrics["test/10pct/student_top1"]),
        atol=1e-5,
    )
    # what serving the model in an environment of its own needs: pinned requirements and the cl_core code
    local = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{model_ids['student']}", dst_path=str(chain.work.parent / "served")
        )
    )
    reqs = {line.split("==")[0] for line in (local / "requirements.txt").read_text().split()}
    assert {"mlflow", "torch", "torchvision", "numpy", "pillow"} <= reqs, reqs
    assert (local / "code" / "cl_core" / "models" / "saved.py").is_file()


def test_the_chain_records_what_mlflow_users_expect(chain):
    """Source tags, the shard set as every reading stage's input dataset, system metrics on
    the training stages, and the results on the parent run."""
    client, parent, children = chain.client, chain.parent, chain.runs
    # the console, written to a file: the workers' lines without colour codes
    assert "(RayTrainWorker pid=" in chain.out and "\x1b[" not in chain.out
    root = Path(__file__).resolve().parents[2]
    for run in (parent, *children.values()):
        assert run.data.tags["clpipe.version"] not in ("", "unknown"), run.info.run_name
        if (root / ".git").exists():
            assert len(run.data.tags["mlflow.source.git.commit"]) == 40, run.info.run_name

    sha = outputs(client, children["shard"].info.run_id)["manifest_sha256"]
    shard_dir = outputs(client, children["shard"].info.run_id)["shard_dir"]
    context = {
        "labels": "labels",
        "pretrain": "training",
        "finetune": "training",
        "distill": "training",
        "evaluate": "evaluation",
    }  # (the chain runs no sweep; the sweep stage's run logs it as training)
    for stage, ctx in context.items():
        inputs = client.get_run(children[stage].info.run_id).inputs.dataset_inputs
        assert len(inputs) == 1, (stage, inputs)
        ds = inputs[0].dataset
        assert (ds.name, ds.digest) == ("default-shards", sha[:32]), stage
        assert json.loads(ds.source)["uri"] == shard_dir and ds.source_type == "local"
        assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == ctx
        assert children[stage].data.tags["clpipe.dataset.manifest_sha256"] == sha
    assert not client.get_run(children["shard"].info.run_id).inputs.dataset_inputs

    for stage in ("pretrain", "finetune", "distill", "evaluate"):  # sampled every second (TINY)
        system = [k for k in children[stage].data.metrics if k.startswith("system/")]
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(system), stage
    assert not [k for k in children["shard"].data.metrics if k.startswith("system/")]

    ev = children["evaluate"].data.metrics
    results = {k: v for k, v in ev.items() if k.startswith("test/")}
    assert results and all(parent.data.metrics[k] == v for k, v in results.items())
    assert "results.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_reruns_use_the_cache_and_register_new_candidates(chain, local_ray, capsys):
    """The real stages behind the graph's cache (its rules on every kind of change, --rerun
    and --only: tests/pipelines/test_graph.py): evaluate reruns on its upstream stages' cached
    outputs, and the registry's candidate and champion aliases follow new versions."""
    client, exp_id, args = chain.client, chain.exp_id, chain.args
    # the same command again: every stage cached, nothing recomputed
    assert main(args) == 0
    assert capsys.readouterr().out.count("cached, reusing run") == len(STAGES)
    assert recomputed(latest_children(client, exp_id)) == set()

    # only evaluate's section changes: evaluate and register rerun; a new version of each model
    # with the same test top-1 is a candidate, and the champion stays
    assert main([*args, "--set", "evaluate.knn_k=10"]) == 0
    assert "champion stays version 1" in capsys.readouterr().out
    assert recomputed(latest_children(client, exp_id)) == {"evaluate", "register"}
    for role in ("encoder", "teacher", "student"):
        assert str(client.get_model_version_by_alias(f"default-{role}", "candidate").version) == "2"
        assert str(client.get_model_version_by_alias(f"default-{role}", "champion").version) == "1"

    # --rerun register: register alone recomputes, a third version
    assert main([*args, "--rerun", "register"]) == 0
    assert "champion stays version" in capsys.readouterr().out
    assert recomputed(latest_children(client, exp_id)) == {"register"}
    assert str(client.get_model_version_by_alias("default-teacher", "candidate").version) == "3"
    assert str(client.get_model_version_by_alias("default-teacher", "champion").version) == "1"

    # --rerun distill: the stage's Ray run starts afresh (its finished checkpoint is not resumed)
    assert main([*args, "--rerun", "distill"]) == 0
    out = capsys.readouterr().out
    assert "[distill] student_1pct (model 1 of 2):" in out and "resumed from checkpoint" not in out
    assert recomputed(latest_children(client, exp_id)) == {"distill", "evaluate", "register"}


def test_chain_input_errors_are_one_clear_line(chain, local_ray, tmp_path, capsys):
    args = chain.args  # the chain's work dir: every upstream stage below comes from its cache
    # a label fraction that leaves a class without labels fails in the labels stage, before any training
    assert main([*args, "--set", "labels.fractions=[0.004]"]) == 1
    err = capsys.readouterr().err
    assert "stage labels failed" in err and "leaves a class with no labels" in err and "fraction >= 0.008" in err
    assert len(err.strip().splitlines()) == 1
    # a student backbone that does not exist is a config error
    assert main([*args, "--set", "distill.student_backbone=resnet7"]) == 2
    assert (
        "distill.student_backbone: unknown backbone 'resnet7'; known backbones: resnet18, resnet50, small_cnn"
        in capsys.readouterr().err
    )
    # a student of another architecture cannot start from the teacher's encoder
    assert main([*args, "--set", "distill.init=teacher", "--set", "distill.student_width=8"]) == 1
    err = capsys.readouterr().err
    assert "stage distill failed" in err and "distill.init: 'teacher' starts the student from" in err
    assert "set distill.init=scratch" in err and len(err.strip().splitlines()) == 1
    # --only with an upstream stage that never ran
    assert main(["run", "--work-dir", str(tmp_path / "empty"), "--only", "distill"]) == 1
    assert "upstream stage" in capsys.readouterr().err
    # a teacher whose class count differs from the data's
    assert main([*args, "--set", "finetune.num_classes=5"]) == 1
    err = capsys.readouterr().err
    assert "finetune.num_classes: the teacher would predict 5 classes but the shard set" in err and "has 10" in err
    # a missing upstream artifact: the teacher file deleted after finetune finished (put back after); the
    # path handed on is the final checkpoint's copy in Ray's run storage
    teacher = Path(outputs(chain.client, chain.runs["finetune"].info.run_id)["models"]["teacher_10pct"]["model_path"])
    assert teacher.is_relative_to(chain.work / "ray_results")
    kept = tmp_path / "teacher_10pct.pt"
    shutil.move(teacher, kept)
    try:
        assert main([*args, "--only", "distill"]) == 1
        err = capsys.readouterr().err
        assert "upstream stage finetune" in err and "lost its artifact" in err and str(teacher) in err
    finally:
        shutil.move(kept, teacher)


def test_a_source_with_no_decodable_image_fails_the_shard_stage_clearly(local_ray, tmp_path, capsys):
    folder = tmp_path / "broken"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        (folder / c / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    args = ["run", "--work-dir", str(tmp_path / "work"), "--set", f"data.source={{kind: image_folder, path: {folder}}}"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "stage shard failed" in err and "none of the 2 images" in err and "could be decoded" in err


def test_a_source_file_a_shard_task_cannot_read_fails_the_stage_in_one_line(local_ray):
    """A shard task's SourceReadError (after its retries) reaches the stage as that one line,
    not as Ray's remote traceback (the retries and what counts as corrupt: tests/cl_core/test_shards.py)."""
    import ray

    from cl_core.data.sources import SourceReadError
    from pipelines.stages.shard import _gather

    line = "data.source: cannot read /data/x.png (FileNotFoundError: gone) after 4 attempts; every node ..."

    @ray.remote
    def task(fail: bool) -> tuple[dict, str]:  # a shard task's (record, node id)
        if fail:
            raise SourceReadError(line)
        return {"num_samples": 1, "corrupt": [], "bytes": 10}, "node-a"

    results, rate = _gather({"train": [task.remote(False)]}, total=1)
    assert results == {"train": [{"num_samples": 1, "corrupt": [], "bytes": 10}]} and rate["nodes"] == {"node-a": 1}
    with pytest.raises(SourceReadError) as e:
        _gather({"train": [task.remote(False)], "val": [task.remote(True)]}, total=2)
    assert type(e.value) is SourceReadError and str(e.value) == line


def test_a_local_ray_records_and_exports_no_metrics(local_ray):
    """``ray.metrics: false`` (the default): the Ray the pipeline starts has Ray's metrics off in
    every process (its raylet's environment, which its workers inherit) and Ray Train's off in
    the driver, where Train reads it."""
    import ray
    from ray.train.v2._internal.constants import METRICS_ENABLED_ENV_VAR

    from pipelines import ray_env

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    environ = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{raylet}/environ").read_bytes().split(b"\0") if b"=" in kv)
    assert environ[ray_env.METRICS_ENV[0].encode()] == b"0"
    assert METRICS_ENABLED_ENV_VAR in ray_env.METRICS_ENV and os.environ[METRICS_ENABLED_ENV_VAR] == "0"


def test_ray_train_poll_interval_reaches_the_controller(local_ray, monkeypatch):
    """``ray.train_poll_seconds`` is set where Ray Train reads it: the driver's environment,
    which Ray propagates to each Train controller (and from there to the workers)."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from pipelines import ray_env
    from pipelines.config import RayConfig

    monkeypatch.delenv(ray_env.TRAIN_POLL_ENV, raising=False)
    ray_env.init(RayConfig(train_poll_seconds=0.25))  # Ray is up: only the setting changes
    assert get_env_vars_to_propagate()[ray_env.TRAIN_POLL_ENV] == "0.25"


def test_export_the_registered_student_as_a_state_dict_torchscript_and_onnx(chain, tmp_path, monkeypatch, capsys):
    """`clpipe export`: each format is written, checked against the logged model and
    loadable outside MLflow (TorchScript without cl_core, ONNX with onnxruntime)."""
    import numpy as np
    import torch

    from cl_core.downstream.saved import build_module
    from pipelines.models import load_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = "models:/default-student@champion"
    paths = {
        fmt: tmp_path / name
        for fmt, name in (("state_dict", "student"), ("torchscript", "student.pt"), ("onnx", "student.onnx"))
    }
    for fmt, path in paths.items():
        assert main(["export", uri, str(path), "--format", fmt, "--work-dir", str(chain.work)]) == 0, (
            capsys.readouterr()
        )
        assert f"-> {path} ({fmt}, outputs checked)" in capsys.readouterr().out
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the export left the environment as it was
    _use_the_chains_store(chain, monkeypatch)
    x, _ = _test_images(chain, limit=64)
    want = load_model(uri)(x).detach()
    # the state_dict folder: tensors only, and the recipe that rebuilds the architecture
    module = build_module(json.loads((paths["state_dict"] / "builder.json").read_text())["builder"])
    module.load_state_dict(torch.load(paths["state_dict"] / "state_dict.pt", weights_only=True))
    torch.testing.assert_close(module.eval()(x).detach(), want, rtol=1e-4, atol=1e-5)
    # TorchScript and ONNX, on a batch of another size than the example's
    torch.testing.assert_close(torch.jit.load(str(paths["torchscript"]))(x).detach(), want, rtol=1e-4, atol=1e-5)
    import onnxruntime

    sess = onnxruntime.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
    # a model URI that does not exist: one line
    assert (
        main(["export", "models:/default-nothing@champion", str(tmp_path / "x.pt"), "--work-dir", str(chain.work)]) == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clpipe: export models:/default-nothing@champion: "), err


def test_the_run_report_renders_in_headless_chromium(chain, tmp_path):
    """The parent run's report.html (also written under the work dir): every section, every
    image decoded, no console error or failed load in Chromium; its numbers are the runs'."""
    from tests.browser import render

    parent = chain.parent.info.run_id
    local = chain.work / "reports" / f"{parent}.html"
    assert f"report: {local}" in chain.out
    page = Path(chain.client.download_artifacts(parent, "report.html", str(tmp_path)))
    assert page.read_text() == local.read_text()
    text = page.read_text()
    assert "<script" not in text and not re.findall(r'(?:src|href)="(?!data:image/png;base64,)', text)

    seen = render(page, tmp_path / "report.png")
    assert not seen.errors, seen.errors
    assert seen.headings == [
        "Stage timeline",
        "Training curves",
        "Results (test split)",
        "Confusion matrices",
        "Lineage",
    ]
    # pretrain curves, fine-tuning and distillation curves, a confusion figure per label fraction
    assert len(seen.images) == 5, seen.images
    assert all(i["complete"] and i["width"] > 100 and i["height"] > 100 for i in seen.images), seen.images
    assert (tmp_path / "report.png").stat().st_size > 50_000

    metrics = chain.runs["evaluate"].data.metrics
    for frac in ("1pct", "10pct"):
        for kind in ("teacher", "student", "baseline"):
            assert f"{metrics[f'test/{frac}/{kind}_top1']:.4f}" in seen.text, (frac, kind)
    for stage, run in chain.runs.items():
        assert stage in seen.text and run.info.run_id in seen.text
    for role in ("encoder", "teacher", "student"):
        assert f"models:/default-{role}/1" in seen.text


def test_a_registered_model_serves_with_mlflow_models_predict_in_a_fresh_virtualenv(chain, tmp_path):
    """The student as a user deploys it: a new virtualenv with the model's requirements.txt
    only (pip takes the wheels from the machine's configured cache), no clpipe, no cl_core but
    the model's own code; `mlflow models predict` there gives the in-process predictions."""
    import subprocess
    import sys

    import mlflow
    import numpy as np

    uri = "models:/default-student/1"
    store = f"sqlite:///{chain.work / 'mlflow.db'}"
    model = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "model"), tracking_uri=store))
    env_dir = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["MLFLOW_TRACKING_URI"] = store
    try:
        subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
        pip = subprocess.run(
            # no .pyc for torch's thousands of modules: 25 s of the install alone on 2 cores
            [str(env_dir / "bin" / "pip"), "install", "-q", "--no-compile", "-r", str(model / "requirements.txt")],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        assert pip.returncode == 0, pip.stderr[-3000:]
        python = str(env_dir / "bin" / "python")
        bare = subprocess.run([python, "-c", "import cl_core"], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert "No module named 'cl_core'" in bare.stderr  # only the model's code_paths bring it
        out = tmp_path / "predictions.json"
        served = subprocess.run(
            [
                str(env_dir / "bin" / "mlflow"),
                "models",
                "predict",
                "-m",
                uri,
                "-i",
                str(model / "serving_input_example.json"),
                "-t",
                "json",
                "-o",
                str(out),
                "--env-manager",
                "local",
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        assert served.returncode == 0, served.stderr[-3000:]
        got = np.asarray(json.loads(out.read_text())["predictions"], dtype=np.float32)
    finally:
        shutil.rmtree(env_dir, ignore_errors=True)  # a CUDA build of torch: several GB
    x = np.asarray(json.loads((model / "serving_input_example.json").read_text())["inputs"], dtype=np.float32)
    want = mlflow.pyfunc.load_model(str(model)).predict(x)
    assert got.shape == want.shape == (len(x), 10)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
