"""Ray in one place: starting or joining a cluster, and resource queries."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ray

from cl_core.data import storage as storage_lib
from infra import procs
from pipelines.config import PipelineConfig, RayConfig

TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
METRICS_ENV = ("RAY_enable_metrics_collection", "RAY_TRAIN_METRICS_ENABLED")


def init(cfg: RayConfig) -> None:
    """Join ``cfg.address`` (or $RAY_ADDRESS) or start a local Ray (dashboard on: Train's state API needs it)."""
    # read by each Ray Train controller this driver starts (Ray propagates it): a worker's
    # train.report blocks while its previous report is uncollected, so short epochs and
    # frequent checkpoints would wait for Ray's default 2 s poll
    os.environ[TRAIN_POLL_ENV] = str(cfg.train_poll_seconds)
    if ray.is_initialized():
        return
    # token auth is for shared clusters; a local Ray on loopback runs without it
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # worker prints appear once
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    address = cfg.address or os.environ.get("RAY_ADDRESS")  # set inside a Ray Job and by the stack's env file
    if address:
        _check_reachable(address)
        ray.init(address=address, **kwargs)
    else:
        # "local": a new Ray of this process, never a `ray start` cluster found on the machine; Train's
        # placement-group cleaner finds the State API by $RAY_API_SERVER_ADDRESS, else by guessing the
        # latest Ray on the machine, which may be another one
        port = procs.free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        # Train's preemption watcher (one more actor process per TorchTrainer) follows autoscaler
        # node drains, which a Ray on this one machine never has; Train propagates the setting
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
        if not cfg.metrics:
            # Ray's metrics (every process of this Ray: recorded and exported for a Prometheus) and Ray
            # Train's (its controllers and workers): no one scrapes a Ray started here; the nodes
            # inherit the first setting, Train reads the second in the driver and its Tune trials
            for key in METRICS_ENV:
                os.environ.setdefault(key, "0")
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, **kwargs)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) that accepts no connection within
    ``timeout`` s: one line (``ray.init`` itself retries for minutes)."""
    import socket

    target = address.removeprefix("ray://").removeprefix("http://").removeprefix("https://").rstrip("/")
    if target == "auto" or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as e:
        raise ConnectionError(f"ray.address: no Ray cluster answers at {address} ({type(e).__name__}); start one "
                              "(clpipe stack up, ray start --head) or fix ray.address / RAY_ADDRESS") from None


def quiet_train_worker() -> None:
    """Inside a Ray Train worker: drop Train's per-report INFO lines from the console.

    Ray Train 2.60 logs every ``ray.train.report`` call ("Reporting training result
    N: ...") at INFO from a logger named after its source file, which propagates to the
    worker's root console handler; the pipeline prints its own one line per epoch.
    """
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # Train V1 or a moved module: nothing to quiet
        return
    train_context.logger.setLevel(logging.WARNING)


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0))


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def storage(cfg: PipelineConfig) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train and Tune runs: ``ray.storage_path``
    as an ``s3://`` URI through pyarrow's S3 filesystem (endpoint and keys from the AWS
    environment), else ``<work_dir>/ray_results`` on the local disk."""
    if cfg.ray.storage_path and storage_lib.is_s3(cfg.ray.storage_path):
        fs, path = storage_lib.pyarrow_fs(cfg.ray.storage_path)
        return path, fs
    return str(Path(cfg.ray.storage_path or cfg.work_path() / "ray_results").expanduser().resolve()), None


def storage_uri(path: str, filesystem: Any) -> str:
    """A Ray storage path (as Ray reports it) as a URI the project's storage layer opens."""
    return f"s3://{path.lstrip('/')}" if filesystem is not None else path


def run_uri(cfg: PipelineConfig, name: str) -> str:
    """Where Ray keeps the run (or Tune experiment) ``name``."""
    path, fs = storage(cfg)
    return storage_uri(f"{path}/{name}", fs)
