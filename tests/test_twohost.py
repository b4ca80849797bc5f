"""Two hosts, for real: the whole pipeline submitted to a Ray cluster whose worker node is
another host (network and mount namespaces of this machine, tests/hosts.py).

Host A runs the stack (`clpipe stack up`: SeaweedFS, the MLflow server, a Ray head with
token auth and no CPUs, as in ray_cluster.yaml); host B runs a Ray worker node that joins
over the veth address, only after the job has started (the stages wait for it as on an
autoscaling cluster). `clpipe submit` from host A runs the default chain, shard through
register:

- with shards, Ray storage and artifacts in S3 and tracking on the server: the training
  workers ran on host B, the registry holds the three models, host B's private work dir
  holds nothing, and the S3 secret (the nodes' own credentials; the submit sends none)
  is in no bucket object, MLflow param or tag, job info or Ray log of either host;
- with one directory shared into both hosts (an NFS-style POSIX path) instead of S3;
- with a work dir private to each host and no S3: refused before any stage, one line.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
import time
from pathlib import Path

import pytest

from infra import jobs, stack
from tests import hosts

pytestmark = pytest.mark.slow

STACK = "/tmp/stack"  # on host A: private
CHAIN = ["--set", "sweep.space={temperature: {grid: [0.2, 0.5]}}", "--set", "sweep.epochs=1",
         "--set", "pretrain.epochs=1", "--set", "labels.fractions=[0.1]", "--set", "finetune.epochs=1",
         "--set", "finetune.baseline=false", "--set", "finetune.min_steps=0", "--set", "distill.epochs=1"]
JOB_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Hosts A (the stack, Ray head with token auth) and B (nothing yet), a directory
    private to each (the work dir) and one shared by both; the stack's env file and S3
    secret."""
    why = hosts.unavailable()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"two-host test cannot run: {why}")
        pytest.skip(why)
    root = Path(f"/var/tmp/clpipe-2host-{secrets.token_hex(3)}")  # outside /tmp: the hosts' /tmp is private
    private, shared = root / "private", root / "shared"
    private.mkdir(parents=True)
    shared.mkdir()
    logs = tmp_path_factory.mktemp("twohost")
    try:
        with hosts.two_hosts(private=[private]) as (a, b):
            secret = f"clpipe-leak-canary-{secrets.token_hex(8)}"
            creds = a.file(STACK) / stack.CREDENTIALS_FILE  # the stack reuses these keys: a secret we recognise
            creds.parent.mkdir(mode=0o700, parents=True)
            creds.write_text(json.dumps({"access_key": "clpipe2host", "secret_key": secret,
                                         "ray_token": secrets.token_hex(32)}))
            t0 = time.perf_counter()
            r = a.run([sys.executable, "-m", "pipelines", "stack", "up", "--dir", STACK, "--host", a.ip,
                       "--num-cpus", "0", "--ray-auth", "token"], timeout=300, cwd=jobs.project_root())
            assert r.returncode == 0, r.stdout + r.stderr
            env = stack.read_env_file(a.file(STACK) / stack.ENV_FILE)
            assert env["RAY_AUTH_MODE"] == "token" and env["AWS_SECRET_ACCESS_KEY"] == secret
            print(f"stack up on host A: {time.perf_counter() - t0:.1f} s")
            yield {"a": a, "b": b, "env": env, "secret": secret, "private": private, "shared": shared,
                   "logs": logs}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _join_b(c: dict) -> int:
    """Host B's Ray node joins the head on host A: the token, and the node's own S3
    credentials (as an instance role gives them)."""
    b, env = c["b"], c["env"]
    ray = str(Path(sys.executable).parent / "ray")
    node_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": env["RAY_AUTH_TOKEN"],
                "AWS_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return b.spawn([ray, "start", f"--address={c['a'].ip}:6379", f"--node-ip-address={b.ip}", "--num-cpus=2",
                    "--disable-usage-stats", "--block"], c["logs"] / "ray-b.log", env=node_env)


def _submit(c: dict, args: list[str], on_line=None) -> tuple[int, str]:
    """`clpipe submit ARGS` on host A, followed to the job's end: (return code, output).
    ``on_line(line)`` sees each line as it comes."""
    p = c["a"].popen([sys.executable, "-m", "pipelines", "submit", *args],
                     env={"CLPIPE_STACK_ENV": f"{STACK}/{stack.ENV_FILE}"}, cwd=jobs.project_root())
    assert p.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + JOB_TIMEOUT_S
    for line in p.stdout:
        lines.append(line)
        if on_line is not None:
            on_line(line)
        if time.monotonic() > deadline:
            p.kill()
            break
    return p.wait(timeout=60), "".join(lines)


CHECK = r"""
import json, os, sys
import boto3
from mlflow.tracking import MlflowClient
from ray.job_submission import JobSubmissionClient

secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
client = MlflowClient()
exp = client.get_experiment_by_name("clpipe")
runs = client.search_runs([exp.experiment_id], max_results=1000)
leaks = [f"mlflow run {r.info.run_id}" for r in runs if secret.decode() in repr(r.data.params) + repr(r.data.tags)]
s3 = boto3.client("s3")
written = {}
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=os.environ["CLPIPE_S3_BUCKET"]):
    for o in page.get("Contents", []):
        if not o["Size"]:
            continue
        parts = o["Key"].split("/")
        where = "/".join(parts[:3]) if parts[0] != "mlflow" else "mlflow"
        where = where.split("-")[0] if parts[:2] == ["run", "ray"] else where
        written[where] = written.get(where, 0) + o["Size"]
        body = s3.get_object(Bucket=os.environ["CLPIPE_S3_BUCKET"], Key=o["Key"])["Body"].read()
        if secret in body:
            leaks.append("s3://" + o["Key"])
jobs = JobSubmissionClient(os.environ["CLPIPE_JOB_ADDRESS"])
for j in jobs.list_jobs():
    if secret.decode() in repr(j):
        leaks.append(f"job {j.submission_id}")
models = {m.name: sorted(int(v.version) for v in client.search_model_versions(f"name = '{m.name}'"))
          for m in client.search_registered_models()}
print(json.dumps({"leaks": leaks, "written": written, "models": models, "runs": [
    {"id": r.info.run_id, "status": r.info.status, "tags": r.data.tags} for r in runs]}))
"""


def _check(c: dict) -> dict:
    env = {**c["env"], "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = c["a"].run([sys.executable, "-c", CHECK], env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _stages(out: dict, pipeline: str) -> dict[str, dict]:
    """The stage runs of the latest pipeline run named ``pipeline``: {stage: run}."""
    parents = [r for r in out["runs"] if r["tags"].get("clpipe.kind") == "pipeline"
               and r["tags"].get("mlflow.runName") == f"pipeline {pipeline}"]
    assert parents, f"no pipeline run {pipeline}"
    parent = parents[0]["id"]  # search_runs: newest first
    return {r["tags"]["clpipe.stage"]: r for r in out["runs"] if r["tags"].get("mlflow.parentRunId") == parent}


def _files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def test_the_whole_chain_on_two_hosts_with_s3_then_a_shared_path(cluster, capsys):
    c = cluster
    a, b = c["a"], c["b"]
    work = c["private"] / "work"  # a path private to each host: only host A's driver writes there
    started_b: list[int] = []

    def join_when_running(line: str) -> None:  # host B joins once the job has started
        if not started_b and "clpipe: pipeline" in line:
            started_b.append(_join_b(c))

    t0 = time.perf_counter()
    rc, out = _submit(c, ["--work-dir", str(work), "--set", "name=s3chain",
                          "--set", "data.output=s3://clpipe/run/data", "--set", "ray.storage_path=s3://clpipe/run/ray",
                          *CHAIN], on_line=join_when_running)
    s3_seconds = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\ntwo hosts, S3: the chain as a job took {s3_seconds:.1f} s")
    assert rc == 0 and re.search(r"job \S+ SUCCEEDED", out), out[-6000:]
    assert started_b, out[-3000:]
    assert "not sent to the cluster: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in out  # the nodes' own keys were used
    assert "the cluster holds no trial yet" in out or "sweep:" in out

    # the shared-POSIX variant: shards and Ray storage in a directory both hosts mount
    shared_work = c["shared"] / "work"
    t0 = time.perf_counter()
    rc, out2 = _submit(c, ["--work-dir", str(shared_work), "--set", "name=posixchain", *CHAIN])
    posix_seconds = time.perf_counter() - t0
    with capsys.disabled():
        print(f"two hosts, shared POSIX path: the chain as a job took {posix_seconds:.1f} s")
    assert rc == 0 and re.search(r"job \S+ SUCCEEDED", out2), out2[-6000:]

    # a work dir on each host's own disk and no S3: refused before any stage, naming the field and the fix
    rc, out3 = _submit(c, ["--work-dir", str(work / "alone"), "--set", "name=local", "--until", "shard"])
    assert rc == 1, out3[-3000:]
    refusal = [ln for ln in out3.splitlines() if "is not the same storage on node" in ln]
    assert refusal and f"node {b.ip}" in refusal[0] and "data.output" in refusal[0] and "s3://" in refusal[0], out3

    got = _check(c)
    for name in ("s3chain", "posixchain"):
        runs = _stages(got, name)
        assert set(runs) == {"shard", "sweep", "pretrain", "labels", "finetune", "distill", "evaluate", "register"}
        assert all(r["status"] == "FINISHED" for r in runs.values())
        for stage in ("pretrain", "finetune", "distill"):  # the training workers ran on host B
            assert json.loads(runs[stage]["tags"]["clpipe.train.node_ips"]) == {b.ip: 2}, (name, stage)
        versions = {m: v for m, v in got["models"].items() if m.startswith(name)}
        assert len(versions) == 3 and all(v == [1] for v in versions.values()), got["models"]
    assert not got["leaks"], got["leaks"]
    # nothing a later stage needed was on host B's own disk; the S3 run kept its data in the bucket
    assert _files(b.file(work)) == []
    assert not [f for f in _files(a.file(work)) if f.endswith(".tar")]
    assert [f for f in _files(shared_work) if f.endswith(".tar")]  # the POSIX run's shards: on the shared path
    leaked = [f for h, d in ((a, f"{STACK}/ray"), (b, "/tmp/ray")) for f in _files(h.file(d))
              if c["secret"].encode() in Path(f).read_bytes()]
    assert not leaked, leaked
    with capsys.disabled():
        print(f"S3 bytes written per location: {json.dumps(got['written'], sort_keys=True)}")
    assert started_b and b.pids()
