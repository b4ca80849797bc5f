"""Servers that do not answer: `clpipe run` stops with one line naming the setting and
the address, within a bounded time, instead of retrying for minutes."""

from __future__ import annotations

import time

import pytest

from infra import procs
from pipelines.cli import main

pytestmark = pytest.mark.usefixtures("without_ray")  # each run below starts (or fails to join) a Ray of its own


@pytest.mark.parametrize(
    "setting,message",
    [
        (
            "mlflow.tracking_uri=http://127.0.0.1:{port}",
            "mlflow.tracking_uri: the MLflow server http://127.0.0.1:{port} does not answer",
        ),
        ("ray.address=127.0.0.1:{port}", "ray.address: no Ray cluster answers at 127.0.0.1:{port}"),
    ],
)
def test_a_server_that_does_not_answer(tmp_path, capsys, setting, message):
    port = procs.free_port()
    t0 = time.monotonic()
    assert main(["run", "--work-dir", str(tmp_path), "--set", setting.format(port=port)]) == 1
    err = capsys.readouterr().err.strip()
    assert message.format(port=port) in err and len(err.splitlines()) == 1
    assert time.monotonic() - t0 < 30


def test_an_s3_endpoint_that_does_not_answer(tmp_path, capsys, monkeypatch):
    """Checked with every other S3 location before Ray starts (no stage runs)."""
    import ray

    port = procs.free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "clpipe-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "clpipe-secret-value")
    t0 = time.monotonic()
    assert (
        main(["run", "--work-dir", str(tmp_path), "--set", "ray.num_cpus=1", "--set", "data.output=s3://clpipe/shards"])
        == 1
    )
    assert not ray.is_initialized()
    out, err = capsys.readouterr()
    err = err.strip()
    assert (
        f"s3://clpipe/shards: cannot reach the S3 endpoint http://127.0.0.1:{port}" in err
        and len(err.splitlines()) == 1
    )
    assert "clpipe-secret-value" not in err and "stage shard" not in out
    assert time.monotonic() - t0 < 60
