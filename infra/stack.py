"""The local stack behind ``clpipe stack up | down | status``: a SeaweedFS S3 server, an
MLflow tracking server (sqlite backend, artifacts proxied into an S3 bucket) and a Ray head
with its dashboard and job server, all on 127.0.0.1 by default.

Everything lives in one project-local directory (``.clpipe-stack`` unless told otherwise):

- ``state.json``: each service's pid, process start time, ports and log (no secrets);
- ``credentials.json`` (0600): the generated S3 keys and Ray token, reused by the next ``up``;
- ``stack.env`` (0600): KEY=VALUE lines that point the CLI, the pipeline and boto3 at the
  stack (the CLI loads it at startup);
- ``weed/``, ``mlflow.db``, ``ray/`` (Ray's temp dir when its path is short enough for Ray's
  unix sockets) and ``logs/``.

``down`` stops exactly the processes ``up`` started, by pid (checked against the recorded
start time so a reused pid is never signalled), in reverse order.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infra import procs, seaweed
from infra.jobs import resolve_address

DEFAULT_DIR = ".clpipe-stack"
# Ray's metrics (every process of a Ray) and Ray Train's: off where nothing scrapes them (the stack, a local Ray)
METRICS_ENV = ("RAY_enable_metrics_collection", "RAY_TRAIN_METRICS_ENABLED")
ENV_FILE = "stack.env"
STATE_FILE = "state.json"
CREDENTIALS_FILE = "credentials.json"
REGION = "us-east-1"
# Ray puts unix sockets under <temp dir>/session_<date>_<pid>/sockets/; Linux caps their
# paths at 107 bytes, so a longer state dir gets its Ray temp dir under /tmp instead
RAY_TEMP_DIR_MAX = 40
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class StackError(RuntimeError):
    """One line for the user: what failed and what to do."""


@dataclass
class StackConfig:
    dir: Path = Path(DEFAULT_DIR)
    s3_port: int = 8333
    mlflow_port: int = 5000
    ray_port: int = 6379
    dashboard_port: int = 8265
    host: str = "127.0.0.1"
    bucket: str = "clpipe"
    num_cpus: int | None = None  # Ray head's logical CPUs; None: Ray counts them; 0: a head that runs no work
    ray_auth: str = "disabled"  # "token": the Ray head takes only requests with the stack's token
    s3_metrics_port: int | None = None  # SeaweedFS's Prometheus metrics (bench/twohost.py reads its byte counts)
    timeout: float = 120.0  # per service, seconds


@dataclass
class Service:
    name: str
    pid: int
    port: int
    url: str  # where it answers (health is checked under it)
    log: str
    started: str = ""  # /proc/<pid>/stat start time: guards against a reused pid
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- files


def url_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (also when it existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (blank lines and ``#`` comments skipped, optional ``export``)."""
    env: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if sep and key.strip():
            env[key.strip()] = value.strip().strip("'\"")
    return env


def load_env(path: Path | None = None, *, job_address: str | None = None) -> Path | None:
    """Put the stack's env file into ``os.environ`` without overriding what is set:
    ``path``, else $CLPIPE_STACK_ENV, else ./.clpipe-stack/stack.env if it exists.
    With ``job_address`` (a jobs command's --address), only when that is the stack's own
    job server: the stack's loopback URLs, keys and auth setting are for it alone.
    Returns the file loaded, or None."""
    if path is None:
        named = os.environ.get("CLPIPE_STACK_ENV")
        path = Path(named) if named else Path(DEFAULT_DIR) / ENV_FILE
        if not named and not path.is_file():
            return None
    if not path.is_file():
        raise StackError(f"CLPIPE_STACK_ENV: {path} is not a file; run `clpipe stack up` or unset CLPIPE_STACK_ENV")
    env = read_env_file(path)
    if job_address is not None:
        if resolve_address(job_address) != resolve_address(env.get("CLPIPE_JOB_ADDRESS")):
            return None
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return path


def _state_path(d: Path) -> Path:
    return d / STATE_FILE


def read_state(d: Path) -> dict | None:
    p = _state_path(d)
    if not p.exists():
        return None
    return json.loads(p.read_text())


def _write_state(d: Path, cfg: StackConfig, services: list[Service]) -> None:
    state = {
        "dir": str(d),
        "host": cfg.host,
        "bucket": cfg.bucket,
        "env_file": str(d / ENV_FILE),
        "services": [asdict(s) for s in services],
    }
    tmp = _state_path(d).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(_state_path(d))


def _credentials(d: Path) -> tuple[str, str, str]:
    """The stack's S3 keys and Ray token: reused from the state dir, else generated (never printed)."""
    p = d / CREDENTIALS_FILE
    c = json.loads(p.read_text()) if p.exists() else {}
    if "ray_token" not in c:
        c.setdefault("access_key", "clpipe" + secrets.token_hex(8))
        c.setdefault("secret_key", secrets.token_urlsafe(30))
        c["ray_token"] = secrets.token_hex(32)
        _write_private(p, json.dumps(c))
    return c["access_key"], c["secret_key"], c["ray_token"]


# ---------------------------------------------------------------- processes


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _ours(s: Service) -> bool:
    """The recorded process is still the one we started (alive, same start time)."""
    return procs.alive(s.pid) and (not s.started or _start_time(s.pid) == s.started)


def _group_alive(pgid: int) -> bool:
    """Processes remain in the group ``pgid`` (Linux never hands out a pid still in use as a
    process-group id, so they are the ones the recorded leader started)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _descendants(pid: int) -> list[int]:
    """``pid``'s process tree (children by parent pid, from /proc), ``pid`` excluded."""
    children = procs.children_by_parent()
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _stop_service(s: Service) -> None:
    """Stop one service and every process it started (its tree, by pid)."""
    if not _ours(s):
        return
    tree = _descendants(s.pid)
    if s.name == "ray":
        # the `ray start --block` process shuts its node down on SIGTERM (raylet, GCS,
        # dashboard, workers); signal the group only if that does not finish in time
        os.kill(s.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and procs.alive(s.pid):
            _reap(s.pid)
            time.sleep(0.2)
    procs.stop(s.pid, timeout=3.0 if s.name == "s3" else 15.0)
    for p in tree:  # workers that moved to their own process group
        if procs.alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(procs.alive(p) for p in tree):
        time.sleep(0.1)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _venv_bin() -> Path:
    return Path(sys.executable).parent


def _ray_binary() -> str:
    here = _venv_bin() / "ray"
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        raise StackError("ray not found beside this Python or on PATH: pip install 'ray[default]'")
    return found


def _ray_temp_dir(d: Path) -> Path:
    local = d / "ray"
    if len(str(local)) <= RAY_TEMP_DIR_MAX:
        return local
    digest = hashlib.sha1(str(d).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"clpipe-ray-{digest}"


# ---------------------------------------------------------------- up


def planned_ports(cfg: StackConfig) -> dict[str, int]:
    return {
        **seaweed.ports(cfg.s3_port),
        "MLflow server": cfg.mlflow_port,
        "Ray GCS": cfg.ray_port,
        "Ray dashboard": cfg.dashboard_port,
    }


def _check_config(cfg: StackConfig) -> None:
    if not _BUCKET.match(cfg.bucket):
        raise StackError(
            f"--bucket {cfg.bucket!r}: an S3 bucket name is 3-63 characters of a-z, 0-9, '.', '-' "
            "and starts and ends with a letter or digit"
        )
    if cfg.s3_port + 3 + seaweed.GRPC_OFFSET > 65535:
        raise StackError(
            f"--s3-port {cfg.s3_port}: SeaweedFS also uses ports up to s3 port + "
            f"{3 + seaweed.GRPC_OFFSET}; choose one below {65535 - 3 - seaweed.GRPC_OFFSET}"
        )
    seen: dict[int, str] = {}
    for what, port in planned_ports(cfg).items():
        if not 0 < port < 65536:
            raise StackError(f"{what}: port {port} is not a valid port number")
        if port in seen:
            raise StackError(
                f"{what} and {seen[port]} would both use port {port}; choose other ports "
                "(SeaweedFS uses s3 port .. +3 and +10000 each)"
            )
        seen[port] = what


def up(cfg: StackConfig, say: Callable[[str], None] = print) -> dict:
    """Start SeaweedFS, the bucket, MLflow and Ray, each waited on until healthy; write the
    env file; return the state. On any failure stop what was started and raise StackError."""
    d = Path(cfg.dir).expanduser().resolve()
    _check_config(cfg)
    old = read_state(d)
    if old:
        running = [s for s in (Service(**x) for x in old["services"]) if _ours(s)]
        if running:
            raise StackError(
                f"a stack is already running from {d} (pids "
                f"{', '.join(str(s.pid) for s in running)}); stop it with `clpipe stack down --dir {d}`"
            )
    ports = planned_ports(cfg)
    try:
        procs.require_free(ports, cfg.host)
        if cfg.host in ("127.0.0.1", "localhost"):  # Ray binds GCS and its agents on every interface
            procs.require_free({k: v for k, v in ports.items() if k.startswith("Ray")}, "0.0.0.0")
    except RuntimeError as e:
        raise StackError(f"{e} (nothing was started)") from None
    ray_bin = _ray_binary()
    seaweed.weed_binary()  # fail before starting anything when weed is missing

    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    logs = d / "logs"
    logs.mkdir(exist_ok=True)
    (d / ENV_FILE).unlink(missing_ok=True)
    access, secret, ray_token = _credentials(d)
    ray_auth = (
        {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_token}
        if cfg.ray_auth == "token"
        else {"RAY_AUTH_MODE": "disabled"}
    )
    h = url_host(cfg.host)
    services: list[Service] = []

    def record(s: Service) -> None:
        s.started = _start_time(s.pid)
        services.append(s)
        _write_state(d, cfg, services)

    t_all = time.perf_counter()
    try:
        # a. SeaweedFS, then the bucket
        t0 = time.perf_counter()
        s3 = seaweed.start(
            d / "weed",
            cfg.s3_port,
            access,
            secret,
            host=cfg.host,
            timeout=cfg.timeout,
            metrics_port=cfg.s3_metrics_port,
        )
        record(Service("s3", s3.pid, cfg.s3_port, f"http://{h}:{cfg.s3_port}", s3.log))
        s3_env = {
            "AWS_ENDPOINT_URL": f"http://{h}:{cfg.s3_port}",
            "AWS_ACCESS_KEY_ID": access,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": REGION,
        }
        _ensure_bucket(cfg.bucket, s3_env)
        say(
            f"  s3      pid {s3.pid:<7} http://{h}:{cfg.s3_port}  bucket s3://{cfg.bucket}  "
            f"({time.perf_counter() - t0:.1f} s)"
        )

        # b. the MLflow tracking server, proxying artifacts into s3://<bucket>/mlflow
        t0 = time.perf_counter()
        mlflow_log = logs / "mlflow.log"
        mlflow_cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{d / 'mlflow.db'}",
            "--artifacts-destination",
            f"s3://{cfg.bucket}/mlflow",
            "--host",
            cfg.host,
            "--port",
            str(cfg.mlflow_port),
            "--workers",
            "1",
        ]
        # MLflow 3 also starts a job runner and its consumer processes for its GenAI jobs
        # (judges, prompt optimisation), which nothing here submits; still on when the
        # environment turns it on
        mlflow_env = {
            **s3_env,
            "MLFLOW_S3_ENDPOINT_URL": s3_env["AWS_ENDPOINT_URL"],
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
        }
        pid = procs.spawn(mlflow_cmd, mlflow_log, env=mlflow_env, cwd=d)
        mlflow_url = f"http://{h}:{cfg.mlflow_port}"
        record(Service("mlflow", pid, cfg.mlflow_port, mlflow_url, str(mlflow_log)))
        procs.wait_until(lambda: procs.http_ok(f"{mlflow_url}/health"), cfg.timeout, "MLflow server", pid, mlflow_log)
        say(f"  mlflow  pid {pid:<7} {mlflow_url}  ({time.perf_counter() - t0:.1f} s)")

        # c. the Ray head (GCS, raylet, dashboard with the job server)
        t0 = time.perf_counter()
        ray_log = logs / "ray.log"
        temp_dir = _ray_temp_dir(d)
        agent_port, client_port, metric_port = _free_ports(3, exclude=set(ports.values()))
        ray_cmd = [
            ray_bin,
            "start",
            "--head",
            f"--node-ip-address={h}",
            f"--port={cfg.ray_port}",
            f"--dashboard-host={cfg.host}",
            f"--dashboard-port={cfg.dashboard_port}",
            f"--dashboard-agent-listen-port={agent_port}",
            f"--ray-client-server-port={client_port}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            "--block",
        ]
        if cfg.num_cpus is not None:
            ray_cmd.append(f"--num-cpus={cfg.num_cpus}")
        # the job entrypoint's `python` resolves through this PATH: this venv first. A Ray this
        # process joined or started leaves its address and State API in the environment; the
        # head's job server would follow RAY_API_SERVER_ADDRESS to that other Ray and run the
        # jobs there
        # The S3 keys are the node's own credentials, as an instance role is on a cloud cluster: jobs and their
        # workers find them in their environment, and `clpipe submit` sends none (--forward-secrets)
        ray_env: dict[str, str | None] = {
            **s3_env,
            **ray_auth,
            "PATH": f"{_venv_bin()}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "DASHBOARD_METRIC_PORT": str(metric_port),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_API_SERVER_ADDRESS": None,
            "RAY_ADDRESS": None,
            # Ray's and Ray Train's metrics: nothing scrapes the stack's Ray (as for a local one: RayConfig.metrics)
            **{k: os.environ.get(k, "0") for k in METRICS_ENV},
        }
        pid = procs.spawn(ray_cmd, ray_log, env=ray_env, cwd=d)
        dash = f"http://{h}:{cfg.dashboard_port}"
        record(
            Service(
                "ray",
                pid,
                cfg.ray_port,
                dash,
                str(ray_log),
                extra={
                    "dashboard_port": cfg.dashboard_port,
                    "agent_port": agent_port,
                    "client_port": client_port,
                    "temp_dir": str(temp_dir),
                },
            )
        )
        token = ray_auth.get("RAY_AUTH_TOKEN")
        procs.wait_until(
            lambda: _ray_ok(dash, h, agent_port, token), cfg.timeout, "Ray head (dashboard and job agent)", pid, ray_log
        )
        say(f"  ray     pid {pid:<7} {h}:{cfg.ray_port}  dashboard and jobs {dash}  ({time.perf_counter() - t0:.1f} s)")
    except BaseException as e:
        for s in reversed(services):
            _stop_service(s)
        _state_path(d).unlink(missing_ok=True)
        if isinstance(e, KeyboardInterrupt):
            raise
        started = ", ".join(f"{s.name} (pid {s.pid})" for s in services) or "nothing"
        raise StackError(f"{procs.one_line(e)}; stopped what had started: {started}") from None

    env = {
        "MLFLOW_TRACKING_URI": f"http://{h}:{cfg.mlflow_port}",
        "RAY_ADDRESS": f"{h}:{cfg.ray_port}",
        "CLPIPE_JOB_ADDRESS": f"http://{h}:{cfg.dashboard_port}",
        **s3_env,
        "MLFLOW_S3_ENDPOINT_URL": s3_env["AWS_ENDPOINT_URL"],
        **ray_auth,
        "CLPIPE_S3_BUCKET": cfg.bucket,
    }
    header = (
        f"# written by `clpipe stack up` ({time.strftime('%Y-%m-%d %H:%M:%S')}); removed by `clpipe stack down`.\n"
        "# Holds the stack's S3 keys: keep it private (mode 0600).\n"
    )
    _write_private(d / ENV_FILE, header + "".join(f"{k}={v}\n" for k, v in env.items()))
    say(f"stack up in {time.perf_counter() - t_all:.1f} s; env file {d / ENV_FILE}")
    state = read_state(d)
    assert state is not None
    return state


def _free_ports(n: int, exclude: set[int]) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        p = procs.free_port()
        if p not in exclude and p not in out:
            out.append(p)
    return out


def _ray_ok(dashboard: str, host: str, agent_port: int, token: str | None = None) -> bool:
    """The dashboard answers and the head's agent (which runs submitted jobs) is up."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return procs.http_ok(f"{dashboard}/api/version", headers=headers) and procs.http_ok(
        f"http://{host}:{agent_port}/api/healthz", headers=headers
    )


def _ensure_bucket(bucket: str, env: dict[str, str]) -> None:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
        config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3}),
    )
    try:
        s3.head_bucket(Bucket=bucket)
        return
    except ClientError:
        pass
    try:
        s3.create_bucket(Bucket=bucket)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise StackError(
                f"--bucket {bucket}: could not create it ({e.response.get('Error', {}).get('Code')})"
            ) from None
    except BotoCoreError as e:
        raise StackError(f"--bucket {bucket}: could not create it ({type(e).__name__})") from None


# ---------------------------------------------------------------- down, status


def down(d: Path, say: Callable[[str], None] = print) -> bool:
    """Stop the recorded processes in reverse order and remove the env file. Returns
    False when there was no stack to stop."""
    d = Path(d).expanduser().resolve()
    state = read_state(d)
    (d / ENV_FILE).unlink(missing_ok=True)
    if state is None:
        say(f"no stack state in {d}: nothing to stop")
        return False
    for s in reversed([Service(**x) for x in state["services"]]):
        if _ours(s):
            t0 = time.perf_counter()
            _stop_service(s)
            say(f"  stopped {s.name:<7} pid {s.pid} ({time.perf_counter() - t0:.1f} s)")
        elif _group_alive(s.pid):  # the leader died, what it started did not
            procs.stop(s.pid, timeout=10.0)
            say(f"  {s.name:<7} pid {s.pid} had exited; stopped the rest of its process group")
        else:
            say(f"  {s.name:<7} pid {s.pid} was not running")
    _state_path(d).unlink(missing_ok=True)
    say(f"stack down ({d}; data kept)")
    return True


def status(d: Path) -> list[dict]:
    """One row per recorded service: name, pid, port, url, running, healthy."""
    d = Path(d).expanduser().resolve()
    state = read_state(d)
    if state is None:
        return []
    rows = []
    for s in (Service(**x) for x in state["services"]):
        running = _ours(s)
        if s.name == "s3":
            healthy = running and procs.http_ok(f"{s.url}/healthz")
        elif s.name == "mlflow":
            healthy = running and procs.http_ok(f"{s.url}/health")
        else:
            healthy = running and _ray_ok(s.url, url_host(state["host"]), s.extra.get("agent_port", 0))
        rows.append(
            {
                "name": s.name,
                "pid": s.pid,
                "port": s.port,
                "url": s.url,
                "running": running,
                "healthy": healthy,
                "log": s.log,
                **s.extra,
            }
        )
    return rows
