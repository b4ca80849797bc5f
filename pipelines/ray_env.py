"""Ray in one place: starting or joining a cluster, and resource queries."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Protocol

import ray

from cl_core.data import storage as storage_lib
from infra import procs, s3
from infra.stack import METRICS_ENV
from pipelines.config import ConfigError, PipelineConfig, RayConfig

TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for a Ray Job's driver (its runtime_env)
PROBE_TIMEOUT_S = 60.0


_joined = False  # whether this process joined a running cluster (True) or started its Ray


def init(cfg: RayConfig, forward_secrets: bool = False) -> None:
    """Join ``cfg.address`` (or $RAY_ADDRESS) or start a local Ray (dashboard on: Train's state API needs it).

    Joining a running cluster from outside a Ray Job, the tracking and storage locations
    set here (``infra.jobs.FORWARD_ENV``; with ``forward_secrets`` the credentials too)
    go to the job's workers in its runtime_env: a worker's environment is its node's, not
    this shell's. Inside a Ray Job the job's own runtime_env (``clpipe submit``) has them."""
    global _joined
    # read by each Ray Train controller this driver starts (Ray propagates it): a worker's
    # train.report blocks while its previous report is uncollected, so short epochs and
    # frequent checkpoints would wait for Ray's default 2 s poll
    os.environ[TRAIN_POLL_ENV] = str(cfg.train_poll_seconds)
    if not sys.stdout.isatty():  # workers' lines in a file or a job log: no colour codes before each one
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if ray.is_initialized():
        return
    # token auth is for shared clusters; a local Ray on loopback runs without it
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # worker prints appear once
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    address = cfg.address or os.environ.get("RAY_ADDRESS")  # set inside a Ray Job and by the stack's env file
    if address:
        _check_reachable(address)
        if RAY_JOB_CONFIG_ENV not in os.environ:  # not a Ray Job's driver: nothing else gives workers these
            from infra.jobs import forwarded_env

            kwargs["runtime_env"] = {"env_vars": forwarded_env(forward_secrets)}
        ray.init(address=address, **kwargs)
        _joined = True
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
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            **kwargs,
        )


def preflight(cfg: PipelineConfig) -> None:
    """Before any stage: on a cluster of several nodes, or one this process joined, every
    local path that tasks and workers read or write (``PipelineConfig.node_paths``) must
    be the same storage on every node. A marker written here is looked for by a task
    pinned to each live node; a node that does not see it (its own disk at that path)
    fails the run in one line naming the field and the fix. A joined cluster with no CPU
    yet (autoscaling from zero) cannot be checked: local paths are refused there unless
    ``ray.shared_fs`` says they are mounted on every node."""
    import secrets

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not _joined and len(nodes) <= 1:
        return
    paths = cfg.node_paths()
    if not paths:
        return
    fix = {
        "data.source.path": "put the source in S3 (data.source.path: s3://...)",
        "data.output": "set data.output: s3://BUCKET/prefix",
        "ray.storage_path": "set ray.storage_path: s3://BUCKET/prefix",
        "mlflow.tracking_uri": "set MLFLOW_TRACKING_URI (or mlflow.tracking_uri) to a tracking server, "
        "http://HOST:5000",
        "mlflow.artifact_location": "set mlflow.artifact_location: s3://BUCKET/prefix",
    }
    shared = "or mount it at the same path on every node (NFS-style) and set work_dir there"
    if not any(n.get("Resources", {}).get("CPU", 0) for n in nodes) and not cfg.ray.shared_fs:
        field, path, _ = paths[0]
        raise ConfigError(
            f"{field}: {path} is a local path and no node of the cluster can run work yet (autoscaling "
            f"from zero), so it cannot be checked that every node sees it; {fix[field]}, {shared} and "
            "set ray.shared_fs: true"
        )
    token = secrets.token_hex(6)
    markers: list[tuple[str, str, str]] = []  # (field, path, what to look for)
    try:
        for field, path, written in paths:
            if written:
                Path(path).mkdir(parents=True, exist_ok=True)
                marker = Path(path) / f".clpipe-node-check-{token}"
                marker.write_text("every node of the run must see this file\n")
                markers.append((field, path, str(marker)))
            elif Path(path).exists():
                markers.append((field, path, path))
        if not markers:
            return
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        sees = ray.remote(num_cpus=0, max_retries=0)(procs.node_sees)  # a light module: a quick worker start
        looks = [
            sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                [m[2] for m in markers]
            )
            for n in nodes
        ]
        try:
            seen = ray.get(looks, timeout=PROBE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise ConfigError(
                f"ray: not every node ran the storage check within {PROBE_TIMEOUT_S:g} s; check the "
                "cluster (ray status)"
            ) from None
        for ip, found in seen:
            for (field, path, _), ok in zip(markers, found, strict=True):
                if not ok:
                    raise ConfigError(
                        f"{field}: {path} is not the same storage on node {ip} (a file written here "
                        f"is not there): {fix[field]}, {shared}"
                    )
    finally:
        for _, _, m in markers:
            if ".clpipe-node-check-" in m:
                Path(m).unlink(missing_ok=True)


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
        raise ConnectionError(
            f"ray.address: no Ray cluster answers at {address} ({type(e).__name__}); start one "
            "(clpipe stack up, ray start --head) or fix ray.address / RAY_ADDRESS"
        ) from None


def keep_credentials_out_of_tune() -> None:
    """Stop Ray Tune from copying this process's AWS keys into every trial actor's
    runtime_env.

    Tune 2.60 (``ray.tune.execution.class_cache``) puts ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY`` and the session tokens into each trainable's
    ``runtime_env.env_vars``, and Ray's runtime-env agent logs every runtime_env it
    creates, so the secret lands in plain text in ``runtime_env_agent.log`` on each node.
    Trials find credentials as every other worker does: their node's environment (a Ray
    started here inherits this one), its credential chain, or a job's runtime_env when
    they were forwarded on purpose (``--forward-secrets``)."""
    try:
        from ray.tune.execution import class_cache
    except ImportError:  # a Tune without the cache: nothing copied
        return
    class_cache.ENV_VARS_TO_PROPAGATE -= {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SECURITY_TOKEN",
        "AWS_SESSION_TOKEN",
    }


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


def joined() -> bool:
    """Whether this process joined a running cluster (nodes may join it later) rather than
    starting a Ray of its own (fixed resources)."""
    return _joined


def _max_resources() -> dict:
    """The most an autoscaling cluster can grow to (its autoscaler's node types times their
    max counts, as Ray Train checks it); {} for a cluster without an autoscaler."""
    try:
        from ray._private.state import state

        return dict(state.get_max_resources_from_cluster_config() or {})
    except Exception:  # no autoscaler state in this Ray, or a GCS that does not answer the query
        return {}


def cluster_cpus() -> float:
    """The cluster's CPUs now, or what its autoscaler may start (from zero workers, too)."""
    return max(float(ray.cluster_resources().get("CPU", 0)), float(_max_resources().get("CPU", 0)))


def cluster_gpus() -> float:
    """The cluster's GPUs now, or what its autoscaler may start."""
    return max(float(ray.cluster_resources().get("GPU", 0)), float(_max_resources().get("GPU", 0)))


class Located(Protocol):
    """What knows where Ray's runs are stored: a PipelineConfig, a stage's StageEnv."""

    @property
    def ray(self) -> RayConfig: ...

    def work_path(self) -> Path: ...


def storage(cfg: Located) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train and Tune runs: ``ray.storage_path``
    as an ``s3://`` URI through pyarrow's S3 filesystem (endpoint and keys from the AWS
    environment), else ``<work_dir>/ray_results`` on the local disk."""
    if cfg.ray.storage_path and storage_lib.is_s3(cfg.ray.storage_path):
        fs, path = s3.pyarrow_fs(cfg.ray.storage_path)
        return path, fs
    return str(Path(cfg.ray.storage_path or cfg.work_path() / "ray_results").expanduser().resolve()), None


def storage_uri(path: str, filesystem: Any) -> str:
    """A Ray storage path (as Ray reports it) as a URI the project's storage layer opens."""
    return f"s3://{path.lstrip('/')}" if filesystem is not None else path


def run_uri(cfg: Located, name: str) -> str:
    """Where Ray keeps the run (or Tune experiment) ``name``."""
    path, fs = storage(cfg)
    return storage_uri(f"{path}/{name}", fs)


def forget_run(cfg: Located, name: str) -> None:
    """Delete the Ray run (or Tune experiment) ``name`` and its checkpoints, so a run of
    that name starts afresh instead of resuming (``--rerun``)."""
    uri = run_uri(cfg, name)
    if storage_lib.is_s3(uri):
        storage_lib.delete_prefix(uri)
    else:
        shutil.rmtree(uri, ignore_errors=True)
