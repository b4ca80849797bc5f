"""Ray in one place: starting or joining a cluster, and resource queries."""

from __future__ import annotations

import logging
import os

import ray

from pipelines.config import RayConfig


def init(cfg: RayConfig) -> None:
    """Join ``cfg.address`` or start a local Ray (dashboard on: Train's state API needs it)."""
    if ray.is_initialized():
        return
    # token auth is for shared clusters; a local Ray on loopback runs without it
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # worker prints appear once
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    if cfg.address:
        ray.init(address=cfg.address, **kwargs)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)


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
