"""The sweep stage: bad spaces refused before any trial; a tiny Ray Tune sweep on a local
Ray (trials in MLflow, successive halving stopping the trials that cannot learn, the best values in
the pretrain stage); a sweep whose driver is killed mid-way resumes from its Tune
experiment, with single-worker trials and with two-worker trials sampled by Optuna."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines import tracking
from pipelines.cli import main
from pipelines.config import ConfigError, load_config
from tests.conftest import latest_children, outputs, pipeline_runs

ON = ["sweep.enabled=true", "sweep.space={}"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (ON, "sweep.space: empty; name at least one hyperparameter"),
        (
            ON + ["sweep.space={momentum: {grid: [0.9]}}"],
            "sweep.space.momentum: simclr has no hyperparameter 'momentum'",
        ),
        (
            ON + ["pretrain.method=moco", "sweep.space={momentum: {uniform: [0.9, 1.0]}}"],
            "sweep.space.momentum: value 1.0: params.moco.momentum: must be in [0, 1)",
        ),
        (
            ON + ["sweep.space={temperature: {grid: [0.1, 0]}}"],
            "sweep.space.temperature: value 0: params.simclr.temperature: must be a finite number > 0",
        ),
        (ON + ["sweep.space={temperature: {loguniform: [0, 1]}}"], "space.temperature.loguniform: bounds must be > 0"),
        (ON + ["sweep.space={temperature: {normal: [0, 1]}}"], "space.temperature: expected one of {grid: [...]}"),
        (
            ON + ["sweep.space={temperature: {grid: [0.1]}}", "sweep.max_concurrent_trials=4", "ray.num_cpus=2"],
            "sweep.max_concurrent_trials (4) x cpus_per_trial (1.0) > ray.num_cpus (2)",
        ),
        (
            ON + ["sweep.space={temperature: {grid: [0.1]}}", "sweep.workers_per_trial=4", "sweep.cpus_per_trial=0.2"],
            "sweep.cpus_per_trial (0.2) leaves less than 0.1 CPU to each of the 4 workers_per_trial",
        ),
        (
            ON + ["sweep.space={temperature: {grid: [0.1]}}", "sweep.search=optuna"],
            "sweep.space.temperature: Optuna cannot search a grid; use choice, or search: basic",
        ),
    ],
)
def test_bad_sweeps_are_refused_before_any_trial(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1


def test_a_file_space_replaces_the_default_space(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("pretrain: {method: moco}\nsweep: {space: {momentum: {grid: [0.99, 0.999]}}}\n")
    assert load_config(p).sweep.space == {"momentum": {"grid": [0.99, 0.999]}}  # no default temperature grid added


def test_a_valid_space_loads_and_a_disabled_sweep_is_not_a_stage():
    cfg = load_config(overrides=ON + ["sweep.space={temperature: {grid: [0.1, 0.5]}, lr_base: {loguniform: [0.1, 2]}}"])
    assert cfg.sweep.candidates("lr_base") == [0.1, 2]
    from pipelines.stages import STAGES

    names = ["shard", "labels", "pretrain", "finetune", "distill", "evaluate", "register"]
    assert [s.name for s in STAGES if s.enabled(load_config(overrides=["sweep.enabled=false"]))] == names
    assert [s.name for s in STAGES if s.enabled(load_config())] == [*names[:2], "sweep", *names[2:]]  # the default


TINY = [
    "--set",
    "pretrain.epochs=1",
    "--set",
    "pretrain.batch_size_per_worker=32",
    "--set",
    "sweep.enabled=true",
    "--set",
    "sweep.epochs=2",
    "--set",
    "sweep.max_concurrent_trials=1",
]


def _trials(client: MlflowClient, exp_id: str, sweep_run_id: str) -> list:
    return client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{sweep_run_id}'")


@pytest.mark.slow
def test_the_sweep_sizes_itself_from_what_the_cluster_can_hold(monkeypatch, capsys):
    """A Ray started here (fixed resources): trials beyond its CPUs are refused in one line.
    A joined cluster counts what its autoscaler may start; one that holds no trial yet
    (workers still to start or join) queues the trials in Tune instead of failing."""
    from pipelines import ray_env
    from pipelines.config import SweepConfig
    from pipelines.stages.sweep import _concurrency

    sw = SweepConfig(cpus_per_trial=2)
    now = {"CPU": 0.0}
    monkeypatch.setattr("ray.cluster_resources", lambda: dict(now))
    monkeypatch.setattr(ray_env, "_max_resources", lambda: {})
    monkeypatch.setattr(ray_env, "_joined", False)
    with pytest.raises(ValueError, match=r"sweep.cpus_per_trial \(2.0\) exceeds the cluster's 0 CPUs"):
        _concurrency(sw, gpu=False)
    monkeypatch.setattr(ray_env, "_joined", True)
    assert _concurrency(sw, gpu=False) is None  # no limit but the resources: Tune queues them
    assert "the trials wait in Tune's queue for nodes to start or join" in capsys.readouterr().out
    assert _concurrency(SweepConfig(cpus_per_trial=2, max_concurrent_trials=3), gpu=False) == 3
    monkeypatch.setattr(ray_env, "_max_resources", lambda: {"CPU": 32, "GPU": 4})  # an autoscaler's node types
    assert _concurrency(sw, gpu=False) == 16 and ray_env.cluster_gpus() == 4
    now["CPU"] = 64.0  # more present than the autoscaler config says: what is there counts
    assert _concurrency(sw, gpu=False) == 32


def test_sweep_logs_every_trial_and_stops_poor_ones(tmp_path, local_ray, capsys):
    """How the best values feed the pretrain stage: the S3 pipeline's sweep
    (tests/pipelines/test_s3.py)."""
    import torch

    work = tmp_path / "work"
    # a designed case, one trial at a time in grid order: InstDisc's memory bank collapses at a high learning
    # rate (bench/README.md), so at ASHA's first rung the lr 0.3 and 0.6 trials trail the first trial (which
    # always goes on) by far and are stopped; on digits, trials that do learn differ by a few val images only
    space = "sweep.space={lr_base: {grid: [1.0e-4, 0.3, 0.6]}, temperature: {grid: [0.07]}}"
    method = [
        "--set",
        "pretrain.method=instdisc",
        "--set",
        "pretrain.params.instdisc={num_negatives: 256}",
        "--set",
        "pretrain.warmup_epochs=0",
        "--set",
        "pretrain.optimizer=sgd",
    ]
    args = ["run", "--work-dir", str(work), *TINY, *method, "--set", space, "--until", "sweep"]
    assert main(args) == 0
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("clpipe").experiment_id
    children = latest_children(client, exp_id)
    assert set(children) == {"shard", "sweep"}
    sw = children["sweep"]
    trials = _trials(client, exp_id, sw.info.run_id)
    assert len(trials) == 3 and all(t.data.tags[tracking.TAG_KIND] == "trial" for t in trials)
    for t in trials:
        assert {"lr_base", "temperature"} <= set(t.data.params)
        hist = client.get_metric_history(t.info.run_id, "val/knn_top1")
        assert [m.step for m in hist] == list(range(1, int(t.data.metrics["epochs_run"]) + 1))
    stopped = [t for t in trials if t.data.tags["clpipe.trial.stopped_early"] == "true"]
    assert stopped and all(float(t.data.params["lr_base"]) >= 0.3 for t in stopped)
    assert sw.data.metrics["sweep/stopped_early"] == len(stopped)
    artifacts = {a.path for a in client.list_artifacts(sw.info.run_id)}
    assert {
        "trials.csv",
        "trials.json",
        "trial_curves.png",
        "objective_vs_temperature.png",
        "objective_vs_lr_base.png",
    } <= artifacts
    assert outputs(client, sw.info.run_id)["best"] == {"lr_base": 1.0e-4, "temperature": 0.07}
    # InstDisc's bank has one entry per training image (num_samples filled in from the manifest)
    states = sorted((work / "ray_results").glob("sweep-*/trial_*/checkpoint_*/state.pt"))
    assert states, "no trial checkpoint under ray_results"
    for state in states:
        assert torch.load(state, weights_only=True)["model"]["memory.bank"].shape[0] == 1259
    # the run report shows the sweep: the ranked trials and its figures
    parent = pipeline_runs(client, exp_id)[0].info.run_id
    report = (work / "reports" / f"{parent}.html").read_text()
    sweep_part = report.split("<h2 id=sweep>")[1].split("<h2 ")[0]
    assert sweep_part.count("<tr>") == 1 + 3 and sweep_part.count('<img src="data:image/png;base64,') >= 3
    # a finished sweep is served from the stage cache
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("cached, reusing run") == 2


def test_the_default_sweep_twice_gives_the_same_trials_stops_and_best(tmp_path, local_ray, capsys):
    """Reproducible by default: the shipped sweep (4 temperatures, 3 epochs, as many trials
    at a time as the CPUs hold) run twice on the same shards makes the same decisions at
    every rung and picks the same temperature, the trials' curves equal to the last digit
    (a rung is decided only when all of its trials reported it: pipelines/halving.py)."""
    work = tmp_path / "work"
    args = ["run", "--work-dir", str(work), "--until", "sweep"]
    runs = []
    for extra in ([], ["--rerun", "sweep"]):
        assert main([*args, *extra]) == 0
        out = capsys.readouterr().out
        assert "successive halving, 2 at a time" in out, out[-2000:]
        # progress: a line per trial epoch (with the epochs done of those planned) and per finished trial
        progress = [ln for ln in out.splitlines() if ln.startswith("sweep: temperature=")]
        assert sum(" val kNN top-1 " in ln for ln in progress) == 7, progress  # 1 + 1 + 2 + 3 epochs
        assert [ln.rsplit("[", 1)[1] for ln in progress if "trials finished" in ln] == [
            f"{i}/4 trials finished]" for i in range(1, 5)
        ], progress
        client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
        sw = latest_children(client, client.get_experiment_by_name("clpipe").experiment_id)["sweep"]
        ranked = outputs(client, sw.info.run_id)["ranked"]
        runs.append(
            {
                "best": outputs(client, sw.info.run_id)["best"],
                "trials": {r["temperature"]: (r["epochs_run"], r["stopped_early"], r["last"]) for r in ranked},
                "order": [r["temperature"] for r in ranked],
            }
        )
    first, second = runs
    assert first == second
    # the halving itself: 4 trials, rungs at epochs 1 and 2, half of them go on at each
    assert sorted(e for e, _, _ in first["trials"].values()) == [1, 1, 2, 3]


def _generated_source(tmp_path: Path) -> list[str]:
    """``--set`` arguments for 400 generated images in an npz: the killed sweeps test the
    resume, not what the trials learn."""
    import numpy as np

    from tests.conftest import make_images

    x, y = make_images(400)
    np.savez(tmp_path / "data.npz", images=x, labels=y)
    return ["--set", "data.source.kind=npz", "--set", f"data.source.path={tmp_path / 'data.npz'}"]


def _kill_during_first_trial(cmd: list[str], work: Path, checkpointed, log: Path) -> None:
    """Run ``cmd`` as a driver process of its own on the shared cluster and SIGKILL it once
    ``checkpointed(ray_results)`` says the first trial has a checkpoint."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=Path(__file__).parents[2]
        )
        try:
            deadline = time.time() + 300
            while time.time() < deadline and not checkpointed(work / "ray_results"):
                assert proc.poll() is None, log.read_text()[-2000:]
                time.sleep(0.5)
            assert time.time() < deadline, "the first trial never checkpointed"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver alone: the cluster's processes are in another session
            proc.wait()


@pytest.mark.slow
def test_a_killed_sweep_of_single_worker_trials_sampled_by_optuna_resumes(tmp_path, local_ray, capsys):
    """Temperatures drawn by Optuna from a uniform range, one single-worker trial at a time.
    The driver killed after the first trial's first epoch; the rerun restores the Tune
    experiment (and Optuna's study): the trial resumes from its Tune checkpoint and Optuna
    samples the trial that never started. On 400 generated images (what is tested is the
    resume, not what the trials learn)."""
    work = tmp_path / "work"
    args = [
        "sweep",
        "--work-dir",
        str(work),
        *_generated_source(tmp_path),
        "--set",
        "sweep.search=optuna",
        "--set",
        "sweep.num_samples=2",
        "--set",
        "sweep.space={temperature: {uniform: [0.1, 1.0]}}",
        "--set",
        "sweep.epochs=2",
        "--set",
        "sweep.max_concurrent_trials=1",
        "--set",
        "pretrain.batch_size_per_worker=32",
    ]
    _kill_during_first_trial(
        [sys.executable, "-m", "pipelines", *args, "--set", f"ray.address={local_ray}"],
        work,
        lambda d: any(d.glob("sweep-*/trial_*/checkpoint_000000")),
        tmp_path / "first.log",
    )
    assert main(args) == 0
    out = capsys.readouterr().out
    assert _resumed(out) and "2 trials ranked" in out
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("clpipe").experiment_id
    sweep_run = latest_children(client, exp_id)["sweep"]
    if "resuming the interrupted sweep" in out:  # the run names the experiment it continued
        assert sweep_run.data.tags[tracking.TAG_RESUMED].startswith(str(work / "ray_results" / "sweep-"))
    trials = _trials(client, exp_id, sweep_run.info.run_id)
    temps = sorted(float(t.data.params["temperature"]) for t in trials)
    assert len(temps) == 2 and temps[0] != temps[1] and all(0.1 <= t <= 1.0 for t in temps)
    assert all(0 < t.data.metrics["val/knn_top1"] <= 1 for t in trials)


def _resumed(out: str) -> bool:
    """The rerun resumed the sweep, or (when the kill landed while Tune was writing its state
    file, which it writes in place: rare, but seen) said so and started afresh."""
    return "resuming the interrupted sweep" in out or (
        "is cut off (the run was killed while Tune wrote it); starting the sweep afresh" in out
    )


def _train_checkpoint_registered(ray_results: Path) -> bool:
    """Whether a trial's Train run has registered a checkpoint (one on disk that is not yet in
    the run's snapshot is not the one a restore resumes from)."""
    for snap in ray_results.glob("sweep-*/train/trial_*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snap.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]:
                return True
        except (OSError, ValueError, KeyError, TypeError):  # being written
            continue
    return False


@pytest.mark.slow
def test_a_killed_sweep_of_two_worker_trials_resumes_from_the_trials_train_run(tmp_path, local_ray, capsys):
    """A trial on its own TorchTrainer (two Ray Train workers, splitting the epoch's
    batches). The driver killed after the trial's first Train checkpoint; the rerun
    restores the experiment and the trial's TorchTrainer resumes from its Train run, which
    is named after the trial. On 400 generated images, three epochs: the kill comes within
    a second of the first checkpoint, two epochs before the trial could end."""
    from cl_core.data.reader import plan_epoch
    from cl_core.data.shards import read_manifest, shard_urls

    work = tmp_path / "work"
    args = [
        "sweep",
        "--work-dir",
        str(work),
        *_generated_source(tmp_path),
        "--set",
        "sweep.space={temperature: {grid: [0.5]}}",
        "--set",
        "sweep.epochs=3",
        "--set",
        "sweep.workers_per_trial=2",
        "--set",
        "sweep.cpus_per_trial=2",
        "--set",
        "pretrain.batch_size_per_worker=32",
    ]
    _kill_during_first_trial(
        [sys.executable, "-m", "pipelines", *args, "--set", f"ray.address={local_ray}"],
        work,
        _train_checkpoint_registered,
        tmp_path / "first.log",
    )
    assert main(args) == 0
    out = capsys.readouterr().out
    assert _resumed(out) and "1 trials ranked" in out
    resumed = [ln for ln in out.splitlines() if "[pretrain] resumed from checkpoint at epoch " in ln]
    assert len(resumed) == 1 and resumed[0].split(" at epoch ")[1][0] in "12", out[-3000:]

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("clpipe").experiment_id
    sw = latest_children(client, exp_id)["sweep"]
    trials = _trials(client, exp_id, sw.info.run_id)
    assert len(trials) == 1 and 0 < trials[0].data.metrics["val/knn_top1"] <= 1
    # the trial's Train run: named after the trial, its last checkpoint made by two workers
    exp_dir = Path(outputs(client, sw.info.run_id)["experiment_dir"])
    runs = sorted(p for p in (exp_dir / "train").iterdir() if p.is_dir())
    assert [p.name for p in runs] == [trials[0].info.run_name]
    shard_dir = outputs(client, latest_children(client, exp_id)["shard"].info.run_id)["shard_dir"]
    _, counts = shard_urls(shard_dir, read_manifest(shard_dir), "train")
    workers = load_config().pretrain.loader_workers
    steps = {
        w: plan_epoch(counts, world_size=w, loader_workers=workers, batch_size=32, epoch=0, seed=0).steps
        for w in (1, 2)
    }
    assert steps[2] < steps[1]
    ckpt = sorted(p for p in runs[0].glob("checkpoint_*") if p.is_dir())[-1]
    assert json.loads((ckpt / "config.json").read_text())["metrics"]["step"] == 3 * steps[2]


def test_a_saved_sweep_state_cut_off_by_a_kill_is_named_so_the_sweep_starts_afresh(tmp_path):
    """Tune writes experiment_state-*.json in place: a driver killed during that write
    leaves it empty or cut off, and Tune cannot restore from it. The sweep stage tells a
    state never saved (None), one that reads ("") and a cut-off one (its name), and starts
    afresh, saying so, on the last."""
    from pipelines.stages.sweep import _saved_state

    exp = tmp_path / "sweep-abc"
    exp.mkdir()
    assert _saved_state(str(exp)) is None
    good = {"trial_data": [], "runner_data": {}, "stats": {"start_time": 1.0}}
    (exp / "experiment_state-2026-12-07_07-00-00.json").write_text(json.dumps(good))
    assert _saved_state(str(exp)) == ""
    (exp / "experiment_state-2026-12-07_07-05-00.json").write_text(json.dumps(good)[:20])
    assert _saved_state(str(exp)) == "experiment_state-2026-12-07_07-05-00.json"
    (exp / "experiment_state-2026-12-07_07-05-00.json").write_text("")
    assert _saved_state(str(exp)) == "experiment_state-2026-12-07_07-05-00.json"
