"""Faults a cluster has, on a real local Ray, against the session's uninterrupted run of
the same chain (the ``chain`` fixture, same config and seed) as the reference:

1. a pretrain worker SIGKILLed in its second epoch (``max_failures: 1``): Ray Train
   restarts the group from the last registered checkpoint; then a distill worker
   SIGKILLed (``max_failures: 0``): the run fails with one line naming the stage and the
   checkpoint;
2. the same command again, as its own driver process joined to the cluster: every
   finished stage comes from the cache and distill resumes its first student from that
   checkpoint; then the driver itself is SIGKILLed in that student's second epoch;
3. the same command once more: distill resumes from the dead driver's last checkpoint and
   finishes both students.

The end result equals the reference: the same shards and label subsets byte for byte, and
the same metrics for pretrain, finetune and distill (the resume is exact: model,
optimizer, schedule, method state and the position in the epoch's data come back from
the checkpoint). A worker is killed only once Ray Train has registered a checkpoint past
the point being tested, the earliest moment that proves a resume from the middle of an
epoch.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from infra.procs import wait_until
from pipelines import tracking
from pipelines.cli import main
from tests.conftest import TINY, latest_children, mlflow_client, outputs, recomputed

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("chain")]

ROOT = Path(__file__).parents[1]
UNTIL = ["--until", "distill"]
TIMING = ("per_sec", "seconds")  # wall-clock metrics differ between runs


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


def _train_workers() -> list[int]:
    """The Ray Train worker processes of this process's local Ray (not their DataLoader
    workers, which are forks that carry the same process title)."""
    tree = _descendants(os.getpid())
    named = {p for p in tree if b"RayTrainWorker" in _cmdline(p)}
    return sorted(p for p in named if tree[p] not in named)


def _registered_position(work: Path, stage: str) -> str | None:
    """The loop position of ``stage``'s latest checkpoint that Ray Train has registered
    (its controller collects the workers' reports every poll: a checkpoint on disk that
    is not yet in ``checkpoint_manager_snapshot.json`` is not the one a restart uses)."""
    for run in (work / "ray_results").glob(f"{stage}-*"):
        try:
            snap = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
            name = snap["latest_checkpoint_result"]["checkpoint_dir_name"]
            return json.loads((run / name / "checkpoint.json").read_text())["position"]
        except (OSError, ValueError, KeyError, TypeError):  # not yet written, or being written
            continue
    return None


def _wait_for_checkpoint(work: Path, stage: str, inside: str, running, timeout: float = 400) -> str:
    """Wait until ``stage`` has a registered checkpoint whose position contains ``inside``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        position = _registered_position(work, stage)
        if position is not None and inside in position:
            return position
        assert running(), f"the run ended before {stage} checkpointed at {inside!r}"
        time.sleep(0.2)
    raise AssertionError(f"{stage} never checkpointed at {inside!r} within {timeout} s")


def _kill_a_train_worker() -> int:
    workers = _train_workers()
    assert len(workers) == 2, f"expected 2 Ray Train workers, found {workers}"
    os.kill(workers[-1], signal.SIGKILL)
    return workers[-1]


class Killer(threading.Thread):
    """Beside an in-process run: at each (stage, position) in turn, wait for that
    checkpoint, then SIGKILL one of the two Train workers; records the positions seen."""

    def __init__(self, work: Path, points: list[tuple[str, str]]) -> None:
        super().__init__(daemon=True)
        self.work, self.points, self.seen = work, points, []
        self.error: BaseException | None = None
        self.finished = threading.Event()  # set by the test when the run returns

    def run(self) -> None:
        try:
            for stage, inside in self.points:
                self.seen.append(_wait_for_checkpoint(self.work, stage, inside, lambda: not self.finished.is_set()))
                _kill_a_train_worker()
        except BaseException as e:  # noqa: BLE001 - re-raised by the test
            self.error = e


def _step(position: str) -> int:
    """The step of a loop position, "... (step N)"."""
    return int(position.rsplit("(step ", 1)[1].split(")")[0])


def _computed(work: Path, stage: str):
    """The one finished run that computed ``stage`` (not served from the cache)."""
    client, exp = mlflow_client(work)
    runs = client.search_runs([exp], filter_string=f"tags.`{tracking.TAG_STAGE}` = '{stage}' and "
                              f"tags.`{tracking.TAG_CACHE_HIT}` = 'false' and attributes.status = 'FINISHED'")
    assert len(runs) == 1, f"{stage}: {len(runs)} finished computing runs"
    return runs[0]


def _metrics(run) -> dict[str, float]:
    return {k: v for k, v in run.data.metrics.items() if not k.endswith(TIMING)}


def test_worker_and_driver_deaths_resume_exactly(chain, local_ray, tmp_path, capsys):
    work = tmp_path / "work"
    args = ["run", "--work-dir", str(work), *TINY, *UNTIL]

    # 1. a pretrain worker dies in epoch 2 and is restarted; a distill worker dies and the run fails
    killer = Killer(work, [("pretrain", "epoch 2, batch"), ("distill", "student_1pct: epoch 1, batch")])
    killer.start()
    try:
        rc = main(args)
    finally:
        killer.finished.set()
        killer.join(timeout=30)
    if killer.error is not None:
        raise killer.error
    out = capsys.readouterr()
    assert rc == 1, out.out[-3000:] + out.err[-3000:]
    pretrain_seen, distill_seen = killer.seen
    resumed = [ln for ln in out.out.splitlines() if "[pretrain] resumed from checkpoint" in ln]
    assert len(resumed) == 1, out.out[-4000:]
    # nothing before the checkpoint seen before the kill was lost
    assert int(resumed[0].split(" step ", 1)[1].split()[0].rstrip(",")) >= _step(pretrain_seen), (pretrain_seen, resumed)
    err = [ln for ln in out.err.splitlines() if ln.startswith("clpipe: stage")]
    assert len(err) == 1, out.err[-3000:]  # (Ray's controller also logs the worker's death)
    assert "stage distill failed: TrainingFailed: distill: a training worker died (rank " in err[0]
    assert "set distill.max_failures >= 1 to restart automatically" in err[0]
    assert f"the last checkpoint is {work / 'ray_results'}" in err[0] and "(student_1pct: epoch 1, batch" in err[0]
    assert "rerunning the same command resumes from it" in err[0]
    wait_until(lambda: not _train_workers(), 60, "the failed run's Train workers to exit")

    # 2. rerun as a driver process of its own on the same cluster; SIGKILL it in the student's second
    # epoch (early in it: the workers outlive their driver by a moment, and the stage's MLflow run
    # holds the histories of the models it trained itself)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "AWS_"))}
    log_path = tmp_path / "second.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines", *args, "--set", f"ray.address={local_ray}"],
                                stdout=log, stderr=subprocess.STDOUT, env={**env, "PYTHONUNBUFFERED": "1"},
                                start_new_session=True, cwd=ROOT)
        try:
            _wait_for_checkpoint(work, "distill", "student_1pct: epoch 2, batch", lambda: proc.poll() is None)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver only: the cluster's processes are not in its session
            proc.wait()
    second = log_path.read_text()
    assert second.count("cached, reusing run") == 4, second[-3000:]  # shard, labels, pretrain, finetune
    resumed = [ln for ln in second.splitlines() if "[distill] student_1pct: resumed from checkpoint at epoch 1, batch" in ln]
    assert len(resumed) == 1 and _step(resumed[0]) >= _step(distill_seen), (distill_seen, second[-3000:])
    wait_until(lambda: not _train_workers(), 60, "the dead driver's Train workers to exit")

    # 3. once more: distill resumes from the dead driver's last checkpoint and finishes
    assert main(args) == 0
    third = capsys.readouterr().out
    assert third.count("cached, reusing run") == 4, third[-3000:]
    assert "[distill] student_1pct: resumed from checkpoint at epoch 2, batch" in third, third[-3000:]
    client, exp = mlflow_client(work)
    assert recomputed(latest_children(client, exp)) == {"distill"}

    # the result: the reference's shards, label subsets and metrics
    def manifest(client, run, key: str = "shard_dir") -> dict:
        return json.loads((Path(outputs(client, run.info.run_id)[key]) / "manifest.json").read_text())

    ref = chain.runs
    ma, mb = manifest(client, _computed(work, "shard")), manifest(chain.client, ref["shard"])
    for split in ("train", "val", "test"):  # the same shards, in the same order, byte for byte
        assert ma["splits"][split]["shards"] == mb["splits"][split]["shards"]
    sa = outputs(client, _computed(work, "labels").info.run_id)["subsets"]
    sb = outputs(chain.client, ref["labels"].info.run_id)["subsets"]
    assert sa.keys() == sb.keys() == {"1pct", "10pct"}
    for name in sa:
        xa = json.loads((Path(sa[name]["shard_dir"]) / "manifest.json").read_text())
        xb = json.loads((Path(sb[name]["shard_dir"]) / "manifest.json").read_text())
        assert xa["splits"]["train"]["shards"] == xb["splits"]["train"]["shards"]
    for stage in ("pretrain", "finetune", "distill"):
        got, want = _metrics(_computed(work, stage)), _metrics(ref[stage])
        assert set(got) == set(want), f"{stage}: {sorted(set(got) ^ set(want))}"
        for k, v in want.items():
            assert math.isclose(got[k], v, rel_tol=1e-4, abs_tol=1e-6), f"{stage}: {k} {got[k]} != {v}"
