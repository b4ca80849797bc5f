"""Two hosts, for real: the whole pipeline submitted to a Ray cluster whose worker node is
another host (network and mount namespaces of this machine, infra/hosts.py).

Host A runs the stack (`clpipe stack up`: SeaweedFS, the MLflow server, a Ray head with
token auth and no CPUs, as in ray_cluster.yaml); host B runs a Ray worker node that joins
over the veth address, only after the job has started (the stages wait for it as on an
autoscaling cluster). `clpipe submit` from host A runs the default chain, shard through
register:

- with shards, Ray storage and artifacts in S3 and tracking on the server: the training
  workers ran on host B, the registry holds the three models, host B's private work dir
  holds nothing, and the S3 secret (the nodes' own credentials; the submit sends none)
  is in no bucket object, MLflow param or tag, job info or Ray log of either host;
- with one directory shared into both hosts (an NFS-style POSIX path) instead of S3, shard
  through finetune with MoCo and the supervised contrastive fine-tune; `clpipe jobs` and
  `logs` on the job;
- with a work dir private to each host and no S3: refused before any stage, one line.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra import hosts, jobs, stack

pytestmark = pytest.mark.slow

STACK = "/tmp/stack"  # on host A: private
CHAIN = [
    "--set",
    "sweep.space={temperature: {grid: [0.2]}}",
    "--set",
    "sweep.epochs=1",
    "--set",
    "pretrain.epochs=1",
    "--set",
    "labels.fractions=[0.1]",
    "--set",
    "finetune.epochs=1",
    "--set",
    "finetune.baseline=false",
    "--set",
    "finetune.min_steps=0",
    "--set",
    "distill.epochs=1",
    "--set",
    "finetune.num_workers=1",
    "--set",
    "distill.num_workers=1",
]
# the shared-POSIX run, shard through finetune (the S3 run covers the stages after it on two hosts): MoCo (a
# 256-key queue filled by both workers, an EMA key encoder), the supervised contrastive fine-tune on one worker
MOCO = [
    "--set",
    "sweep.enabled=false",
    "--set",
    "pretrain.epochs=1",
    "--set",
    "pretrain.batch_size_per_worker=32",
    "--set",
    "labels.fractions=[0.1]",
    "--set",
    "finetune.epochs=1",
    "--set",
    "finetune.baseline=false",
    "--set",
    "finetune.min_steps=0",
    "--set",
    "finetune.num_workers=1",
    "--set",
    "pretrain.method=moco",
    "--set",
    "pretrain.params.moco={queue_size: 256, momentum: 0.99}",
    "--set",
    "finetune.objective=supcon",
    "--until",
    "finetune",
]
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
            creds.write_text(
                json.dumps({"access_key": "clpipe2host", "secret_key": secret, "ray_token": secrets.token_hex(32)})
            )
            t0 = time.perf_counter()
            r = a.run(
                [
                    sys.executable,
                    "-m",
                    "pipelines",
                    "stack",
                    "up",
                    "--dir",
                    STACK,
                    "--host",
                    a.ip,
                    "--num-cpus",
                    "0",
                    "--ray-auth",
                    "token",
                ],
                timeout=300,
                cwd=jobs.project_root(),
            )
            assert r.returncode == 0, r.stdout + r.stderr
            env = stack.read_env_file(a.file(STACK) / stack.ENV_FILE)
            assert env["RAY_AUTH_MODE"] == "token" and env["AWS_SECRET_ACCESS_KEY"] == secret
            print(f"stack up on host A: {time.perf_counter() - t0:.1f} s")
            yield {"a": a, "b": b, "env": env, "secret": secret, "private": private, "shared": shared, "logs": logs}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _join_b(c: dict) -> int:
    """Host B's Ray node joins the head on host A: the token, and the node's own S3
    credentials (as an instance role gives them)."""
    return c["b"].join_ray(c["a"].ip, c["env"], c["logs"] / "ray-b.log")


def _submit(c: dict, args: list[str], on_line=None) -> tuple[int, str]:
    """`clpipe submit ARGS` on host A, followed to the job's end: (return code, output).
    ``on_line(line)`` sees each line as it comes."""
    p = c["a"].popen(
        [sys.executable, "-m", "pipelines", "submit", *args],
        env={"CLPIPE_STACK_ENV": f"{STACK}/{stack.ENV_FILE}"},
        cwd=jobs.project_root(),
    )
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
import mlflow
outputs = {r.info.run_id: mlflow.artifacts.load_dict(f"runs:/{r.info.run_id}/clpipe_outputs.json") for r in runs
           if r.data.tags.get("clpipe.stage") == "pretrain" and r.info.status == "FINISHED"}
print(json.dumps({"leaks": leaks, "written": written, "models": models, "outputs": outputs, "runs": [
    {"id": r.info.run_id, "status": r.info.status, "tags": r.data.tags, "params": r.data.params,
     "metrics": r.data.metrics} for r in runs]}))
"""


def _check(c: dict) -> dict:
    env = {**c["env"], "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = c["a"].run([sys.executable, "-c", CHECK], env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _stages(out: dict, pipeline: str) -> dict[str, dict]:
    """The stage runs of the latest pipeline run named ``pipeline``: {stage: run}."""
    parents = [
        r
        for r in out["runs"]
        if r["tags"].get("clpipe.kind") == "pipeline" and r["tags"].get("mlflow.runName") == f"pipeline {pipeline}"
    ]
    assert parents, f"no pipeline run {pipeline}"
    parent = parents[0]["id"]  # search_runs: newest first
    return {r["tags"]["clpipe.stage"]: r for r in out["runs"] if r["tags"].get("mlflow.parentRunId") == parent}


def _files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def _cli(c: dict, *args: str) -> subprocess.CompletedProcess:
    """A clpipe command on host A with the stack's env file."""
    return c["a"].run(
        [sys.executable, "-m", "pipelines", *args],
        env={"CLPIPE_STACK_ENV": f"{STACK}/{stack.ENV_FILE}"},
        cwd=jobs.project_root(),
        timeout=120,
    )


# three jobs (the S3 chain, the POSIX one until finetune, the refused one): 190 s alone on 2 cores (103 s
# and 55 s the two chains); with all three chains whole it took 306 s alone, 426 s beside the other lane in
# CI, 566 s (past the 600 s default limit with set-up) when a third process shared the cores
@pytest.mark.timeout(1200)
def test_the_whole_chain_on_two_hosts_with_s3_then_a_shared_path(cluster, capsys):
    c = cluster
    a, b = c["a"], c["b"]
    work = c["private"] / "work"  # a path private to each host: only host A's driver writes there
    started_b: list[int] = []

    def join_when_running(line: str) -> None:  # host B joins once the shard tasks wait for CPUs
        if not started_b and "shards in parallel Ray tasks" in line:
            started_b.append(_join_b(c))

    t0 = time.perf_counter()
    rc, out = _submit(
        c,
        [
            "--work-dir",
            str(work),
            "--set",
            "name=s3chain",
            "--set",
            "data.output=s3://clpipe/run/data",
            "--set",
            "ray.storage_path=s3://clpipe/run/ray",
            *CHAIN,
        ],
        on_line=join_when_running,
    )
    s3_seconds = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\ntwo hosts, S3: the chain as a job took {s3_seconds:.1f} s")
    assert rc == 0 and re.search(r"job \S+ SUCCEEDED", out), out[-6000:]
    assert started_b, out[-3000:]
    assert "not sent to the cluster: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in out  # the nodes' own keys were used
    assert "stage shard" in out and "stage register" in out and "wall time" in out  # the job's log, followed
    assert "waiting for it to finish" not in out  # no other run held a stage key

    # the shared-POSIX variant: shards and Ray storage in a directory both hosts mount; MoCo and SupCon
    shared_work = c["shared"] / "work"
    t0 = time.perf_counter()
    rc, out2 = _submit(c, ["--work-dir", str(shared_work), "--set", "name=posixchain", *MOCO])
    posix_seconds = time.perf_counter() - t0
    with capsys.disabled():
        print(f"two hosts, shared POSIX path: the chain as a job took {posix_seconds:.1f} s")
    assert rc == 0 and re.search(r"job \S+ SUCCEEDED", out2), out2[-6000:]
    job_id = re.search(r"submitted job (\S+) to ", out2).group(1)

    # a work dir on each host's own disk and no S3: refused before any stage, naming the field and the fix
    rc, out3 = _submit(c, ["--work-dir", str(work / "alone"), "--set", "name=local", "--until", "shard"])
    assert rc == 1, out3[-3000:]
    refusal = [ln for ln in out3.splitlines() if "is not the same storage on node" in ln]
    assert refusal and f"node {b.ip}" in refusal[0] and "data.output" in refusal[0] and "s3://" in refusal[0], out3

    # the jobs commands against the token-auth head
    r = _cli(c, "jobs")
    assert r.returncode == 0 and re.search(
        rf"^{re.escape(job_id)}\s+SUCCEEDED\s+\d{{4}}-\d\d-\d\d .*python -m "
        "pipelines run",
        r.stdout,
        re.M,
    ), r.stdout + r.stderr
    r = _cli(c, "logs", job_id)
    assert (
        r.returncode == 0 and "stage finetune" in r.stdout and f"MLflow {c['env']['MLFLOW_TRACKING_URI']}" in r.stdout
    )
    r = _cli(c, "logs", "no-such-job")
    assert r.returncode == 1 and r.stderr.strip() == (
        f"clpipe: no job no-such-job on {c['env']['CLPIPE_JOB_ADDRESS']};"
        f" list them with `clpipe jobs --address "
        f"{c['env']['CLPIPE_JOB_ADDRESS']}`"
    )

    got = _check(c)
    workers = {
        "s3chain": {"pretrain": 2, "finetune": 1, "distill": 1},
        "posixchain": {"pretrain": 2, "finetune": 1},
    }
    for name, expected in workers.items():
        runs = _stages(got, name)
        want = (
            {"shard", "labels", "sweep", "pretrain", "finetune", "distill", "evaluate", "register"}
            if name == "s3chain"
            else {"shard", "labels", "pretrain", "finetune"}
        )
        assert set(runs) == want and all(r["status"] == "FINISHED" for r in runs.values())
        for stage, n in expected.items():  # the training workers ran on host B
            assert json.loads(runs[stage]["tags"]["clpipe.train.node_ips"]) == {b.ip: n}, (name, stage)
        versions = {m: v for m, v in got["models"].items() if m.startswith(name)}
        assert len(versions) == (3 if name == "s3chain" else 0) and all(v == [1] for v in versions.values()), got[
            "models"
        ]
    for text in (out, out2, out3):
        assert c["secret"] not in text
    assert not got["leaks"], got["leaks"]
    # nothing a later stage needed was on host B's own disk; the S3 run kept its data in the bucket
    assert _files(b.file(work)) == []
    assert not [f for f in _files(a.file(work)) if f.endswith(".tar")]
    assert [f for f in _files(shared_work) if f.endswith(".tar")]  # the POSIX run's shards: on the shared path
    leaked = [
        f
        for h, d in ((a, f"{STACK}/ray"), (b, "/tmp/ray"))
        for f in _files(h.file(d))
        if c["secret"].encode() in Path(f).read_bytes()
    ]
    assert not leaked, leaked
    with capsys.disabled():
        print(f"S3 bytes written per location: {json.dumps(got['written'], sort_keys=True)}")
    _moco_run(_stages(got, "posixchain"), got["outputs"])


def _moco_run(runs: dict, outputs: dict) -> None:
    """The MoCo run: hyperparameters from ``pretrain.params.moco`` as ``method.*`` params,
    a 256-key queue filled by both workers (on host B), a key encoder moved by EMA only,
    and the supervised contrastive fine-tune from the encoder alone. Its checkpoint is read
    here from the shared path."""
    import torch

    from pipelines.stages._pretraining import load_method

    pre = runs["pretrain"]
    assert pre["params"]["method.queue_size"] == "256" and pre["params"]["method.momentum"] == "0.99"
    assert pre["params"]["method.temperature"] == "None" and pre["params"]["method.version"] == "2"
    assert 0 <= pre["metrics"]["val/knn_top1"] <= 1 and "train/pos_top1" in pre["metrics"]
    method = load_method(outputs[pre["id"]])
    steps = int(pre["metrics"]["step"])  # steps x 2 workers x 32 keys went through the 256-key queue: it wrapped
    assert steps * 64 > 256 and int(method.queue.ptr) == (steps * 64) % 256
    q, k = dict(method.backbone.named_parameters()), dict(method.key_backbone.named_parameters())
    assert any(not torch.equal(q[n], k[n]) for n in q)
    fin = runs["finetune"]
    assert fin["params"]["finetune_from_head_layer"] == "0"  # the encoder alone (default.yaml; MoCo has no SimCLR head)
    assert 0 <= fin["metrics"]["teacher_10pct/selected_val_top1"] <= 1
    assert "teacher_10pct/train/supcon" in fin["metrics"]
