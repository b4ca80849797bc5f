"""Everything the pipeline says to MLflow goes through here."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, Run
from mlflow.tracking import MlflowClient

TAG_KIND = "clpipe.kind"  # "pipeline" | "stage"
TAG_STAGE = "clpipe.stage"
TAG_KEY = "clpipe.cache_key"
TAG_CACHE_HIT = "clpipe.cache_hit"
# on a training stage's run that continued an interrupted run of the same cache key from its checkpoint:
# the checkpoint's URI (its stage/seconds then counts only what was left to do)
TAG_RESUMED = "clpipe.resumed_from_checkpoint"
TAG_CACHED_FROM = "clpipe.cached_from"
TAG_UPSTREAM = "clpipe.upstream_run_ids"
TAG_UPSTREAM_URIS = "clpipe.upstream_artifact_uris"
OUTPUTS_FILE = "clpipe_outputs.json"
MAX_PARAM_LEN = 6000


def use(tracking_uri: str) -> None:
    """Point this process's MLflow at ``tracking_uri``. MLflow's set_tracking_uri also exports
    MLFLOW_TRACKING_URI, which the config reads as the user's choice: the environment stays
    as the user set it (workers get the URI explicitly)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def setup(tracking_uri: str, experiment: str, artifact_location: str | None) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id.
    ``artifact_location`` None: the tracking server's default (its artifact proxy)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if tracking_uri.startswith(("http://", "https://")):
        _check_server(tracking_uri)
    use(tracking_uri)
    if (
        artifact_location
        and artifact_location.startswith("s3://")
        and os.environ.get("AWS_ENDPOINT_URL")
        and not os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    ):
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL"]  # MLflow's own name for it
    client = MlflowClient(tracking_uri)
    try:
        exp = client.get_experiment_by_name(experiment)
    except Exception as e:  # a server that is down: one line, after MLflow's bounded retries
        if tracking_uri.startswith(("http://", "https://")):
            raise ConnectionError(
                f"mlflow.tracking_uri: the MLflow server {tracking_uri} does not answer "
                f"({type(e).__name__}); start it (clpipe stack up) or fix MLFLOW_TRACKING_URI"
            ) from None
        raise
    if exp is None:
        return client.create_experiment(experiment, artifact_location=artifact_location)
    return exp.experiment_id


def _check_server(uri: str, timeout: float = 5.0) -> None:
    """A tracking server that does not answer /health within ``timeout`` s: one line
    (MLflow's own client would retry for minutes)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answers (a proxy or an older server without /health)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(
            f"mlflow.tracking_uri: the MLflow server {uri} does not answer ({reason}); start it "
            "(clpipe stack up) or fix mlflow.tracking_uri / MLFLOW_TRACKING_URI"
        ) from None


def log_params(run_id: str, params: dict[str, Any], client: MlflowClient | None = None) -> None:
    client = client or MlflowClient()
    items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def _param_value(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return s if len(s) <= MAX_PARAM_LEN else s[: MAX_PARAM_LEN - 3] + "..."


def log_metrics(run_id: str, metrics: dict[str, float], step: int, client: MlflowClient | None = None) -> None:
    import time

    client = client or MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


class WorkerLog:
    """What rank 0 of a training stage tells MLflow (metrics, tags), best effort: an MLflow
    server that is down or slow never fails or stalls training.

    Each call sends what is waiting, in order, with one try and a short timeout (MLflow's
    own client would retry for minutes); what cannot be sent is kept and goes out with a
    later call. :meth:`close` keeps trying for up to ``flush_timeout_s`` seconds (the
    server may be back by then); only what is still unsent after that is lost, and
    said so in one line."""

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        *,
        prefix: str = "mlflow",
        flush_timeout_s: float | None = None,
        request_timeout_s: float = 10.0,
    ) -> None:
        # MLflow reads these per request; this process (a training worker) makes no other MLflow calls
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(request_timeout_s))
        self.client = MlflowClient(tracking_uri)
        self.uri, self.run_id, self.prefix = tracking_uri, run_id, prefix
        self.flush_timeout_s = (
            float(os.environ.get("CLPIPE_MLFLOW_FLUSH_TIMEOUT_S", 300)) if flush_timeout_s is None else flush_timeout_s
        )
        self.pending: list[tuple[list[Metric], list[Any]]] = []
        self.failing = False

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        now = int(time.time() * 1000)
        self._queue([Metric(k, float(v), now, step) for k, v in metrics.items()], [])

    def tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._queue([], [RunTag(k, v) for k, v in tags.items()])

    def _queue(self, metrics: list[Metric], tags: list[Any]) -> None:
        self.pending.append((metrics, tags))
        self.send()

    def send(self) -> bool:
        """Send what is waiting; True when nothing is left."""
        while self.pending:
            metrics, tags = self.pending[0]
            try:
                self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
            except Exception as e:  # the server down, slow or failing: keep it for later
                if not self.failing:
                    print(
                        f"[{self.prefix}] MLflow at {self.uri} is not taking metrics ({type(e).__name__}); "
                        "training goes on, they are kept and sent when it answers",
                        flush=True,
                    )
                self.failing = True
                return False
            self.pending.pop(0)
        if self.failing:
            print(f"[{self.prefix}] MLflow at {self.uri} answers again; the kept metrics are sent", flush=True)
            self.failing = False
        return True

    def close(self) -> None:
        import time

        deadline, wait = time.monotonic() + self.flush_timeout_s, 0.5
        while not self.send() and time.monotonic() < deadline:
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            wait = min(wait * 2, 10.0)
        if self.pending:
            n = sum(len(m) + len(t) for m, t in self.pending)
            print(
                f"[{self.prefix}] MLflow at {self.uri} did not answer for {self.flush_timeout_s:g} s after "
                f"training: {n} metric values and tags of run {self.run_id} were not recorded",
                flush=True,
            )


def find_cached(experiment_id: str, stage: str, key: str) -> Run | None:
    """The newest finished run that computed ``stage`` with cache key ``key``."""
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{TAG_KEY}` = '{key}' and tags.`{TAG_STAGE}` = '{stage}' "
            f"and tags.`{TAG_CACHE_HIT}` = 'false' and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.end_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def artifact_uri(run_id: str) -> str:
    return MlflowClient().get_run(run_id).info.artifact_uri


def save_outputs(run_id: str, outputs: dict) -> None:
    MlflowClient().log_dict(run_id, outputs, OUTPUTS_FILE)


def load_outputs(run_id: str) -> dict:
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/{OUTPUTS_FILE}")


def ui_command(tracking_uri: str) -> str:
    """How to look at the runs: the server itself, or a UI over the local store."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def quiet() -> None:
    """Silence MLflow's per-run 'View run at' lines and emoji banners in the console."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def source_tags() -> dict[str, str]:
    """The code a run ran: ``clpipe.version`` (the installed package's) and, from a git
    checkout of the project, ``mlflow.source.git.commit`` (MLflow's own tag for it)."""
    import importlib.metadata
    import subprocess

    try:
        tags = {"clpipe.version": importlib.metadata.version("clpipe")}
    except importlib.metadata.PackageNotFoundError:  # the source tree on sys.path, not installed
        tags = {"clpipe.version": "unknown"}
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        try:
            commit = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
        if len(commit) == 40:
            tags["mlflow.source.git.commit"] = commit
    return tags


DATASET_CONTEXT = {
    "labels": "labels",
    "sweep": "training",
    "pretrain": "training",
    "finetune": "training",
    "distill": "training",
    "evaluate": "evaluation",
}


def log_shard_input(shards: dict, name: str, stage: str) -> None:
    """The shard set as the active run's input dataset (MLflow's ``log_input``): its URI
    as the source and its manifest's sha256 as the digest (MLflow keeps 36 characters of a
    digest: the first 32 hex digits, 128 bits; the whole sha256 is the
    ``clpipe.dataset.manifest_sha256`` tag)."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways": it is a local path
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(shards["shard_dir"])
    # (MLflow's MetaDataset is instantiated as its docs show; its stub marks `profile` abstract)
    dataset = MetaDataset(source=source, name=name, digest=shards["manifest_sha256"][:32])  # type: ignore[abstract]
    mlflow.log_input(dataset, context=DATASET_CONTEXT.get(stage, stage))
    mlflow.set_tag("clpipe.dataset.manifest_sha256", shards["manifest_sha256"])
