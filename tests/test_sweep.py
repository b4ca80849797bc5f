"""The sweep stage: bad spaces refused before any trial; a tiny Ray Tune sweep on a local
Ray (trials in MLflow, ASHA stopping the trials that cannot learn, the best values in
the pretrain stage); a sweep killed mid-way resumes from its Tune experiment."""

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
from tests.test_pipeline_e2e import _latest_children, _runs, local_ray  # noqa: F401 - fixture

ON = ["sweep.enabled=true", "sweep.space={}"]


@pytest.mark.parametrize("overrides,message", [
    (ON, "sweep.space: empty; name at least one hyperparameter"),
    (ON + ["sweep.space={momentum: {grid: [0.9]}}"], "sweep.space.momentum: simclr has no hyperparameter 'momentum'"),
    (ON + ["pretrain.method=moco", "sweep.space={momentum: {uniform: [0.9, 1.0]}}"],
     "sweep.space.momentum: value 1.0: params.moco.momentum: must be in [0, 1)"),
    (ON + ["sweep.space={temperature: {grid: [0.1, 0]}}"], "sweep.space.temperature: value 0: params.simclr.temperature: "
     "must be a finite number > 0"),
    (ON + ["sweep.space={temperature: {loguniform: [0, 1]}}"], "space.temperature.loguniform: bounds must be > 0"),
    (ON + ["sweep.space={temperature: {normal: [0, 1]}}"], "space.temperature: expected one of {grid: [...]}"),
    (ON + ["sweep.space={temperature: {grid: [0.1]}}", "sweep.max_concurrent_trials=4", "ray.num_cpus=2"],
     "sweep.max_concurrent_trials (4) x cpus_per_trial (1.0) > ray.num_cpus (2)"),
    (ON + ["sweep.space={temperature: {grid: [0.1]}}", "sweep.workers_per_trial=4", "sweep.cpus_per_trial=0.2"],
     "sweep.cpus_per_trial (0.2) leaves less than 0.1 CPU to each of the 4 workers_per_trial"),
    (ON + ["sweep.space={temperature: {grid: [0.1]}}", "sweep.search=optuna"],
     "sweep.space.temperature: Optuna cannot search a grid; use choice, or search: basic"),
])
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


TINY = ["--set", "pretrain.epochs=1", "--set", "pretrain.batch_size_per_worker=32", "--set", "sweep.enabled=true",
        "--set", "sweep.epochs=2", "--set", "sweep.max_concurrent_trials=1"]


@pytest.mark.slow
def test_sweep_logs_every_trial_stops_poor_ones_and_feeds_pretrain(tmp_path, local_ray, capsys):  # noqa: F811
    work = tmp_path / "work"
    # a designed case, one trial at a time in grid order: InstDisc's memory bank collapses at a high learning
    # rate (bench/README.md), so at ASHA's first rung the lr 0.3 and 0.6 trials trail the first trial (which
    # always goes on) by far and are stopped; on digits, trials that do learn differ by a few val images only
    space = "sweep.space={lr_base: {grid: [1.0e-4, 0.3, 0.6]}, temperature: {grid: [0.07]}}"
    method = ["--set", "pretrain.method=instdisc", "--set", "pretrain.params.instdisc={num_negatives: 256}",
              "--set", "pretrain.warmup_epochs=0", "--set", "pretrain.optimizer=sgd"]
    assert main(["run", "--work-dir", str(work), *TINY, *method, "--set", space, "--until", "pretrain"]) == 0
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("clpipe").experiment_id
    children = _latest_children(client, exp_id)
    assert set(children) == {"shard", "sweep", "pretrain"}
    sw = children["sweep"]
    trials = _runs(client, exp_id, sw.info.run_id)
    assert len(trials) == 3 and all(t.data.tags[tracking.TAG_KIND] == "trial" for t in trials)
    for t in trials:
        assert {"lr_base", "temperature"} <= set(t.data.params)
        hist = client.get_metric_history(t.info.run_id, "val/knn_top1")
        assert [m.step for m in hist] == list(range(1, int(t.data.metrics["epochs_run"]) + 1))
    stopped = [t for t in trials if t.data.tags["clpipe.trial.stopped_early"] == "true"]
    assert stopped and all(float(t.data.params["lr_base"]) >= 0.3 for t in stopped)
    assert sw.data.metrics["sweep/stopped_early"] == len(stopped)
    artifacts = {a.path for a in client.list_artifacts(sw.info.run_id)}
    assert {"trials.csv", "trials.json", "trial_curves.png", "objective_vs_temperature.png",
            "objective_vs_lr_base.png"} <= artifacts
    best = tracking.load_outputs(sw.info.run_id)["best"]
    assert best == {"lr_base": 1.0e-4, "temperature": 0.07}
    pre = children["pretrain"]
    assert pre.data.params["method.temperature"] == "0.07" and pre.data.params["used.lr_base"] == "0.0001"
    assert pre.data.tags["clpipe.sweep_overrides"] == '{"lr_base": 0.0001, "temperature": 0.07}'
    # a finished sweep is served from the stage cache
    capsys.readouterr()
    assert main(["run", "--work-dir", str(work), *TINY, *method, "--set", space, "--until", "pretrain"]) == 0
    assert capsys.readouterr().out.count("cached, reusing run") == 3


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_killed_sweep_resumes(tmp_path, workers):
    """Killed after the first trial's first epoch checkpoint; the rerun restores the Tune
    experiment. One worker: the trial resumes from its Tune checkpoint; two: its
    TorchTrainer resumes from the Train run named after the trial."""
    work = tmp_path / "work"
    temps = "[0.5, 0.2, 0.1]" if workers == 1 else "[0.5, 0.2]"  # two-worker trials take ~25 s to start
    cmd = [sys.executable, "-m", "pipelines", "sweep", "--work-dir", str(work), "--set", "ray.num_cpus=2",
           "--set", f"sweep.space={{temperature: {{grid: {temps}}}}}", "--set", "sweep.epochs=3",
           "--set", f"sweep.workers_per_trial={workers}", "--set", f"sweep.cpus_per_trial={workers}",
           "--set", "sweep.max_concurrent_trials=1", "--set", "pretrain.batch_size_per_worker=32"]
    first_checkpoint = "sweep-*/trial_00000*/checkpoint_000001" if workers == 1 else "sweep-*/train/trial_00000*/checkpoint_2*"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            cwd=Path(__file__).parents[1])
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list((work / "ray_results").glob(first_checkpoint)):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            time.sleep(1)
        assert time.time() < deadline, "the first trial never checkpointed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started (its session)
        proc.wait()
        log.close()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming the interrupted sweep" in out.stdout
    assert f"{3 if workers == 1 else 2} trials ranked" in out.stdout
    if workers == 2:
        assert "[pretrain] resumed from checkpoint at epoch" in out.stdout + out.stderr


@pytest.mark.slow
def test_two_worker_trials_sampled_by_optuna(tmp_path, local_ray):  # noqa: F811
    """Trials on their own TorchTrainer (two Ray Train workers each, splitting the
    epoch's batches) with temperatures drawn by Optuna from a uniform range."""
    from cl_core.data.reader import plan_epoch
    from cl_core.data.shards import read_manifest, shard_urls

    work = tmp_path / "work"
    assert main(["sweep", "--work-dir", str(work), "--set", "sweep.search=optuna", "--set", "sweep.num_samples=2",
                 "--set", "sweep.space={temperature: {uniform: [0.1, 1.0]}}", "--set", "sweep.epochs=1",
                 "--set", "sweep.workers_per_trial=2", "--set", "sweep.cpus_per_trial=2",
                 "--set", "pretrain.batch_size_per_worker=32"]) == 0
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("clpipe").experiment_id
    sw = _latest_children(client, exp_id)["sweep"]
    trials = _runs(client, exp_id, sw.info.run_id)
    temps = sorted(float(t.data.params["temperature"]) for t in trials)
    assert len(temps) == 2 and temps[0] != temps[1] and all(0.1 <= t <= 1.0 for t in temps)
    assert all(0 < t.data.metrics["val/knn_top1"] <= 1 for t in trials)
    # each trial's Train run: named after the trial, its last checkpoint made by two workers
    exp_dir = Path(tracking.load_outputs(sw.info.run_id)["experiment_dir"])
    runs = sorted(p for p in (exp_dir / "train").iterdir() if p.is_dir())
    assert [p.name for p in runs] == sorted(t.info.run_name for t in trials)
    shard_dir = tracking.load_outputs(_latest_children(client, exp_id)["shard"].info.run_id)["shard_dir"]
    _, counts = shard_urls(shard_dir, read_manifest(shard_dir), "train")
    workers = load_config().pretrain.loader_workers
    steps = {w: plan_epoch(counts, world_size=w, loader_workers=workers, batch_size=32, epoch=0, seed=0).steps
             for w in (1, 2)}
    assert steps[2] < steps[1]
    for run in runs:
        ckpt = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())[-1]
        assert json.loads((ckpt / "config.json").read_text())["metrics"]["step"] == steps[2]
