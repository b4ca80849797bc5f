"""The pipeline on two hosts against one: wall time, and S3 bytes per stage.

Side by side in one run on this machine:

1. **one host**: ``clpipe run`` of the config (local Ray with 2 CPUs, shards,
   checkpoints and the sqlite MLflow store in a local work dir), as a user runs it;
2. **two hosts** (``infra/hosts.py``: network and mount namespaces joined by a veth
   pair): host A runs the stack (SeaweedFS with its Prometheus metrics, the MLflow
   server, a Ray head with token auth and no CPUs), host B a Ray worker node with 2 CPUs;
   ``clpipe submit`` from host A runs the same config with shards, Ray storage and MLflow
   artifacts in S3 and tracking on the server, followed to its end.

For the two-host run, SeaweedFS's per-bucket byte counters
(``SeaweedFS_s3_bucket_traffic_received_bytes_total``: written to S3;
``..._sent_bytes_total``: read from S3) are sampled every 0.25 s on host A, and each stage
gets the bytes moved between its MLflow run's start and end (MLflow's artifact uploads,
which the server proxies into the bucket, included; what moves between stages, e.g. the
driver's checks, is in the total only).
Both runs use the same CPUs (2), so the ratio is the cost of the cluster path itself:
job upload, a second node, S3 and the tracking server instead of local files.

    .venv/bin/python bench/twohost.py            # the default config (~12 min)
    .venv/bin/python bench/twohost.py --quick    # 1 epoch per stage, 2 sweep trials (~5 min)

Needs root (namespaces). Writes ``bench/results/twohost.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infra import hosts, stack  # noqa: E402

QUICK = [
    "--set",
    "sweep.space={temperature: {grid: [0.2, 0.5]}}",
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
]
STACK_DIR = "/tmp/stack"
METRICS_PORT = 9327
BUCKET = "clpipe"
DONE_LINE = re.compile(r"^(\w+): done in ([0-9.]+) s")
COUNTERS = {
    "written": "SeaweedFS_s3_bucket_traffic_received_bytes_total",
    "read": "SeaweedFS_s3_bucket_traffic_sent_bytes_total",
}
# on host A for the whole job: SeaweedFS's counters every 0.25 s, one line each: wall-clock ms, read, written
SAMPLER = f"""
import sys, time, urllib.request
names = {{"{COUNTERS["read"]}": 0, "{COUNTERS["written"]}": 1}}
while True:
    t = time.time()
    got = [0, 0]
    url = "http://" + sys.argv[1] + ":{METRICS_PORT}/metrics"
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        for name, i in names.items():
            if line.startswith(name + '{{bucket="{BUCKET}"}}'):
                got[i] = int(float(line.split()[-1]))
    print(int(t * 1000), got[0], got[1], flush=True)
    time.sleep(0.25)
"""
# on host A after the job: each stage run's start and end (MLflow's wall-clock ms)
WINDOWS = """
import json
from mlflow.tracking import MlflowClient
c = MlflowClient()
exp = c.get_experiment_by_name("clpipe")
pipelines = "tags.`clpipe.kind` = 'pipeline'"
parent = c.search_runs([exp.experiment_id], pipelines, order_by=["attributes.start_time DESC"])[0]
kids = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
print(json.dumps({r.data.tags["clpipe.stage"]: [r.info.start_time, r.info.end_time] for r in kids}))
"""


def machine() -> dict:
    import platform

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def one_host(args: list[str], work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_", "CLPIPE_"))}
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "pipelines", "run", "--work-dir", str(work), "--set", "ray.num_cpus=2", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"one-host run failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return {"wall_s": round(wall, 1), "stage_s": _done(r.stdout)}


def _done(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for line in text.splitlines() if (m := DONE_LINE.match(line.strip()))}


def _at(samples: list[tuple[int, int, int]], t: float, after: bool) -> tuple[int, int]:
    """(read, written) of the last sample at or before ``t`` (``after``: the first at or after)."""
    if after:
        got = next((x for x in samples if x[0] >= t), samples[-1])
    else:
        got = next((x for x in reversed(samples) if x[0] <= t), samples[0])
    return got[1], got[2]


def two_hosts(args: list[str], logs: Path) -> dict:
    root = Path(f"/var/tmp/clpipe-bench-{secrets.token_hex(3)}")
    private = root / "private"
    private.mkdir(parents=True)
    try:
        with hosts.two_hosts(private=[private]) as (a, b):
            setup = (
                f"from pathlib import Path; from infra import stack; stack.up(stack.StackConfig(dir=Path("
                f"'{STACK_DIR}'), host='{a.ip}', num_cpus=0, ray_auth='token', bucket='{BUCKET}', "
                f"s3_metrics_port={METRICS_PORT}))"
            )
            t0 = time.perf_counter()
            r = a.run([sys.executable, "-c", setup], timeout=300, cwd=ROOT)
            if r.returncode != 0:
                raise SystemExit(f"stack up on host A failed:\n{r.stdout}\n{r.stderr}")
            stack_s = time.perf_counter() - t0
            env = stack.read_env_file(a.file(STACK_DIR) / stack.ENV_FILE)
            b_log = logs / "ray-b.log"
            b.join_ray(a.ip, env, b_log)
            deadline = time.monotonic() + 120
            while "Ray runtime started" not in b_log.read_text(errors="replace"):
                if time.monotonic() > deadline:
                    raise SystemExit(f"host B's Ray node did not start:\n{b_log.read_text()[-3000:]}")
                time.sleep(0.5)
            work = private / "work"
            cmd = [
                sys.executable,
                "-m",
                "pipelines",
                "submit",
                "--work-dir",
                str(work),
                "--set",
                f"data.output=s3://{BUCKET}/run/data",
                "--set",
                f"ray.storage_path=s3://{BUCKET}/run/ray",
                *args,
            ]
            sampler = a.popen([sys.executable, "-u", "-c", SAMPLER, a.ip])
            lines: list[str] = []
            reader = threading.Thread(target=lambda: lines.extend(sampler.stdout or []), daemon=True)
            reader.start()
            t0 = time.perf_counter()
            p = a.popen(cmd, env={"CLPIPE_STACK_ENV": f"{STACK_DIR}/{stack.ENV_FILE}"}, cwd=ROOT)
            assert p.stdout is not None
            text = p.stdout.read()
            rc = p.wait()
            wall = time.perf_counter() - t0
            time.sleep(1.0)  # a last sample after the job's end
            sampler.kill()
            reader.join(10)
            samples = [tuple(int(v) for v in line.split()) for line in lines if len(line.split()) == 3]
            (logs / "job.log").write_text(text)
            if rc != 0:
                raise SystemExit(f"the two-host job failed:\n{text[-4000:]}")
            r = a.run([sys.executable, "-c", WINDOWS], env=env, timeout=120)
            windows = json.loads(r.stdout.strip().splitlines()[-1])
            per_stage = {}
            for name, (start, end) in sorted(windows.items(), key=lambda kv: kv[1][0]):
                r0, w0 = _at(samples, start, after=False)
                r1, w1 = _at(samples, end, after=True)
                per_stage[name] = {
                    "seconds": round((end - start) / 1000, 1),
                    "s3_read_bytes": r1 - r0,
                    "s3_written_bytes": w1 - w0,
                }
            total_read, total_written = samples[-1][1] - samples[0][1], samples[-1][2] - samples[0][2]
            return {
                "wall_s": round(wall, 1),
                "stack_up_s": round(stack_s, 1),
                "stage_s": _done(text),
                "per_stage": per_stage,
                "samples": len(samples),
                "s3_total": {"read_bytes": total_read, "written_bytes": total_written},
            }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 epoch per stage, 2 sweep trials")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "twohost.json"))
    a = ap.parse_args(argv)
    why = hosts.unavailable()
    if why:
        raise SystemExit(f"bench/twohost.py: {why}")
    args = QUICK if a.quick else []
    with tempfile.TemporaryDirectory(prefix="clpipe-bench-") as tmp:
        print("one host: clpipe run ...", flush=True)
        one = one_host(args, Path(tmp) / "work")
        print(f"  {one['wall_s']} s", flush=True)
        print("two hosts: stack on A, Ray node on B, clpipe submit from A ...", flush=True)
        two = two_hosts(args, Path(tmp))
        print(f"  {two['wall_s']} s", flush=True)
    out = {
        "bench": "twohost",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "settings": {"config": "embedded default", "overrides": args, "cpus": 2},
        "one_host": one,
        "two_hosts": two,
        "ratio_two_over_one": round(two["wall_s"] / one["wall_s"], 2),
    }
    Path(a.out).write_text(json.dumps(out, indent=2))
    print("\n| stage | one host s | two hosts s | S3 read MB | S3 written MB |\n|---|---|---|---|---|")
    for name, row in two["per_stage"].items():
        print(
            f"| {name} | {one['stage_s'].get(name, '-')} | {two['stage_s'].get(name, '-')} | "
            f"{row['s3_read_bytes'] / 1e6:.2f} | {row['s3_written_bytes'] / 1e6:.2f} |"
        )
    print(
        f"| **wall** | {one['wall_s']} | {two['wall_s']} | {two['s3_total']['read_bytes'] / 1e6:.2f} | "
        f"{two['s3_total']['written_bytes'] / 1e6:.2f} |"
    )
    print(f"two hosts / one host: {out['ratio_two_over_one']}x; wrote {a.out}")
    return out


if __name__ == "__main__":
    main()
