"""Faults a cluster has, on a real local Ray, in the work dir of the session's
uninterrupted chain run (the ``chain`` fixture) and against it as the reference. The
training stages run again with other checkpoint intervals and ``max_failures: 1`` (their
cache keys change; their results must not), everything upstream served from the cache:

0. a pretrain worker SIGKILLed in epoch 2: Ray Train restarts the group, which resumes
   from the last registered checkpoint; its final checkpoint (weights, optimizer, random
   generators, running sums) equals the reference's;
1. a distill worker SIGKILLed in the first student's first epoch: restarted and resumed
   the same way; a worker SIGKILLed again in the second epoch: the restart budget is
   spent and the run fails with one line naming the stage and the checkpoint;
2. the same command again, as its own driver process joined to the cluster: every
   upstream stage comes from the cache and distill resumes the student from that
   checkpoint; then the driver itself is SIGKILLed later in the same epoch;
3. the same command once more: distill resumes from the dead driver's last checkpoint and
   finishes both students.

The end result equals the reference's pretrain and distill metrics (the resume
is exact: model, optimizer, schedule, method state and the position in the epoch's data
come back from the checkpoint, and how often checkpoints are taken changes nothing). A
worker is killed only once Ray Train has registered a checkpoint past the point being
tested, the earliest moment that proves a resume from the middle of an epoch. Distill
trains several models in one run, so it carries the driver-death part: its resume has
the most to get right.
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
from tests.conftest import cmdline, latest_children, mlflow_client, outputs, recomputed

pytestmark = pytest.mark.slow  # on one xdist process with the chain fixture: tests/conftest.py LANES

ROOT = Path(__file__).parents[2]
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


def _train_workers() -> list[int]:
    """The Ray Train worker processes of this process's local Ray (not their DataLoader
    workers, which are forks that carry the same process title)."""
    tree = _descendants(os.getpid())
    named = {p for p in tree if b"RayTrainWorker" in cmdline(p)}
    return sorted(p for p in named if tree[p] not in named)


def _registered_position(work: Path, stage: str, skip: set[Path]) -> str | None:
    """The loop position of ``stage``'s latest checkpoint that Ray Train has registered
    (its controller collects the workers' reports every poll: a checkpoint on disk that
    is not yet in ``checkpoint_manager_snapshot.json`` is not the one a restart uses),
    in a Train run not in ``skip`` (the reference's)."""
    for run in set((work / "ray_results").glob(f"{stage}-*")) - skip:
        try:
            snap = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
            name = snap["latest_checkpoint_result"]["checkpoint_dir_name"]
            return json.loads((run / name / "checkpoint.json").read_text())["position"]
        except (OSError, ValueError, KeyError, TypeError):  # not yet written, or being written
            continue
    return None


def _step(position: str) -> int:
    """The step of a loop position, "... (step N)"."""
    return int(position.rsplit("(step ", 1)[1].split(")")[0])


def _wait_for_checkpoint(
    work: Path, stage: str, inside: str, running, after_step: int, skip: set[Path], timeout: float = 400
) -> str:
    """Wait until ``stage`` has a registered checkpoint whose position contains ``inside``
    and whose step is past ``after_step``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        position = _registered_position(work, stage, skip)
        if position is not None and inside in position and _step(position) > after_step:
            return position
        assert running(), f"the run ended before {stage} checkpointed at {inside!r} after step {after_step}"
        time.sleep(0.2)
    raise AssertionError(f"{stage} never checkpointed at {inside!r} after step {after_step} within {timeout} s")


def _kill_a_train_worker() -> int:
    workers = _train_workers()
    assert len(workers) == 2, f"expected 2 Ray Train workers, found {workers}"
    os.kill(workers[-1], signal.SIGKILL)
    return workers[-1]


class Killer(threading.Thread):
    """Beside an in-process run: at each (stage, position) in turn, wait for a checkpoint
    there (past the one seen before), then SIGKILL one of the two Train workers; records
    the positions seen."""

    def __init__(self, work: Path, points: list[tuple[str, str]], skip: set[Path]) -> None:
        super().__init__(daemon=True)
        self.work, self.points, self.skip, self.seen = work, points, skip, []
        self.error: BaseException | None = None
        self.finished = threading.Event()  # set by the test when the run returns

    def run(self) -> None:
        try:
            for stage, inside in self.points:
                after = _step(self.seen[-1]) if self.seen else -1
                self.seen.append(
                    _wait_for_checkpoint(self.work, stage, inside, lambda: not self.finished.is_set(), after, self.skip)
                )
                _kill_a_train_worker()
        except BaseException as e:  # noqa: BLE001 - re-raised by the test
            self.error = e


def _metrics(run) -> dict[str, float]:
    return {k: v for k, v in run.data.metrics.items() if not k.endswith(TIMING) and not k.startswith("system/")}


def _final_state(client, run) -> dict:
    """The loop state in a training stage run's final checkpoint."""
    import torch

    ckpt = Path(outputs(client, run.info.run_id)["checkpoint_dir"])
    return torch.load(ckpt / "state.pt", weights_only=True)


def _killed_in_process(work: Path, args: list[str], points: list[tuple[str, str]], skip: set[Path], capsys):
    """Run ``args`` in this process with a :class:`Killer` beside it: (rc, stdout, stderr, positions seen)."""
    killer = Killer(work, points, skip)
    killer.start()
    try:
        rc = main(args)
    finally:
        killer.finished.set()
        killer.join(timeout=30)
    if killer.error is not None:
        raise killer.error
    out = capsys.readouterr()
    return rc, out.out, out.err, killer.seen


def test_worker_and_driver_deaths_resume_exactly(chain, local_ray, tmp_path, capsys):
    work = chain.work
    reference = {stage: set((work / "ray_results").glob(f"{stage}-*")) for stage in ("pretrain", "distill")}
    # other checkpoint intervals and restart budgets: new cache keys for the training stages, the same results
    pretrain = ["--set", "pretrain.checkpoint_every_steps=3", "--set", "pretrain.max_failures=1"]

    # 0. a pretrain worker dies in epoch 2: the group is restarted and resumes
    rc, out, err, seen = _killed_in_process(
        work,
        [*chain.args, *pretrain, "--until", "pretrain"],
        [("pretrain", "epoch 2, batch")],
        reference["pretrain"],
        capsys,
    )
    assert rc == 0, out[-3000:] + err[-3000:]
    assert out.count("cached, reusing run") == 1, out[-3000:]  # shard
    resumed = [ln for ln in out.splitlines() if "[pretrain] resumed from checkpoint at epoch " in ln]
    assert len(resumed) == 1, out[-4000:]
    # nothing checkpointed before the kill was lost
    assert int(resumed[0].split(", step ", 1)[1].split()[0].rstrip(",")) >= _step(seen[0]), (seen, resumed)
    client, exp = mlflow_client(work)
    computed = latest_children(client, exp)
    assert recomputed(computed) == {"pretrain"}
    # a restart within the run is no resume of an interrupted one: its stage/seconds is the whole stage's
    assert tracking.TAG_RESUMED not in computed["pretrain"].data.tags
    # the final checkpoint is the reference's: position and schedule exactly; weights, optimizer and every
    # rank's running sums to float rounding (as the metrics); every rank's generator (uint8) exactly
    import torch

    got, want = (_final_state(client, r) for r in (computed["pretrain"], chain.runs["pretrain"]))
    exact = ("epoch", "step", "batch_in_epoch", "scheduler")
    assert {k: got.pop(k) for k in exact} == {k: want.pop(k) for k in exact}
    del got["epoch_seconds"], want["epoch_seconds"]  # wall clock
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    # the distill phases on the reference's pretrain and fine-tuning (from the cache)
    args = [*chain.args, "--set", "distill.checkpoint_every_steps=3", "--set", "distill.max_failures=1", *UNTIL]
    # 1. a distill worker dies in the first student's first epoch and the group is restarted; one dies
    # again in its second epoch and the run fails
    rc, out, err, seen = _killed_in_process(
        work,
        args,
        [("distill", "student_1pct: epoch 1, batch"), ("distill", "student_1pct: epoch 2, batch")],
        reference["distill"],
        capsys,
    )
    assert rc == 1, out[-3000:] + err[-3000:]
    assert out.count("cached, reusing run") == 4, out[-3000:]  # shard, labels, pretrain, finetune
    first_seen, second_seen = seen
    resumed = [ln for ln in out.splitlines() if "[distill] student_1pct: resumed from checkpoint at epoch 1" in ln]
    assert len(resumed) == 1, out[-4000:]
    assert _step(resumed[0]) >= _step(first_seen), (first_seen, resumed)  # nothing checkpointed before the kill lost
    failed = [ln for ln in err.splitlines() if ln.startswith("clpipe: stage")]
    assert len(failed) == 1, err[-3000:]  # (Ray's controller also logs the worker's death)
    assert "stage distill failed: TrainingFailed: distill: a training worker died (rank " in failed[0]
    assert "after 1 restart(s)" in failed[0], failed[0]
    assert (
        f"the last checkpoint is {work / 'ray_results'}" in failed[0] and "(student_1pct: epoch 2, batch" in failed[0]
    )
    assert "rerunning the same command resumes from it" in failed[0]
    wait_until(lambda: not _train_workers(), 60, "the failed run's Train workers to exit")

    # 2. rerun as a driver process of its own on the same cluster; SIGKILL it later in the same epoch
    # (still in the first student: the stage's MLflow run holds the histories of the models it
    # trained itself)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "AWS_"))}
    log_path = tmp_path / "second.log"
    # the failed run's surviving rank may have registered a checkpoint past the one the kill was
    # seen at: the rerun must be killed at one it wrote itself, after it resumed
    left = _registered_position(work, "distill", reference["distill"])
    after = max(_step(second_seen), _step(left) if left is not None else 0)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines", *args, "--set", f"ray.address={local_ray}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**env, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
            cwd=ROOT,
        )
        try:
            wait_until(
                lambda: (
                    "[distill] student_1pct: resumed from checkpoint" in log_path.read_text() or proc.poll() is not None
                ),
                400,
                "the rerun to resume distill",
            )
            _wait_for_checkpoint(
                work,
                "distill",
                "student_1pct: epoch 2, batch",
                lambda: proc.poll() is None,
                after,
                reference["distill"],
            )
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver only: the cluster's processes are not in its session
            proc.wait()
    second = log_path.read_text()
    assert second.count("cached, reusing run") == 4, second[-3000:]
    resumed = [
        ln for ln in second.splitlines() if "[distill] student_1pct: resumed from checkpoint at epoch 2, batch" in ln
    ]
    assert len(resumed) == 1 and _step(resumed[0]) >= _step(second_seen), (second_seen, second[-3000:])
    wait_until(lambda: not _train_workers(), 60, "the dead driver's Train workers to exit")

    # 3. once more: distill resumes from the dead driver's last checkpoint and finishes
    assert main(args) == 0
    third = capsys.readouterr().out
    assert third.count("cached, reusing run") == 4, third[-3000:]
    assert "[distill] student_1pct: resumed from checkpoint at epoch 2, batch" in third, third[-3000:]
    final = latest_children(client, exp)
    assert recomputed(final) == {"distill"}
    # the run says it continued another's checkpoint (so its stage/seconds is only the rest of the stage)
    assert final["distill"].data.tags[tracking.TAG_RESUMED].startswith(str(work / "ray_results" / "distill-"))
    computed["distill"] = final["distill"]

    # the result: the reference's metrics (every model, every epoch's last value)
    for stage in ("pretrain", "distill"):
        got, want = _metrics(computed[stage]), _metrics(chain.runs[stage])
        assert set(got) == set(want), f"{stage}: {sorted(set(got) ^ set(want))}"
        for k, v in want.items():
            assert math.isclose(got[k], v, rel_tol=1e-4, abs_tol=1e-6), f"{stage}: {k} {got[k]} != {v}"
