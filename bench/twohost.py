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
``..._sent_bytes_total``: read from S3) are read at each stage's first log line and at
the end, so each stage gets the bytes moved between its start and the next one's
(MLflow's artifact uploads, which the server proxies into the bucket, included).
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infra import hosts, stack  # noqa: E402

QUICK = ["--set", "sweep.space={temperature: {grid: [0.2, 0.5]}}", "--set", "sweep.epochs=1",
         "--set", "pretrain.epochs=1", "--set", "labels.fractions=[0.1]", "--set", "finetune.epochs=1",
         "--set", "finetune.baseline=false", "--set", "finetune.min_steps=0", "--set", "distill.epochs=1"]
STACK_DIR = "/tmp/stack"
METRICS_PORT = 9327
BUCKET = "clpipe"
STAGE_LINE = re.compile(r"─+ stage (\w+) ─+")
DONE_LINE = re.compile(r"^(\w+): done in ([0-9.]+) s")
COUNTERS = {"written": "SeaweedFS_s3_bucket_traffic_received_bytes_total",
            "read": "SeaweedFS_s3_bucket_traffic_sent_bytes_total"}
SCRAPE = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
          f"'http://' + sys.argv[1] + ':{METRICS_PORT}/metrics', timeout=10).read().decode())")


def machine() -> dict:
    import platform

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def one_host(args: list[str], work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_", "CLPIPE_"))}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pipelines", "run", "--work-dir", str(work),
                        "--set", "ray.num_cpus=2", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"one-host run failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return {"wall_s": round(wall, 1), "stage_s": _done(r.stdout)}


def _done(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for line in text.splitlines() if (m := DONE_LINE.match(line.strip()))}


def _counters(a: hosts.Host) -> dict[str, int]:
    r = a.run([sys.executable, "-c", SCRAPE, a.ip], timeout=30)
    out = {k: 0 for k in COUNTERS}
    for line in r.stdout.splitlines():
        for what, name in COUNTERS.items():
            if line.startswith(f'{name}{{bucket="{BUCKET}"}}'):
                out[what] = int(float(line.split()[-1]))
    return out


def two_hosts(args: list[str], logs: Path) -> dict:
    root = Path(f"/var/tmp/clpipe-bench-{secrets.token_hex(3)}")
    private = root / "private"
    private.mkdir(parents=True)
    try:
        with hosts.two_hosts(private=[private]) as (a, b):
            setup = (f"from pathlib import Path; from infra import stack; stack.up(stack.StackConfig(dir=Path("
                     f"'{STACK_DIR}'), host='{a.ip}', num_cpus=0, ray_auth='token', bucket='{BUCKET}', "
                     f"s3_metrics_port={METRICS_PORT}))")
            t0 = time.perf_counter()
            r = a.run([sys.executable, "-c", setup], timeout=300, cwd=ROOT)
            if r.returncode != 0:
                raise SystemExit(f"stack up on host A failed:\n{r.stdout}\n{r.stderr}")
            stack_s = time.perf_counter() - t0
            env = stack.read_env_file(a.file(STACK_DIR) / stack.ENV_FILE)
            node_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": env["RAY_AUTH_TOKEN"],
                        "AWS_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
                        "AWS_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
                        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
            b_log = logs / "ray-b.log"
            b.spawn([str(Path(sys.executable).parent / "ray"), "start", f"--address={a.ip}:6379",
                     f"--node-ip-address={b.ip}", "--num-cpus=2", "--disable-usage-stats", "--block"], b_log,
                    env=node_env)
            deadline = time.monotonic() + 120
            while "Ray runtime started" not in b_log.read_text(errors="replace"):
                if time.monotonic() > deadline:
                    raise SystemExit(f"host B's Ray node did not start:\n{b_log.read_text()[-3000:]}")
                time.sleep(0.5)
            work = private / "work"
            cmd = [sys.executable, "-m", "pipelines", "submit", "--work-dir", str(work),
                   "--set", f"data.output=s3://{BUCKET}/run/data", "--set", f"ray.storage_path=s3://{BUCKET}/run/ray",
                   *args]
            marks: list[tuple[str, float, dict[str, int]]] = [("submit", time.perf_counter(), _counters(a))]
            p = a.popen(cmd, env={"CLPIPE_STACK_ENV": f"{STACK_DIR}/{stack.ENV_FILE}"}, cwd=ROOT)
            assert p.stdout is not None
            lines = []
            for line in p.stdout:
                lines.append(line)
                m = STAGE_LINE.search(line)
                if m:
                    marks.append((m.group(1), time.perf_counter(), _counters(a)))
            rc = p.wait()
            marks.append(("end", time.perf_counter(), _counters(a)))
            text = "".join(lines)
            (logs / "job.log").write_text(text)
            if rc != 0:
                raise SystemExit(f"the two-host job failed:\n{text[-4000:]}")
            per_stage = {}
            for (name, t, c), (_, t_next, c_next) in zip(marks, marks[1:], strict=False):
                per_stage["before the first stage" if name == "submit" else name] = {
                    "seconds_from_log": round(t_next - t, 1),
                    **{f"s3_{k}_bytes": c_next[k] - c[k] for k in COUNTERS}}
            return {"wall_s": round(marks[-1][1] - marks[0][1], 1), "stack_up_s": round(stack_s, 1),
                    "stage_s": _done(text), "per_stage": per_stage,
                    "s3_total": {f"{k}_bytes": marks[-1][2][k] - marks[0][2][k] for k in COUNTERS}}
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
    out = {"bench": "twohost", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
           "settings": {"config": "embedded default", "overrides": args, "cpus": 2},
           "one_host": one, "two_hosts": two, "ratio_two_over_one": round(two["wall_s"] / one["wall_s"], 2)}
    Path(a.out).write_text(json.dumps(out, indent=2))
    print("\n| stage | one host s | two hosts s | S3 read MB | S3 written MB |\n|---|---|---|---|---|")
    for name, row in two["per_stage"].items():
        print(f"| {name} | {one['stage_s'].get(name, '-')} | {two['stage_s'].get(name, '-')} | "
              f"{row['s3_read_bytes'] / 1e6:.2f} | {row['s3_written_bytes'] / 1e6:.2f} |")
    print(f"| **wall** | {one['wall_s']} | {two['wall_s']} | {two['s3_total']['read_bytes'] / 1e6:.2f} | "
          f"{two['s3_total']['written_bytes'] / 1e6:.2f} |")
    print(f"two hosts / one host: {out['ratio_two_over_one']}x; wrote {a.out}")
    return out


if __name__ == "__main__":
    main()
