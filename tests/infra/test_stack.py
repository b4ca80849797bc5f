"""`clpipe stack up | status | down` against the real servers (SeaweedFS, MLflow, Ray) on
127.0.0.1, on ports picked free for the test; every process is stopped by pid. One stack,
started by ``clpipe stack up`` for the module, also takes the pipeline as Ray Jobs:
`clpipe submit | stop` and the documented `ray job submit` (the whole chain as a job, with
`clpipe jobs` and `logs`, runs on two hosts in tests/infra/test_twohost.py); the module's last
test takes it down with ``clpipe stack down``."""

import contextlib
import io
import json
import os
import random
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
from mlflow.tracking import MlflowClient

from infra import jobs, procs, stack
from pipelines.cli import main
from tests.conftest import cmdline

# one xdist process runs this module (its tests share the module's live stack): tests/conftest.py LANES

ENV_KEYS = {
    "MLFLOW_TRACKING_URI",
    "RAY_ADDRESS",
    "CLPIPE_JOB_ADDRESS",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "MLFLOW_S3_ENDPOINT_URL",
    "RAY_AUTH_MODE",
}


def free_stack_ports() -> dict[str, int]:
    """Ports for one stack. SeaweedFS needs s3..s3+3 and each +10000: all of them below the
    ephemeral range (32768-), where another process's outgoing connection could hold one."""
    while True:
        s3 = random.randint(20000, 22700)
        if all(procs.port_free(p) and procs.port_free(p, "0.0.0.0") for p in stack.seaweed.ports(s3).values()):
            break
    taken = set(stack.seaweed.ports(s3).values())
    out = {"s3": s3}
    for name in ("mlflow", "ray", "dashboard"):
        p = procs.free_port()
        while p in taken:
            p = procs.free_port()
        taken.add(p)
        out[name] = p
    return out


def up_args(d: Path, ports: dict[str, int], num_cpus: int = 2) -> list[str]:
    return [
        "stack",
        "up",
        "--dir",
        str(d),
        "--s3-port",
        str(ports["s3"]),
        "--mlflow-port",
        str(ports["mlflow"]),
        "--ray-port",
        str(ports["ray"]),
        "--dashboard-port",
        str(ports["dashboard"]),
        "--num-cpus",
        str(num_cpus),
    ]


def busy(ports, wait: float = 5.0) -> list[int]:
    """The ports of ``ports`` still bound after up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        left = [p for p in ports if not procs.port_free(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def stack_pids(d: Path) -> list[int]:
    """Every process the stack in ``d`` runs: the recorded pids and their trees."""
    state = stack.read_state(d) or {"services": []}
    return [q for s in state["services"] for q in (s["pid"], *stack._descendants(s["pid"]))]


def ray_temp_dir(d: Path) -> Path | None:
    """The Ray temp dir the stack in ``d`` uses when it is the /tmp fallback (the test's own
    path is too long for Ray's unix sockets): removed by the fixtures with the session logs."""
    state = stack.read_state(d) or {"services": []}
    for s in state["services"]:
        t = s["extra"].get("temp_dir") if s["name"] == "ray" else None
        if t and Path(t).name.startswith("clpipe-ray-"):
            return Path(t)
    return None


def stop_stack(d: Path) -> None:
    """Stop the stack in ``d`` and anything left of its process trees, by pid."""
    pids, tmp = stack_pids(d), ray_temp_dir(d)
    stack.down(d, say=lambda _: None)
    for p in pids:
        if procs.alive(p):
            procs.stop(p, timeout=5)
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def clean_env():
    """main() loads the stack's env file into os.environ: put it back afterwards."""
    saved = dict(os.environ)
    for k in ENV_KEYS | {"CLPIPE_STACK_ENV"}:
        os.environ.pop(k, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def stack_dir(tmp_path):
    """A state dir whose stack is stopped (by the recorded pids) whatever the test did."""
    d = tmp_path / "stack"
    yield d
    stop_stack(d)


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory):
    """A stack started with ``clpipe stack up`` (2 CPUs: the jobs' two Train workers); the CLI reads its env
    file, not the developer's shell. Stopped by pid afterwards whatever the tests did."""
    saved = dict(os.environ)
    for k in ENV_KEYS | {"CLPIPE_STACK_ENV"}:
        os.environ.pop(k, None)
    d = tmp_path_factory.mktemp("live") / "stack"
    ports = free_stack_ports()
    # as in a shell that ran a pipeline on a local Ray: that Ray's State API in the environment,
    # which the stack's head (its job server, Train's placement-group cleaner) must not follow
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{procs.free_port()}"
    out, err = io.StringIO(), io.StringIO()
    try:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(up_args(d, ports))
        print(f"\nstack up: {time.perf_counter() - t0:.1f} s")
        assert rc == 0, out.getvalue() + err.getvalue()
        env_file = d / stack.ENV_FILE
        os.environ["CLPIPE_STACK_ENV"] = str(env_file)
        yield SimpleNamespace(
            dir=d,
            ports=ports,
            env=stack.read_env_file(env_file),
            env_file=env_file,
            up_out=out.getvalue(),
            up_err=err.getvalue(),
            pids=stack_pids(d),
            tmp=ray_temp_dir(d),
            address=f"http://127.0.0.1:{ports['dashboard']}",
        )
    finally:
        stop_stack(d)
        os.environ.clear()
        os.environ.update(saved)


def _secrets(live_stack) -> list[str]:
    return [live_stack.env["AWS_ACCESS_KEY_ID"], live_stack.env["AWS_SECRET_ACCESS_KEY"]]


@pytest.mark.slow
def test_stack_up_status_env_file_and_artifacts_in_s3(live_stack, capsys):
    d, ports = live_stack.dir, live_stack.ports
    for name in ("s3", "mlflow", "ray"):
        assert f"  {name} " in live_stack.up_out

    # the MLflow server without MLflow's GenAI job runner and its consumer processes
    running = [cmdline(p) for p in stack_pids(d)]
    assert not [c for c in running if b"mlflow.server.jobs" in c], running

    assert main(["stack", "status", "--dir", str(d)]) == 0
    status_out = capsys.readouterr()
    assert status_out.out.count("healthy") == 3, status_out.out

    assert main(up_args(d, ports)) == 1  # a second `up` on a running stack
    assert "a stack is already running from" in capsys.readouterr().err

    # the env file: every key, private, pointing at the ports asked for
    env_file = live_stack.env_file
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((d / stack.CREDENTIALS_FILE).stat().st_mode) == 0o600
    env = live_stack.env
    assert ENV_KEYS <= set(env)
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['mlflow']}"
    assert env["RAY_ADDRESS"] == f"127.0.0.1:{ports['ray']}"
    assert env["CLPIPE_JOB_ADDRESS"] == f"http://127.0.0.1:{ports['dashboard']}"
    assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == f"http://127.0.0.1:{ports['s3']}"
    assert env["RAY_AUTH_MODE"] == "disabled"

    # the S3 keys are never printed
    for secret in _secrets(live_stack):
        for text in (live_stack.up_out, live_stack.up_err, status_out.out, status_out.err):
            assert secret not in text

    # an artifact logged through the server (the client has no S3 keys) lands in the bucket
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp_id = client.create_experiment("stack-test")
    run = client.create_run(exp_id)
    client.log_text(run.info.run_id, "hello from the stack test", "notes/hello.txt")
    client.set_terminated(run.info.run_id)
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="clpipe", Prefix="mlflow/").get("Contents", [])]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/notes/hello.txt") for k in keys), keys

    # the CLI reads the env file when pointed at it, without overriding what is set
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    os.environ["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:1"
    try:
        stack.load_env()
        assert os.environ["RAY_ADDRESS"] == env["RAY_ADDRESS"]
        assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:1"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# the job: the chain with MoCo pretraining (two workers) and a supervised-contrastive
# fine-tune, so that one run also takes a momentum encoder (EMA, a queue filled across
# workers, shuffle-BN) through every stage; the later stages on one worker each
@pytest.mark.slow
def test_stop_ends_a_running_job_submitted_with_a_config_outside_the_project(live_stack, tmp_path, capsys):
    cfg = tmp_path / "long.yaml"  # outside the project: its text travels with the job
    cfg.write_text("name: long-job\nsweep:\n  enabled: false\npretrain:\n  epochs: 500\n")
    # Ray's own variables name another cluster (dead addresses): Ray's job client prefers them to the address
    # it is given, clpipe's must not (the whole chain as a job: tests/infra/test_twohost.py)
    saved = {k: os.environ.get(k) for k in jobs.ADDRESS_ENV}
    os.environ.update(
        RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{procs.free_port()}", RAY_ADDRESS=f"127.0.0.1:{procs.free_port()}"
    )
    try:
        assert main(["submit", str(cfg), "--no-follow", "--work-dir", str(tmp_path / "work")]) == 0
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out = capsys.readouterr().out
    job_id = re.search(r"submitted job (\S+) to ", out).group(1)
    assert "clpipe-long-job-" in job_id and f"clpipe logs {job_id} --follow" in out

    client = jobs.connect(live_stack.address)
    procs.wait_until(lambda: "pipeline long-job" in client.get_job_logs(job_id), 240, "the long job's first line")
    assert str(client.get_job_status(job_id)) == "RUNNING"

    t0 = time.perf_counter()
    assert main(["stop", job_id]) == 0
    print(f"stop: {time.perf_counter() - t0:.1f} s")
    assert f"job {job_id} STOPPED" in capsys.readouterr().out
    assert str(client.get_job_status(job_id)) == "STOPPED"
    assert main(["stop", job_id]) == 0
    assert f"job {job_id} already STOPPED" in capsys.readouterr().out


@pytest.mark.slow
def test_the_documented_ray_job_submit_runs_the_pipeline(live_stack, tmp_path):
    env = live_stack.env
    # locations only: the stack's Ray head holds the S3 keys, as a cluster's nodes hold their own
    runtime_env = {
        "env_vars": {
            k: env[k]
            for k in (
                "MLFLOW_TRACKING_URI",
                "AWS_ENDPOINT_URL",
                "AWS_DEFAULT_REGION",
                "MLFLOW_S3_ENDPOINT_URL",
                "RAY_AUTH_MODE",
            )
        },
        "excludes": jobs.EXCLUDES,
    }
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        live_stack.address,
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "python",
        "-m",
        "pipelines",
        "run",
        "--until",
        "shard",
        "--work-dir",
        str(tmp_path / "work"),
        "--set",
        "sweep.enabled=false",
        "--set",
        "name=via-ray-cli",
    ]
    t0 = time.perf_counter()
    shell = {k: v for k, v in os.environ.items() if k not in jobs.ADDRESS_ENV}  # the user's shell: --address rules
    r = subprocess.run(
        cmd,
        cwd=jobs.project_root(),
        capture_output=True,
        text=True,
        timeout=400,
        env={**shell, "RAY_AUTH_MODE": "disabled"},
    )
    print(f"ray job submit (shard stage): {time.perf_counter() - t0:.1f} s")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout and "pipeline via-ray-cli" in r.stdout

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("clpipe")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'pipeline via-ray-cli'")
    assert [x.info.status for x in runs] == ["FINISHED"]


@pytest.mark.slow
def test_stack_down_stops_every_process_and_frees_the_ports(live_stack, capsys):
    d, ports, pids = live_stack.dir, live_stack.ports, live_stack.pids
    assert len(pids) >= 3
    t0 = time.perf_counter()
    assert main(["stack", "down", "--dir", str(d)]) == 0
    print(f"stack down: {time.perf_counter() - t0:.1f} s")
    assert [p for p in pids if procs.alive(p)] == []
    assert busy([*stack.seaweed.ports(ports["s3"]).values(), ports["mlflow"], ports["ray"], ports["dashboard"]]) == []
    assert not live_stack.env_file.exists() and stack.read_state(d) is None
    assert main(["stack", "status", "--dir", str(d)]) == 1
    assert "no stack" in capsys.readouterr().out
    if live_stack.tmp is not None:
        shutil.rmtree(live_stack.tmp, ignore_errors=True)


def _children() -> set[int]:
    me = os.getpid()
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me and fields[0] != "Z":
                out.add(int(entry))
    return out


def test_a_port_in_use_fails_with_one_line_and_starts_nothing(stack_dir, clean_env, capsys):
    ports = free_stack_ports()
    before = _children()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", ports["mlflow"]))
        s.listen()
        t0 = time.perf_counter()
        assert main(up_args(stack_dir, ports)) == 1
        assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err.strip()
    assert err == (
        f"clpipe: MLflow server: port 127.0.0.1:{ports['mlflow']} is already in use; stop what holds it "
        "or choose another port (nothing was started)"
    )
    assert _children() == before
    assert procs.port_free(ports["s3"]) and stack.read_state(stack_dir) is None


def test_two_services_on_one_port_and_a_bad_bucket_are_refused(stack_dir, clean_env, capsys):
    ports = free_stack_ports()
    args = up_args(stack_dir, ports)
    args[args.index("--mlflow-port") + 1] = str(ports["s3"] + 1)  # SeaweedFS's master port
    assert main(args) == 1
    assert "MLflow server and SeaweedFS master would both use port" in capsys.readouterr().err
    assert main([*up_args(stack_dir, ports), "--bucket", "No_Such"]) == 1
    assert "--bucket 'No_Such'" in capsys.readouterr().err
    assert stack.read_state(stack_dir) is None


@pytest.mark.slow
def test_a_server_that_fails_to_start_stops_the_ones_before_it(stack_dir, clean_env, capsys):
    ports = free_stack_ports()
    (stack_dir / "mlflow.db").mkdir(parents=True)  # sqlite cannot open a directory: the MLflow server exits
    t0 = time.perf_counter()
    assert main([*up_args(stack_dir, ports), "--timeout", "12"]) == 1  # MLflow retries sqlite for minutes
    assert time.perf_counter() - t0 < 60
    err = capsys.readouterr().err
    assert (
        "MLflow server did not become healthy within 12 s" in err
        and "stopped what had started: s3 (pid" in err
        and "mlflow (pid" in err
    )
    pid = int(err.split("s3 (pid ")[1].split(")")[0])
    assert not procs.alive(pid)
    assert stack.read_state(stack_dir) is None and not (stack_dir / stack.ENV_FILE).exists()
    assert busy(stack.seaweed.ports(ports["s3"]).values()) == []


def test_env_file_loading_never_overrides(tmp_path, clean_env):
    f = tmp_path / "stack.env"
    f.write_text("# comment\nRAY_ADDRESS=127.0.0.1:7777\nexport MLFLOW_TRACKING_URI='http://127.0.0.1:9'\n\n")
    os.environ["RAY_ADDRESS"] = "10.0.0.1:6379"
    assert stack.load_env(f) == f
    assert os.environ["RAY_ADDRESS"] == "10.0.0.1:6379"
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:9"
    os.environ["CLPIPE_STACK_ENV"] = str(tmp_path / "missing.env")
    with pytest.raises(stack.StackError, match="CLPIPE_STACK_ENV"):
        stack.load_env()


@pytest.mark.slow
def test_jobs_commands_reach_a_head_with_token_auth(tmp_path, clean_env, monkeypatch):
    """A Ray head with token auth on: with the cluster's token (RAY_AUTH_MODE=token,
    RAY_AUTH_TOKEN) `clpipe jobs` and `stop` get through, the reachability probe included;
    without it, one line that names token auth and the two settings."""
    import tempfile
    import urllib.request

    token = os.urandom(16).hex()
    temp = Path(tempfile.mkdtemp(prefix="clpipe-ray-"))  # short: Ray's unix socket paths
    port, dash = procs.free_port(), procs.free_port()
    url = f"http://127.0.0.1:{dash}"
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token of the developer's
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--num-cpus=1",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        "--block",
    ]
    pid = procs.spawn(
        cmd,
        tmp_path / "ray.log",
        env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_ADDRESS": None, "RAY_API_SERVER_ADDRESS": None},
    )

    def answers() -> bool:
        req = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        procs.wait_until(answers, 120, "the token-auth Ray head", pid, tmp_path / "ray.log")

        def cli(*args: str, **token_env: str) -> subprocess.CompletedProcess:
            # each in a process of its own, as from a shell: Ray keeps a process's first auth mode and token
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")},
                "RAY_AUTH_MODE": "token",
                **token_env,
            }
            return subprocess.run(
                [sys.executable, "-m", "pipelines", *args, "--address", url],
                capture_output=True,
                text=True,
                env=env,
                cwd=Path(__file__).parents[2],
                timeout=120,
            )

        r = cli("jobs", RAY_AUTH_TOKEN=token)
        assert r.returncode == 0 and f"no jobs on {url}" in r.stdout, r.stdout + r.stderr
        r = cli("stop", "no-such-job", RAY_AUTH_TOKEN=token)  # an authenticated call of Ray's client
        assert r.returncode == 1 and "no job no-such-job" in r.stderr, r.stdout + r.stderr
        for token_env, message in (
            ({"RAY_AUTH_TOKEN": "0" * 32}, "refused the request (HTTP 40"),
            ({}, "RAY_AUTH_MODE=token but no token is set here"),
        ):
            r = cli("jobs", **token_env)
            err = r.stderr.strip()
            assert r.returncode == 1 and len(err.splitlines()) == 1, r.stdout + r.stderr
            assert message in err and "RAY_AUTH_TOKEN" in err and token not in err
    finally:
        stack._stop_service(stack.Service("ray", pid, port, url, str(tmp_path / "ray.log")))
        shutil.rmtree(temp, ignore_errors=True)


def test_a_jobs_command_for_another_cluster_loads_no_stack_settings(tmp_path, clean_env, capsys):
    """The stack's env file (loopback URLs, its keys, auth off) is loaded for the stack's own
    job server only: a submit/jobs/logs/stop with --address of another cluster gets none of it."""
    f = tmp_path / "stack.env"
    f.write_text(
        "CLPIPE_JOB_ADDRESS=http://127.0.0.1:8265\nMLFLOW_TRACKING_URI=http://127.0.0.1:5000\n"
        "AWS_SECRET_ACCESS_KEY=stack-secret\nRAY_AUTH_MODE=disabled\n"
    )
    os.environ["CLPIPE_STACK_ENV"] = str(f)
    loaded = ("MLFLOW_TRACKING_URI", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_MODE")
    for address in ("http://127.0.0.1:9", "127.0.0.1:9", "http://10.0.0.1:8265"):
        assert stack.load_env(job_address=address) is None
        assert not any(k in os.environ for k in loaded), address
    assert main(["jobs", "--address", "http://127.0.0.1:9"]) == 1  # nothing listens there
    assert "127.0.0.1:9" in capsys.readouterr().err and not any(k in os.environ for k in loaded)
    # the stack's own address (with or without the scheme), or none: loaded
    assert stack.load_env(job_address="127.0.0.1:8265") == f and os.environ["AWS_SECRET_ACCESS_KEY"] == "stack-secret"
    for k in loaded:
        del os.environ[k]
    assert stack.load_env() == f and all(k in os.environ for k in loaded)


def test_state_file_holds_no_secrets(tmp_path):
    """The state JSON is written without the keys (they live in the 0600 files only)."""
    cfg = stack.StackConfig(dir=tmp_path)
    stack._write_state(tmp_path, cfg, [stack.Service("s3", 1, 8333, "http://127.0.0.1:8333", "log")])
    access, secret, token = stack._credentials(tmp_path)
    text = (tmp_path / stack.STATE_FILE).read_text()
    assert access not in text and secret not in text and token not in text
    assert json.loads(text)["services"][0]["name"] == "s3"
    assert stack._credentials(tmp_path) == (access, secret, token)  # reused by the next `up`
