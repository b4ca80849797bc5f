"""`clpipe stack up | status | down` against the real servers (SeaweedFS, MLflow, Ray) on
127.0.0.1, on ports picked free for the test; every process is stopped by pid."""

import json
import os
import random
import shutil
import socket
import stat
import time
from pathlib import Path

import boto3
import pytest
from mlflow.tracking import MlflowClient

from infra import procs, stack
from pipelines.cli import main

ENV_KEYS = {"MLFLOW_TRACKING_URI", "RAY_ADDRESS", "CLPIPE_JOB_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL", "RAY_AUTH_MODE"}


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
    return ["stack", "up", "--dir", str(d), "--s3-port", str(ports["s3"]), "--mlflow-port", str(ports["mlflow"]),
            "--ray-port", str(ports["ray"]), "--dashboard-port", str(ports["dashboard"]), "--num-cpus", str(num_cpus)]


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


@pytest.mark.slow
def test_stack_up_status_artifacts_in_s3_and_down(stack_dir, clean_env, capsys):
    ports = free_stack_ports()
    t0 = time.perf_counter()
    assert main(up_args(stack_dir, ports)) == 0
    up_out = capsys.readouterr()
    print(f"stack up: {time.perf_counter() - t0:.1f} s")
    for name in ("s3", "mlflow", "ray"):
        assert f"  {name} " in up_out.out

    assert main(["stack", "status", "--dir", str(stack_dir)]) == 0
    status_out = capsys.readouterr()
    assert status_out.out.count("healthy") == 3, status_out.out

    assert main(up_args(stack_dir, ports)) == 1  # a second `up` on a running stack
    assert "a stack is already running from" in capsys.readouterr().err

    # the env file: every key, private, pointing at the ports asked for
    env_file = stack_dir / stack.ENV_FILE
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((stack_dir / stack.CREDENTIALS_FILE).stat().st_mode) == 0o600
    env = stack.read_env_file(env_file)
    assert ENV_KEYS <= set(env)
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['mlflow']}"
    assert env["RAY_ADDRESS"] == f"127.0.0.1:{ports['ray']}"
    assert env["CLPIPE_JOB_ADDRESS"] == f"http://127.0.0.1:{ports['dashboard']}"
    assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == f"http://127.0.0.1:{ports['s3']}"
    assert env["RAY_AUTH_MODE"] == "disabled"

    # the S3 keys are never printed
    for secret in (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]):
        for out in (up_out, status_out):
            assert secret not in out.out and secret not in out.err

    # an artifact logged through the server (the client has no S3 keys) lands in the bucket
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp_id = client.create_experiment("stack-test")
    run = client.create_run(exp_id)
    client.log_text(run.info.run_id, "hello from the stack test", "notes/hello.txt")
    client.set_terminated(run.info.run_id)
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="clpipe", Prefix="mlflow/").get("Contents", [])]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/notes/hello.txt") for k in keys), keys

    # the CLI reads the env file when pointed at it, without overriding what is set
    os.environ["CLPIPE_STACK_ENV"] = str(env_file)
    os.environ["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:1"
    stack.load_env()
    assert os.environ["RAY_ADDRESS"] == env["RAY_ADDRESS"]
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:1"

    pids, tmp = stack_pids(stack_dir), ray_temp_dir(stack_dir)
    assert len(pids) >= 3
    t0 = time.perf_counter()
    assert main(["stack", "down", "--dir", str(stack_dir)]) == 0
    print(f"stack down: {time.perf_counter() - t0:.1f} s")
    assert [p for p in pids if procs.alive(p)] == []
    assert busy([*stack.seaweed.ports(ports["s3"]).values(), ports["mlflow"], ports["ray"], ports["dashboard"]]) == []
    assert not env_file.exists() and stack.read_state(stack_dir) is None
    assert main(["stack", "status", "--dir", str(stack_dir)]) == 1
    assert "no stack" in capsys.readouterr().out
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


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
    assert err == (f"clpipe: MLflow server: port 127.0.0.1:{ports['mlflow']} is already in use; stop what holds it "
                   "or choose another port (nothing was started)")
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
    assert main([*up_args(stack_dir, ports), "--timeout", "30"]) == 1  # MLflow retries sqlite for minutes
    assert time.perf_counter() - t0 < 90
    err = capsys.readouterr().err
    assert "MLflow server did not become healthy within 30 s" in err and "stopped what had started: s3 (pid" in err and "mlflow (pid" in err
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


def test_state_file_holds_no_secrets(tmp_path):
    """The state JSON is written without the keys (they live in the 0600 files only)."""
    cfg = stack.StackConfig(dir=tmp_path)
    stack._write_state(tmp_path, cfg, [stack.Service("s3", 1, 8333, "http://127.0.0.1:8333", "log")])
    access, secret = stack._credentials(tmp_path)
    text = (tmp_path / stack.STATE_FILE).read_text()
    assert access not in text and secret not in text
    assert json.loads(text)["services"][0]["name"] == "s3"
    assert stack._credentials(tmp_path) == (access, secret)  # reused by the next `up`
