from __future__ import annotations

import contextlib
import io
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)


def make_images(n: int, size: int = 12, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tiny RGB images whose class is a bright square at a class-specific place."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, size=(n, size, size, 3), dtype=np.uint8)
    y = np.arange(n) % classes
    for i, c in enumerate(y):
        o = 1 + 3 * c
        x[i, o : o + 3, o : o + 3] = 250
    return x, y.astype(np.int64)


@pytest.fixture
def npz_file(tmp_path: Path) -> Path:
    x, y = make_images(60)
    p = tmp_path / "data.npz"
    np.savez(p, images=x, labels=y)
    return p


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    x, y = make_images(30)
    root = tmp_path / "folder"
    for i, (img, c) in enumerate(zip(x, y, strict=True)):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


def cmdline(pid: int) -> bytes:
    """A process's command line from /proc (empty once it has exited)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def png_bytes(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG")
    return b.getvalue()


@contextlib.contextmanager
def s3_server(directory: Path, bucket: str) -> Iterator:
    """A SeaweedFS S3 server on 127.0.0.1 with fresh credentials and ``bucket``; the AWS
    environment points at it inside the block, and the server is stopped by pid after."""
    from infra import procs, s3, seaweed

    server = seaweed.start(directory, seaweed.free_s3_port(), "clpipe-test-key", secrets.token_hex(16))
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        s3.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
        assert not procs.alive(server.pid)


# --- the shared local Ray and the one run of the default chain ---------------------------

# The chain's tiny budget. The checkpoint and restart settings are the fault tests' (each
# faulted run must match this uninterrupted one metric for metric): mid-epoch checkpoints
# every 4 steps, one automatic restart in pretrain, none in distill.
TINY = [
    "--set",
    "sweep.enabled=false",
    "--set",
    "pretrain.epochs=2",
    "--set",
    "pretrain.batch_size_per_worker=32",
    "--set",
    "finetune.epochs=3",
    "--set",
    "distill.epochs=2",
    "--set",
    "labels.fractions=[0.01, 0.1]",
    "--set",
    "finetune.min_steps=0",
    "--set",
    "finetune.val_checks=2",  # of 3 epochs: after epochs 2 and 3
    "--set",
    "pretrain.checkpoint_every_steps=4",
    "--set",
    "pretrain.max_failures=1",
    "--set",
    "distill.checkpoint_every_steps=4",
    "--set",
    "distill.max_failures=0",
    "--set",
    "mlflow.system_metrics_seconds=1",
]
STAGES = ["shard", "labels", "pretrain", "finetune", "distill", "evaluate", "register"]


# The end-to-end modules in two lanes. With `pytest -n 2 --dist loadgroup
# --no-loadscope-reorder` (make test) each lane is one xdist_group, so one process runs it
# from start to end in this order: the tests that share a module or session fixture (the
# chain run and its faults, the live stack, the S3 server) stay on one process, and no long
# test is handed to a process that is still busy with another while the other process runs
# out of work. The lanes are about equally long (in-suite times: bench/results/test_suite.json);
# the unit tests fill in behind whichever lane ends first.
LANES = {
    "lane-1": ["test_pipeline_e2e.py", "test_faults.py", "test_sweep.py", "test_scale_memory.py"],
    "lane-2": [
        "test_twohost.py",
        "test_s3.py",
        "test_stack.py",
        "test_multinode.py",
        "test_mlflow_outage.py",
        "test_pipeline_methods.py",
        "test_reliability.py",
    ],
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which names each test's group
def pytest_collection_modifyitems(config, items):
    order = [name for files in LANES.values() for name in files]
    lane = {name: group for group, files in LANES.items() for name in files}
    rank = {name: i for i, name in enumerate(order)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise
    for item in items:
        if item.path.name in lane:
            item.add_marker(pytest.mark.xdist_group(lane[item.path.name]))


@pytest.fixture
def local_ray():
    """The pipeline's local Ray (2 CPUs), started once and shared by the tests of this
    process; started again if a test shut it down (one needing a Ray of its own)."""
    import ray

    from pipelines import ray_env
    from pipelines.config import RayConfig

    if not ray.is_initialized():
        ray_env.init(RayConfig(num_cpus=2))
    yield ray.get_runtime_context().gcs_address


@pytest.fixture
def without_ray():
    """No Ray initialized in this process (the shared one is shut down; the next test that
    needs it starts it again)."""
    import ray

    ray.shutdown()


RAY_FIXTURES = {"local_ray", "chain"}


def pytest_runtest_teardown(item, nextitem):
    """The shared Ray is shut down as soon as the next test of this process does not use it:
    an idle local Ray (GCS, raylet, dashboard, agents) still costs CPU that the other
    process's tests need."""
    import sys

    if "ray" not in sys.modules or not sys.modules["ray"].is_initialized():
        return
    if nextitem is None or not RAY_FIXTURES & set(getattr(nextitem, "fixturenames", ())):
        sys.modules["ray"].shutdown()


def pytest_sessionfinish(session, exitstatus):
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


def mlflow_client(work: Path):
    """(client, experiment id) of a work dir's local MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    return client, client.get_experiment_by_name("clpipe").experiment_id


def pipeline_runs(client, exp_id: str, newest: bool = True) -> list:
    """The pipeline (parent) runs, newest first (or oldest first)."""
    from pipelines import tracking

    return client.search_runs(
        [exp_id],
        filter_string=f"tags.`{tracking.TAG_KIND}` = 'pipeline'",
        order_by=[f"attributes.start_time {'DESC' if newest else 'ASC'}"],
    )


def children(client, exp_id: str, parent_id: str) -> dict:
    """{stage: run} of one pipeline run."""
    from pipelines import tracking

    runs = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.data.tags[tracking.TAG_STAGE]: r for r in runs if tracking.TAG_STAGE in r.data.tags}


def latest_children(client, exp_id: str) -> dict:
    return children(client, exp_id, pipeline_runs(client, exp_id)[0].info.run_id)


def recomputed(stage_runs: dict) -> set[str]:
    from pipelines import tracking

    return {s for s, r in stage_runs.items() if r.data.tags[tracking.TAG_CACHE_HIT] == "false"}


def outputs(client, run_id: str) -> dict:
    """A stage run's outputs record, read through ``client`` (whatever store MLflow points at)."""
    import json
    import tempfile

    from pipelines import tracking

    with tempfile.TemporaryDirectory() as d:
        return json.loads(Path(client.download_artifacts(run_id, tracking.OUTPUTS_FILE, d)).read_text())


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """One run of the default chain (every stage) with the tiny budget, on the shared local
    Ray: the tests of its outputs, its reruns and its faults all start from this run."""
    import contextlib
    import types

    import ray

    from pipelines import ray_env
    from pipelines.cli import main
    from pipelines.config import RayConfig

    if not ray.is_initialized():
        ray_env.init(RayConfig(num_cpus=2))
    work = tmp_path_factory.mktemp("chain") / "work"
    args = ["run", "--work-dir", str(work), *TINY]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    assert rc == 0, out.getvalue()[-4000:] + err.getvalue()[-4000:]
    client, exp_id = mlflow_client(work)
    parent = pipeline_runs(client, exp_id)[0]
    return types.SimpleNamespace(
        work=work,
        args=args,
        out=out.getvalue(),
        client=client,
        exp_id=exp_id,
        parent=parent,
        runs=children(client, exp_id, parent.info.run_id),
    )
