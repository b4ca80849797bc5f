"""Leases (pipelines/leases.py): one holder at a time for a stage key or a registry
name. The file lease across processes (and its release when the holder dies); the
pipeline's second run of a stage key waits for the first and takes its result from the
cache. The S3 lease runs against SeaweedFS in tests/pipelines/test_s3.py."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest

from pipelines import leases


def _hold(root: str, name: str, seconds: float, ready) -> None:
    with leases.lease(root, name, say=lambda m: None):
        ready.set()
        time.sleep(seconds)


def test_a_file_lease_has_one_holder_and_dies_with_it(tmp_path):
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path), "shard-abc", 60, ready))
    holder.start()
    try:
        assert ready.wait(30)
        said: list[str] = []
        with pytest.raises(leases.LeaseTimeout, match=rf"shard-abc: held by another run \(pid {holder.pid} on "):
            with leases.lease(str(tmp_path), "shard-abc", wait_s=1.5, say=said.append):
                pass
        assert len(said) == 1 and "waiting for it to finish" in said[0]
        with leases.lease(str(tmp_path), "other-name", wait_s=0, say=said.append) as waited:  # another name: free
            assert waited is False
        os.kill(holder.pid, signal.SIGKILL)  # the holder dies: the kernel drops its lock
        holder.join(10)
        t0 = time.monotonic()
        with leases.lease(str(tmp_path), "shard-abc", wait_s=10, say=said.append):
            assert time.monotonic() - t0 < 5
    finally:
        if holder.is_alive():
            holder.kill()


def test_a_second_run_of_a_stage_key_waits_and_reuses_the_first_ones_result(tmp_path, capsys):
    """Two runs of the same config at once (real MLflow store, the stages' work replaced as
    in tests/pipelines/test_graph.py): the first computes the shard stage while holding its lease;
    the second finds no cached run, waits on the lease, then takes the first one's result
    from the cache instead of computing the same key into the same output dir."""
    import dataclasses
    import json

    from pipelines import tracking
    from pipelines.config import load_config
    from pipelines.graph import run_pipeline
    from pipelines.stages import STAGES

    work = tmp_path / "work"
    work.mkdir()
    tracking.quiet()
    exp_id = tracking.setup(f"sqlite:///{work / 'mlflow.db'}", "clpipe", None)
    computing, finish = threading.Event(), threading.Event()
    calls: list[str] = []

    def shard(ctx, section, inputs):
        calls.append(ctx.run_id)
        computing.set()
        assert finish.wait(60)
        (ctx.output_dir / "data").write_text(json.dumps(section.model_dump(mode="json")))
        return {"out_dir": str(ctx.output_dir)}

    stages = [dataclasses.replace(s, fn=shard) if s.name == "shard" else s for s in STAGES]
    cfg = load_config(overrides=["sweep.enabled=false", f"work_dir={work}"])
    results: dict = {}

    def run(name: str) -> None:
        results[name] = run_pipeline(cfg, stages, experiment_id=exp_id, until="shard")

    first = threading.Thread(target=run, args=("first",))
    first.start()
    assert computing.wait(30)
    second = threading.Thread(target=run, args=("second",))
    second.start()
    time.sleep(2.5)
    assert second.is_alive()  # waiting on the shard key's lease
    finish.set()
    first.join(30)
    second.join(30)
    assert len(calls) == 1  # computed once
    a, b = results["first"].stages["shard"], results["second"].stages["shard"]
    assert not a.cached and b.cached and b.run_id == a.run_id
    out = capsys.readouterr().out
    assert "another run holds it" in out and "waiting for it to finish" in out
