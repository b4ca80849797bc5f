"""The pipeline as a Ray Job: ``clpipe submit | jobs | logs | stop`` through Ray's
JobSubmissionClient (the dashboard's job server, ``http://HOST:8265``).

A submitted job runs ``python -m pipelines run CONFIG --set ...`` with the cluster's
``python``, in a copy of this project (``runtime_env.working_dir``), with the tracking and
storage locations of the submitting shell passed along in ``runtime_env.env_vars`` (the
shell's environment does not reach a job otherwise). Credentials are not passed unless
asked for (``--forward-secrets``): the job server hands a job's runtime_env to anyone who
can reach it, and Ray's runtime-env agent logs it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import shlex
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from infra import procs

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
CONNECT_TIMEOUT = 10.0
# what a job needs from the submitting environment: where tracking and storage are. Sent in
# the job's runtime_env, which anyone who can reach the job server reads back
FORWARD_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "RAY_AUTH_MODE",
)
# credentials: the cluster's nodes use their own (instance or pod role, their environment, their
# ~/.aws); sent only with --forward-secrets, and then readable from the job's runtime_env and Ray's logs
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
)
# never uploaded with the project (on top of .gitignore, which Ray also honours)
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    ".clpipe-stack",
    "clpipe-work",
    "bench/results",
    "__pycache__",
    "*.pyc",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "build",
    "dist",
    "mlruns",
    "mlartifacts",
]
CONFIG_ENV = "CLPIPE_JOB_CONFIG_YAML"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Ray's client logs every packaging step and websocket event at INFO: keep the console to the job's own output
_QUIET = (
    "ray._private.runtime_env.working_dir",
    "ray._private.runtime_env.packaging",
    "ray.dashboard.modules.dashboard_sdk",
    "ray.dashboard.modules.job.sdk",
)


class JobsError(RuntimeError):
    """One line for the user: what failed and what to do."""


def resolve_address(address: str | None) -> str:
    """--address, else $CLPIPE_JOB_ADDRESS, else http://127.0.0.1:8265 (scheme added if missing)."""
    a = (address or os.environ.get("CLPIPE_JOB_ADDRESS") or DEFAULT_ADDRESS).strip().rstrip("/")
    return a if "://" in a else f"http://{a}"


ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


def _auth_headers() -> dict[str, str]:
    """The Authorization header Ray's own clients send to a token-auth cluster (with
    RAY_AUTH_MODE=token: the token from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token); none otherwise."""
    try:
        from ray._private.authentication.http_token_authentication import (
            get_auth_headers_if_auth_enabled,
        )
    except ImportError:  # a Ray without token auth
        return {}
    from ray.exceptions import AuthenticationError

    try:
        return dict(get_auth_headers_if_auth_enabled({}))
    except AuthenticationError:  # token auth on, no token here
        raise JobsError(
            "RAY_AUTH_MODE=token but no token is set here: set RAY_AUTH_TOKEN to the cluster's token "
            "(or RAY_AUTH_TOKEN_PATH to a file holding it, or write it to ~/.ray/auth_token)"
        ) from None


def connect(address: str | None, timeout: float = CONNECT_TIMEOUT):
    """A JobSubmissionClient for the job server at ``address``, or one JobsError line
    within ``timeout`` seconds when nothing answers there."""
    url = resolve_address(address)
    if not url.startswith(("http://", "https://")):
        raise JobsError(
            f"--address {url}: the job server is the Ray dashboard's http(s) address, e.g. {DEFAULT_ADDRESS}"
        )
    hint = (
        "start a local cluster with `clpipe stack up`, or point --address / $CLPIPE_JOB_ADDRESS at a cluster's "
        "dashboard (http://HOST:8265)"
    )
    try:
        probe = urllib.request.Request(f"{url}/api/version", headers=_auth_headers())
        with urllib.request.urlopen(probe, timeout=timeout) as r:
            r.read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise JobsError(
                f"the Ray job server at {url} refused the request (HTTP {e.code}): it uses token auth; "
                "set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN)"
            ) from None
        raise JobsError(f"{url} answered HTTP {e.code} to /api/version: not a Ray job server; {hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise JobsError(f"no Ray job server answers at {url} ({reason}); {hint}") from None
    from ray.job_submission import JobSubmissionClient

    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Ray's client takes $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, over the address it is given
    # (ray.dashboard.utils.get_address_for_submission_client); a local pipeline run or a stack's env
    # file sets them, and the job would go to that other cluster: the address resolved here wins
    hidden = {k: os.environ.pop(k) for k in ADDRESS_ENV if k in os.environ}
    try:
        return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError) as e:
        raise JobsError(f"Ray job server at {url}: {procs.one_line(e)}; {hint}") from None
    finally:
        os.environ.update(hidden)


def project_root() -> Path:
    """The directory holding ``pipelines/`` and ``cl_core/``: what a job needs to import."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pipelines").is_dir() or not (root / "cl_core").is_dir():
        raise JobsError(f"{root}: the clpipe sources are not there; submit from a checkout of the project")
    return root


def forwarded_env(forward_secrets: bool = False) -> dict[str, str]:
    """The variables of :data:`FORWARD_ENV` (and, asked for, :data:`SECRET_ENV`) set here."""
    names = FORWARD_ENV + (SECRET_ENV if forward_secrets else ())
    return {k: os.environ[k] for k in names if os.environ.get(k)}


def withheld_secrets() -> list[str]:
    """The credential variables set here that a job does not get without --forward-secrets."""
    return [k for k in SECRET_ENV if os.environ.get(k)]


@dataclass(frozen=True)
class Pipeline:
    """The pipeline a job runs, as the caller (``clpipe submit``) validated it: this module
    knows no config schema."""

    name: str
    config: str | None  # as given on the command line (None: the embedded default)
    config_file: Path | None  # the file it names
    work_dir: str
    tracking_uri: str | None  # the config's mlflow.tracking_uri


def build_job(
    config_file: Path | None,
    overrides: list[str],
    root: Path,
    flags: list[str] | None = None,
    forward_secrets: bool = False,
) -> tuple[str, dict[str, Any]]:
    """The entrypoint and runtime_env that run ``clpipe run CONFIG --set ...`` as a job."""
    args = ["python", "-m", "pipelines", "run"]
    env = forwarded_env(forward_secrets)
    env["PYTHONUNBUFFERED"] = "1"  # logs reach `clpipe logs` as they are printed
    prefix = ""
    if config_file is not None:
        path = Path(config_file).resolve()
        rel = path.relative_to(root) if path.is_relative_to(root) else None
        if rel is not None and not any(part in EXCLUDES or part.endswith(".egg-info") for part in rel.parts):
            args.append(rel.as_posix())  # uploaded with the working dir
        else:  # outside the project: its text travels in the runtime_env and is written next to the job
            env[CONFIG_ENV] = path.read_text()
            name = f"clpipe-job-{secrets.token_hex(4)}-{path.name}"
            prefix = f'printf "%s" "${CONFIG_ENV}" > {shlex.quote(name)} && '
            args.append(name)
    for o in overrides:
        args += ["--set", o]
    args += flags or []
    runtime_env: dict[str, Any] = {"working_dir": str(root), "excludes": list(EXCLUDES), "env_vars": env}
    return prefix + " ".join(shlex.quote(a) for a in args), runtime_env


def _submission_id(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or "pipeline"
    return f"clpipe-{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def submit(
    pipeline: Pipeline,
    overrides: list[str],
    *,
    address: str | None = None,
    follow: bool = True,
    flags: list[str] | None = None,
    forward_secrets: bool = False,
    say: Callable[[str], None] = print,
) -> int:
    """Submit the (validated) pipeline as a Ray Job, print the id and (``follow``) stream
    the logs until the job ends. Returns 0 only if the job SUCCEEDED (or was submitted,
    with ``follow`` off)."""
    client = connect(address)
    url = resolve_address(address)
    root = project_root()
    work_dir = pipeline.work_dir
    excludes_extra: list[str] = []
    if "://" not in work_dir:
        wp = Path(work_dir).expanduser()
        if not wp.is_absolute():
            say(
                f"note: work dir {work_dir!r} is relative: on the cluster it resolves inside the job's copy of the "
                "project; pass an absolute path (--work-dir) or an s3:// location to keep the outputs"
            )
        elif wp.resolve().is_relative_to(root):
            excludes_extra.append("/" + wp.resolve().relative_to(root).as_posix())
    entrypoint, runtime_env = build_job(pipeline.config_file, overrides, root, flags, forward_secrets)
    withheld = [] if forward_secrets else withheld_secrets()
    if withheld:
        say(
            f"note: not sent to the cluster: {', '.join(withheld)}; the job uses the credentials of the cluster's "
            "nodes (instance role, their environment or ~/.aws). --forward-secrets sends these, readable by anyone "
            "who can reach the job server"
        )
    runtime_env["excludes"] += excludes_extra
    tracking = (
        runtime_env["env_vars"].get("MLFLOW_TRACKING_URI")
        or pipeline.tracking_uri
        or "sqlite in the work dir on the cluster"
    )
    job_id = _submission_id(pipeline.name)
    try:
        client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            submission_id=job_id,
            metadata={"clpipe.pipeline": pipeline.name, "clpipe.config": pipeline.config or "(embedded default)"},
        )
    except Exception as e:
        raise JobsError(f"submitting to {url} failed: {procs.one_line(e)}") from None
    say(f"submitted job {job_id} to {url} (pipeline {pipeline.name}, MLflow {tracking})")
    if not follow:
        say(f"follow it: clpipe logs {job_id} --follow --address {url}; stop it: clpipe stop {job_id} --address {url}")
        return 0
    return _follow(client, job_id, url, say)


def _follow(client, job_id: str, url: str, say: Callable[[str], None]) -> int:
    try:
        asyncio.run(_tail(client, job_id))
        status = wait_terminal(client, job_id, timeout=60)
    except KeyboardInterrupt:
        say(f"\ndetached; job {job_id} keeps running (clpipe stop {job_id} --address {url})")
        return 130
    except Exception as e:  # the job server went away mid-stream
        raise JobsError(
            f"lost the log stream of job {job_id} from {url} ({procs.one_line(e)}); the job may still run: "
            f"clpipe logs {job_id} --address {url}"
        ) from None
    info = client.get_job_info(job_id)
    msg = f": {info.message}" if info.message and status != "SUCCEEDED" else ""
    say(f"job {job_id} {status}{msg}")
    return 0 if status == "SUCCEEDED" else 1


async def _tail(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def wait_terminal(client, job_id: str, timeout: float) -> str:
    """The job's status once terminal, or its current status after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id))
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def _known(client, job_id: str, url: str) -> None:
    try:
        client.get_job_info(job_id)
    except RuntimeError:
        raise JobsError(f"no job {job_id} on {url}; list them with `clpipe jobs --address {url}`") from None


def list_jobs(address: str | None = None, say: Callable[[str], None] = print) -> int:
    client = connect(address)
    jobs = [j for j in client.list_jobs() if j.submission_id]
    if not jobs:
        say(f"no jobs on {resolve_address(address)}")
        return 0
    jobs.sort(key=lambda j: j.start_time or 0)
    width = max(len(j.submission_id or "") for j in jobs)
    say(f"{'JOB':<{width}}  {'STATUS':<9}  {'STARTED':<19}  {'TIME':>7}  ENTRYPOINT")
    for j in jobs:
        start = datetime.fromtimestamp(j.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S") if j.start_time else "-"
        end = j.end_time or (time.time() * 1000 if j.start_time else None)
        took = f"{(end - j.start_time) / 1000:.0f} s" if j.start_time and end else "-"
        entry = j.entrypoint if len(j.entrypoint) <= 90 else j.entrypoint[:87] + "..."
        say(f"{j.submission_id:<{width}}  {str(j.status):<9}  {start:<19}  {took:>7}  {entry}")
    return 0


def logs(job_id: str, address: str | None = None, follow: bool = False, say: Callable[[str], None] = print) -> int:
    client = connect(address)
    url = resolve_address(address)
    _known(client, job_id, url)
    if follow:
        try:
            asyncio.run(_tail(client, job_id))
        except KeyboardInterrupt:
            return 130
        except Exception as e:
            raise JobsError(f"lost the log stream of job {job_id} from {url} ({procs.one_line(e)})") from None
        return 0
    sys.stdout.write(client.get_job_logs(job_id))
    sys.stdout.flush()
    return 0


def stop(job_id: str, address: str | None = None, timeout: float = 60.0, say: Callable[[str], None] = print) -> int:
    client = connect(address)
    url = resolve_address(address)
    _known(client, job_id, url)
    status = str(client.get_job_status(job_id))
    if status in TERMINAL:
        say(f"job {job_id} already {status}")
        return 0
    client.stop_job(job_id)
    status = wait_terminal(client, job_id, timeout)
    if status not in TERMINAL:
        say(f"job {job_id} is still {status} {timeout:g} s after the stop request; check `clpipe jobs --address {url}`")
        return 1
    say(f"job {job_id} {status}")
    return 0
