"""An MLflow server outage in the middle of training, on a real local Ray and a real
MLflow server (stopped and started again by pid): training goes on, rank 0 keeps what it
cannot send, and every metric arrives once the server is back."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from infra.procs import wait_until
from pipelines.cli import main

pytestmark = pytest.mark.slow  # one xdist process runs it in its lane: tests/conftest.py LANES


def _mlflow_server(db: Path, port: int, log: Path) -> int:
    from infra import procs

    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{db}",
        "--default-artifact-root",
        (db.parent / "artifacts").as_uri(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    pid = procs.spawn(cmd, log, env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"})
    procs.wait_until(lambda: procs.http_ok(f"http://127.0.0.1:{port}/health"), 120, "MLflow server", pid, log)
    return pid


def test_an_mlflow_outage_during_pretrain_delays_its_metrics_and_loses_none(local_ray, tmp_path, capsys):
    """The tracking server stops after pretrain's first epoch and comes back later: the
    training workers keep training (rank 0 keeps what it cannot send), the stage
    finishes, and every epoch's metrics reach the restarted server."""
    from mlflow.tracking import MlflowClient

    from infra import procs

    port = procs.free_port()
    uri = f"http://127.0.0.1:{port}"
    db, log = tmp_path / "mlflow" / "mlflow.db", tmp_path / "mlflow.log"
    db.parent.mkdir()
    pid = _mlflow_server(db, port, log)
    epochs = 8
    result: dict = {}

    def run() -> None:
        result["rc"] = main(
            [
                "run",
                "--work-dir",
                str(tmp_path / "work"),
                "--until",
                "pretrain",
                "--set",
                f"mlflow.tracking_uri={uri}",
                "--set",
                "sweep.enabled=false",
                "--set",
                f"pretrain.epochs={epochs}",
                "--set",
                "pretrain.num_workers=1",
                "--set",
                "pretrain.batch_size_per_worker=64",
            ]
        )

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        client = MlflowClient(uri)

        def first_epoch_logged() -> bool:
            assert t.is_alive(), "the run ended before pretrain's first epoch was logged"
            exp = client.get_experiment_by_name("clpipe")
            runs = client.search_runs([exp.experiment_id], "tags.`clpipe.stage` = 'pretrain'") if exp else []
            return bool(runs) and "epoch" in runs[0].data.metrics

        seen: set[str] = set()

        def checkpoints() -> int:  # epoch-end checkpoints Ray Train has written so far (it keeps only the last)
            seen.update(c.name for c in (tmp_path / "work" / "ray_results").glob("*/checkpoint_*"))
            return len(seen)

        wait_until(first_epoch_logged, 300, "pretrain's first epoch in MLflow")
        procs.stop(pid)  # the server goes away mid-training
        down, at_down = time.time() * 1000, checkpoints()
        # it stays away while two more epochs end (their timing varies with the machine's load)
        wait_until(lambda: checkpoints() >= at_down + 2 or not t.is_alive(), 300, "two epochs during the outage")
        pid = _mlflow_server(db, port, log)  # and comes back
        up = time.time() * 1000
        t.join(timeout=400)
        assert not t.is_alive() and result["rc"] == 0, capsys.readouterr()
        out = capsys.readouterr().out
        assert "is not taking metrics" in out and "the kept metrics are sent" in out, out[-3000:]
        exp = client.get_experiment_by_name("clpipe")
        pre = client.search_runs([exp.experiment_id], "tags.`clpipe.stage` = 'pretrain'")[0]
        assert pre.info.status == "FINISHED"
        history = client.get_metric_history(pre.info.run_id, "epoch")
        assert [m.step for m in history] == list(range(1, epochs + 1))  # every epoch arrived
        # and training went on while the server was down: epochs ended (and were stamped) in the outage
        # (a worker blocked in MLflow's own retries would have ended at most one there)
        during = [m.step for m in history if down < m.timestamp < up]
        assert len(during) >= 2, (during, (up - down) / 1000)
        assert "clpipe.train.node_ips" in pre.data.tags
    finally:
        procs.stop(pid)
