"""Faults a cluster has, on a real local Ray: a training worker SIGKILLed mid-epoch (in
pretrain and in distill), the pipeline driver SIGKILLed mid-stage, and the same config
and seed run twice. Every run is a ``python -m pipelines run`` process in its own
session (it starts its own local Ray); a run is killed by its process group.

The reference is one uninterrupted run; the faulted runs must end with the same step
counts and the same metrics (the resume is exact: model, optimizer, schedule, method
state and the position in the epoch's data come back from the checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines import tracking

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
CONFIG = ["--set", "sweep.enabled=false", "--set", "ray.num_cpus=2", "--set", "labels.fractions=[0.1]",
          "--set", "pretrain.epochs=2", "--set", "pretrain.checkpoint_every_steps=4", "--set", "pretrain.max_failures=1",
          "--set", "finetune.epochs=2", "--set", "finetune.min_steps=0", "--set", "finetune.baseline=false",
          "--set", "distill.epochs=1", "--set", "distill.checkpoint_every_steps=4", "--set", "distill.max_failures=1"]
UNTIL = ["--until", "distill"]
TIMING = ("per_sec", "seconds")  # wall-clock metrics differ between runs


def _cmd(work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipelines", "run", "--work-dir", str(work), *CONFIG, *extra]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "AWS_"))}
    return {**env, "PYTHONUNBUFFERED": "1"}


def _run(work: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(work, *extra), capture_output=True, text=True, env=_env(), timeout=900, cwd=ROOT)


def _descendants(pid: int) -> dict[int, int]:
    """{pid: parent pid} of every process below ``pid`` (from /proc)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out: dict[int, int] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        for c, pp in parent.items():
            if pp == p and c not in out:
                out[c] = pp
                todo.append(c)
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _train_workers(driver: int) -> list[int]:
    """The Ray Train worker processes the driver's Ray started (not their DataLoader
    workers, which are forks that carry the same process title)."""
    tree = _descendants(driver)
    named = {p for p in tree if b"RayTrainWorker" in _cmdline(p)}
    return sorted(p for p in named if tree[p] not in named)


def _registered_position(work: Path, stage: str) -> str | None:
    """The loop position of ``stage``'s latest checkpoint that Ray Train has registered
    (its controller collects the workers' reports every ~2 s: a checkpoint on disk that
    is not yet in ``checkpoint_manager_snapshot.json`` is not the one a restart uses)."""
    for run in (work / "ray_results").glob(f"{stage}-*"):
        try:
            snap = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
            name = snap["latest_checkpoint_result"]["checkpoint_dir_name"]
            return json.loads((run / name / "checkpoint.json").read_text())["position"]
        except (OSError, ValueError, KeyError, TypeError):  # not yet written, or being written
            continue
    return None


class Run:
    """A pipeline process in its own session, watched and killed by the test."""

    def __init__(self, work: Path, log: Path, *extra: str) -> None:
        self.work, self.log_path = work, log
        self.log = open(log, "w")  # noqa: SIM115 - closed in wait/kill
        self.proc = subprocess.Popen(_cmd(work, *extra), stdout=self.log, stderr=subprocess.STDOUT, env=_env(),
                                     start_new_session=True, cwd=ROOT)

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_for_checkpoint(self, stage: str, inside: str, timeout: float = 400) -> str:
        """Wait until ``stage`` has a checkpoint whose position contains ``inside``."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            position = _registered_position(self.work, stage)
            if position is not None and inside in position:
                return position
            assert self.proc.poll() is None, f"the run ended before {stage} checkpointed at {inside!r}:\n" + \
                self.output()[-3000:]
            time.sleep(0.2)
        raise AssertionError(f"{stage} never checkpointed at {inside!r}:\n" + self.output()[-3000:])

    def kill_a_train_worker(self) -> int:
        workers = _train_workers(self.proc.pid)
        assert len(workers) == 2, f"expected 2 Ray Train workers, found {workers}"
        os.kill(workers[-1], signal.SIGKILL)
        return workers[-1]

    def kill_driver(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the driver and the Ray it started (its session)
        self.proc.wait()
        self.log.close()

    def wait(self, timeout: float = 900) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.log.close()


def _client(work: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    return client, client.get_experiment_by_name("clpipe").experiment_id


def _computed(work: Path, stage: str):
    """The run that computed ``stage`` (finished, not served from the cache)."""
    client, exp = _client(work)
    runs = client.search_runs([exp], filter_string=f"tags.`{tracking.TAG_STAGE}` = '{stage}' and "
                              f"tags.`{tracking.TAG_CACHE_HIT}` = 'false' and attributes.status = 'FINISHED'")
    assert len(runs) == 1, f"{stage}: {len(runs)} finished computing runs"
    return runs[0]


def _metrics(work: Path, stage: str) -> dict[str, float]:
    return {k: v for k, v in _computed(work, stage).data.metrics.items() if not k.endswith(TIMING)}


def _assert_same_metrics(work: Path, ref: Path, stage: str) -> None:
    got, want = _metrics(work, stage), _metrics(ref, stage)
    assert set(got) == set(want), f"{stage}: {sorted(set(got) ^ set(want))}"
    for k, v in want.items():
        assert math.isclose(got[k], v, rel_tol=1e-4, abs_tol=1e-6), f"{stage}: {k} {got[k]} != {v}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run of the chain up to distill."""
    work = tmp_path_factory.mktemp("reference") / "work"
    out = _run(work, *UNTIL)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return work


def test_killed_training_workers_restart_from_the_last_checkpoint(tmp_path, reference):
    """``max_failures: 1``: a Ray Train worker SIGKILLed in the second pretrain epoch, and
    another in the distillation epoch; each worker group restarts from the last
    registered checkpoint (nothing before it is lost; checkpoints come every 4 steps)
    and the stages end with the uninterrupted run's step counts and metrics."""
    run = Run(tmp_path / "work", tmp_path / "run.log", *UNTIL)
    seen = run.wait_for_checkpoint("pretrain", "epoch 2, batch")
    run.kill_a_train_worker()
    seen_distill = run.wait_for_checkpoint("distill", "epoch 1, batch")
    run.kill_a_train_worker()
    assert run.wait() == 0, run.output()[-4000:]
    out = run.output()
    resumed = [ln for ln in out.splitlines() if "resumed from checkpoint" in ln]
    assert len(resumed) == 2, out[-4000:]
    # nothing before the checkpoint seen before the kill was lost
    step_seen = int(seen.rsplit("(step ", 1)[1].rstrip(")"))
    step_resumed = int(resumed[0].split("step ", 1)[1].split()[0].rstrip(","))
    assert step_resumed >= step_seen, (seen, resumed[0])
    assert "[distill] student_10pct: resumed from checkpoint at epoch 1, batch" in resumed[1], (seen_distill, resumed)
    for stage in ("pretrain", "finetune", "distill"):
        _assert_same_metrics(tmp_path / "work", reference, stage)


def test_without_restarts_a_dead_worker_fails_then_reruns_resume(tmp_path, reference):
    """``max_failures: 0``: a dead worker fails pretrain with one line naming the stage
    and the checkpoint; rerunning resumes it. Then the driver itself is SIGKILLed in the
    middle of distill: the next rerun reuses every finished stage (no recompute) and
    resumes distill from its checkpoint. The end result equals the uninterrupted run's."""
    work = tmp_path / "work"
    no_restarts = ["--set", "pretrain.max_failures=0", "--set", "distill.max_failures=0"]
    run = Run(work, tmp_path / "first.log", *UNTIL, *no_restarts)
    run.wait_for_checkpoint("pretrain", "epoch 2, batch")
    run.kill_a_train_worker()
    assert run.wait() == 1
    err = [ln for ln in run.output().splitlines() if ln.startswith("clpipe: stage")]
    assert len(err) == 1, run.output()[-3000:]  # (Ray's controller also logs the worker's death)
    assert "stage pretrain failed: TrainingFailed: pretrain: a training worker died (rank " in err[0]
    assert "set pretrain.max_failures >= 1 to restart automatically" in err[0]
    assert f"the last checkpoint is {work / 'ray_results'}" in err[0] and "(epoch 2, batch" in err[0]
    assert "rerunning the same command resumes from it" in err[0]

    run = Run(work, tmp_path / "second.log", *UNTIL, *no_restarts)
    run.wait_for_checkpoint("distill", "epoch 1, batch")
    run.kill_driver()
    second = run.output()
    assert "[pretrain] resumed from checkpoint at epoch 1" in second, second[-3000:]

    out = _run(work, *UNTIL, *no_restarts)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert text.count("cached, reusing run") == 4, text[-3000:]  # shard, labels, pretrain, finetune
    assert "[distill] student_10pct: resumed from checkpoint at epoch 1, batch" in text, text[-3000:]
    client, exp = _client(work)
    parent = client.search_runs([exp], filter_string=f"tags.`{tracking.TAG_KIND}` = 'pipeline'",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    recomputed = {r.data.tags[tracking.TAG_STAGE] for r in children if r.data.tags[tracking.TAG_CACHE_HIT] == "false"}
    assert recomputed == {"distill"}
    for stage in ("pretrain", "finetune", "distill"):
        _assert_same_metrics(work, reference, stage)


def test_same_config_and_seed_give_the_same_shards_subsets_and_metrics(tmp_path, reference):
    work = tmp_path / "work"
    for until in ("pretrain", "labels"):
        out = _run(work, "--until", until)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for w in (work, reference):
        assert (w / "mlflow.db").exists()

    def outputs(w: Path, stage: str) -> dict:
        import mlflow

        run_id = _computed(w, stage).info.run_id
        mlflow.set_tracking_uri(f"sqlite:///{w / 'mlflow.db'}")
        try:
            return tracking.load_outputs(run_id)
        finally:
            mlflow.set_tracking_uri(None)

    a, b = outputs(work, "shard"), outputs(reference, "shard")
    ma = json.loads((Path(a["shard_dir"]) / "manifest.json").read_text())
    mb = json.loads((Path(b["shard_dir"]) / "manifest.json").read_text())
    for split in ("train", "val", "test"):  # the same shards, in the same order, byte for byte
        assert ma["splits"][split]["shards"] == mb["splits"][split]["shards"]
    sa, sb = outputs(work, "labels")["subsets"], outputs(reference, "labels")["subsets"]
    assert sa.keys() == sb.keys()
    for name in sa:
        xa = json.loads((Path(sa[name]["shard_dir"]) / "manifest.json").read_text())
        xb = json.loads((Path(sb[name]["shard_dir"]) / "manifest.json").read_text())
        assert xa["splits"]["train"]["shards"] == xb["splits"]["train"]["shards"]
    _assert_same_metrics(work, reference, "pretrain")
