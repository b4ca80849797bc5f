"""Memory against the data set's size: every stage's peak RSS (the driver's, and the
largest of its Ray workers') for the same chain on N and 10 x N images.

A chain is run in a fresh process per (source, size) (so Ray and the driver start
alike), with a sampler thread that reads ``VmRSS`` of the driver and of each of its
descendant processes (Ray's daemons, its workers, their DataLoader processes) every
``--interval`` seconds. Each sample is attributed to the stage whose MLflow run was open
at that moment, which gives per stage: the driver's peak, the largest Ray worker's peak
(``ray::...`` processes and their children) and Ray's own daemons' (reported, not
checked: the object store's shared pages count there).

Sources (generated, 32 px RGB, 10 classes: ``bench/loader.py``'s noise with a coloured
disc or square):

- ``npz``: one uncompressed ``.npz``;
- ``folder``: an image folder of PNG files in class subfolders;
- ``s3``: the same folder uploaded to a SeaweedFS S3 server on 127.0.0.1, one object per
  image (``--s3-sizes``; the server is stopped by PID at the end).

The chain is the default config at the sizes' scale: a width-8 small CNN on 16 px views,
1 epoch of pretraining (and of each of 2 sweep trials), 1% labels, 1 fine-tune epoch
(40 steps at least), 1 distillation epoch; every stage runs, the kNN monitor and
evaluate with their defaults. Target: each stage's peaks grow by less than 10% from the
small size to the large one.

Run (about 25 minutes on 2 cores with the defaults)::

    .venv/bin/python bench/scale.py                       # npz and folder at 10,000 and 100,000; s3 at 2,000 and 20,000
    .venv/bin/python bench/scale.py --sources npz --sizes 1000 10000 --out /tmp/scale.json

Results go to bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from infra import procs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ["shard", "sweep", "pretrain", "labels", "finetune", "distill", "evaluate", "register"]
CHAIN = [
    "pretrain.backbone_width=8",
    "pretrain.epochs=1",
    "pretrain.batch_size_per_worker=64",
    "pretrain.warmup_epochs=0",
    "pretrain.views.image_size=16",
    "sweep.enabled=true",
    "sweep.epochs=1",
    "sweep.space={temperature: {grid: [0.2, 0.5]}}",
    "labels.fractions=[0.01]",
    "finetune.epochs=1",
    "finetune.min_steps=40",
    "finetune.batch_size_per_worker=64",
    "distill.epochs=1",
    "distill.batch_size_per_worker=64",
    "distill.warmup_epochs=0",
    "data.samples_per_shard=1000",
    "data.val_fraction=0.1",
    "data.test_fraction=0.1",
]
GROWTH_LIMIT = 0.10


# ---- data -------------------------------------------------------------------------------------------------


def images(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``bench/loader.py``'s generator, made in blocks (it holds N x size^2 booleans at once)."""
    from loader import synthetic_npz

    xs, ys = [], []
    with tempfile.TemporaryDirectory() as d:
        for i, a in enumerate(range(0, n, 10_000)):
            synthetic_npz(Path(d) / "b.npz", min(10_000, n - a), size, seed=seed * 1000 + i)
            with np.load(Path(d) / "b.npz") as z:
                xs.append(z["images"])
                ys.append(z["labels"])
    return np.concatenate(xs), np.concatenate(ys)


def make_npz(path: Path, n: int) -> Path:
    x, y = images(n)
    np.savez(path, images=x, labels=y)
    return path


def make_folder(root: Path, n: int) -> Path:
    from PIL import Image

    x, y = images(n)
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(x[i]).save(root / f"class{y[i]}" / f"{i:07d}.png", compress_level=1)
    return root


def upload_folder(root: Path, bucket: str, prefix: str, threads: int = 16) -> str:
    from concurrent.futures import ThreadPoolExecutor

    from cl_core.data import storage

    files = [p for p in root.rglob("*.png")]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda p: storage.upload_file(p, f"s3://{bucket}/{prefix}/{p.relative_to(root)}"), files))
    return f"s3://{bucket}/{prefix}"


# ---- memory sampling ---------------------------------------------------------------------------------------


def _rss_mb(pid: int) -> tuple[float, float] | None:
    """(resident MB, of which anonymous or shared-memory MB). The rest of the resident
    set is file pages (the shared libraries: libtorch alone is hundreds of MB), and how
    many of those a process has mapped depends on what else is in the page cache (the
    kernel maps the cached pages around each fault): a split held in memory is
    anonymous (or, through Ray's object store, shared memory)."""
    got = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "RssAnon", "RssShmem"):
                    got[key] = int(line.split()[1]) / 1024
    except OSError:
        return None
    if "VmRSS" not in got:
        return None
    return got["VmRSS"], got.get("RssAnon", 0.0) + got.get("RssShmem", 0.0)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Sampler(threading.Thread):
    """Every ``interval`` s: (time, {role: largest resident MB, role_anon: largest
    anonymous + shared-memory MB}) for the driver, the Ray workers and Ray's daemons."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval, self.samples, self.stop = interval, [], threading.Event()
        self.roles: dict[int, str] = {}

    def role(self, pid: int, parent_role: str) -> str:
        """``worker``: a Ray worker process (``ray::NAME`` once it has a task or actor,
        ``default_worker.py`` before) or a child of one; ``ray``: Ray's daemons (GCS,
        raylet, dashboard and its agents). Only ``worker`` is remembered: a worker's
        title is set after it starts."""
        if self.roles.get(pid) == "worker":
            return "worker"
        cmd = _cmdline(pid)
        daemon = any(a in cmd for a in ("DashboardAgent", "RuntimeEnvAgent", "dashboard", "log_monitor", "monitor.py"))
        worker = parent_role == "worker" or (not daemon and (cmd.startswith("ray::") or "default_worker.py" in cmd))
        self.roles[pid] = "worker" if worker else "ray"
        return self.roles[pid]

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.is_set():
            kids = procs.children_by_parent()
            peak = dict.fromkeys(("driver", "worker", "ray", "driver_anon", "worker_anon", "ray_anon"), 0.0)
            peak["driver"], peak["driver_anon"] = _rss_mb(me) or (0.0, 0.0)
            stack = [(k, "ray") for k in kids.get(me, [])]
            while stack:
                pid, parent_role = stack.pop()
                r = self.role(pid, parent_role)
                mb = _rss_mb(pid)
                if mb is not None:
                    peak[r], peak[f"{r}_anon"] = max(peak[r], mb[0]), max(peak[f"{r}_anon"], mb[1])
                stack += [(k, r) for k in kids.get(pid, [])]
            self.samples.append((time.time(), peak))
            self.stop.wait(self.interval)


def one(
    source: str, path: str, n: int, work: str, interval: float, overrides: list[str], until: str | None = None
) -> dict:
    """The chain on one data set, in this process: per stage, the peaks and seconds."""
    import mlflow

    from pipelines.cli import run
    from pipelines.config import load_config

    kind = "npz" if source == "npz" else "image_folder"
    cfg = load_config(
        "default", [f"work_dir={work}", f"data.source.kind={kind}", f"data.source.path={path}", *CHAIN, *overrides]
    )
    sampler = Sampler(interval)
    sampler.start()
    t0 = time.time()
    result = run(cfg, until=until)
    sampler.stop.set()
    sampler.join()
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri())
    stages = {}
    for name, st in result.stages.items():
        info = client.get_run(st.run_id).info
        lo, hi = info.start_time / 1000, (info.end_time or time.time() * 1000) / 1000
        window = [p for t, p in sampler.samples if lo <= t <= hi]
        stages[name] = {
            "seconds": round(hi - lo, 1),
            "samples": len(window),
            "cached": st.cached,
            **{
                f"{r}{a}_peak_mb": round(max((p[r + a] for p in window), default=0.0), 1)
                for r in ("driver", "worker", "ray")
                for a in ("", "_anon")
            },
        }
    return {"source": source, "images": n, "seconds": round(time.time() - t0, 1), "stages": stages}


# ---- the comparison -----------------------------------------------------------------------------------------


def compare(small: dict, large: dict) -> dict:
    """Per stage: each role's peak at both sizes and the growth ratio - 1; ``ok`` when the
    driver's and the largest worker's grow by less than GROWTH_LIMIT."""
    rows = {}
    for name in small["stages"]:
        if name not in large["stages"]:
            continue
        a, b = small["stages"][name], large["stages"][name]
        row = {"seconds": [a["seconds"], b["seconds"]]}
        for r in ("driver", "worker", "ray"):
            x, y = a[f"{r}_peak_mb"], b[f"{r}_peak_mb"]
            row[r] = {"small_mb": x, "large_mb": y, "growth": round(y / x - 1, 4) if x else None}
            if f"{r}_anon_peak_mb" in a:
                row[r] |= {"small_anon_mb": a[f"{r}_anon_peak_mb"], "large_anon_mb": b[f"{r}_anon_peak_mb"]}
        row["ok"] = all(row[r]["growth"] is None or row[r]["growth"] < GROWTH_LIMIT for r in ("driver", "worker"))
        rows[name] = row
    return {
        "source": small["source"],
        "sizes": [small["images"], large["images"]],
        "stages": rows,
        "ok": all(r["ok"] for r in rows.values()),
    }


def measure(
    source: str,
    sizes: list[int],
    tmp: Path,
    interval: float,
    env: dict | None = None,
    log=print,
    overrides: list[str] = (),
    until: str | None = None,
) -> dict:
    """Both sizes of one source, each in its own process; the comparison."""
    runs = []
    for n in sizes:
        data = tmp / f"{source}-{n}"
        if source == "npz":
            path = str(make_npz(data.with_suffix(".npz"), n))
        else:
            path = str(make_folder(data, n))
            if source == "s3":
                path = upload_folder(data, BUCKET, f"{source}-{n}")
        out = tmp / f"run-{source}-{n}.json"
        cmd = [
            sys.executable,
            __file__,
            "_one",
            "--source",
            source,
            "--path",
            path,
            "--images",
            str(n),
            "--work",
            str(tmp / f"work-{source}-{n}"),
            "--interval",
            str(interval),
            "--out",
            str(out),
            *[f"--set={o}" for o in overrides],
            *(["--until", until] if until else []),
        ]
        log(f"scale: {source} x {n}: chain running")
        proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{source} x {n} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        runs.append(json.loads(out.read_text()))
        log(f"scale: {source} x {n}: {runs[-1]['seconds']} s")
    return {"runs": runs, **compare(runs[0], runs[1])}


BUCKET = "clpipe-scale"


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    o = sub.add_parser("_one", help="(internal) one chain in this process")
    o.add_argument("--source", required=True)
    o.add_argument("--path", required=True)
    o.add_argument("--images", type=int, required=True)
    o.add_argument("--work", required=True)
    o.add_argument("--interval", type=float, default=0.1)
    o.add_argument("--out", required=True)
    o.add_argument("--set", action="append", default=[], help="a config override after the chain's")
    o.add_argument("--until", help="the last stage to run")
    ap.add_argument("--sources", nargs="+", default=["npz", "folder", "s3"], choices=["npz", "folder", "s3"])
    ap.add_argument("--sizes", type=int, nargs=2, default=[10_000, 100_000])
    ap.add_argument("--s3-sizes", type=int, nargs=2, default=[2_000, 20_000])
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between memory samples")
    ap.add_argument("--set", action="append", default=[], help="a config override after the chain's")
    ap.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    a = ap.parse_args()
    if a.cmd == "_one":
        Path(a.out).write_text(json.dumps(one(a.source, a.path, a.images, a.work, a.interval, a.set, a.until)))
        return
    from semi_supervised import machine  # one description of the machine for every bench

    results = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "chain": [*CHAIN, *a.set],
        "growth_limit": GROWTH_LIMIT,
        "sources": {},
    }
    if a.out.exists():  # the other sources' records stay (measured with the same chain)
        old = json.loads(a.out.read_text())
        if old.get("chain") == results["chain"]:
            results["sources"] = {k: v for k, v in old["sources"].items() if k not in a.sources}
    with tempfile.TemporaryDirectory(prefix="clpipe-scale-") as d:
        tmp = Path(d)
        for source in a.sources:
            env = None
            server = None
            if source == "s3":
                from infra import seaweed

                server = seaweed.start(
                    tmp / "weed",
                    seaweed.free_s3_port(),
                    access_key=secrets.token_hex(10),
                    secret_key=secrets.token_hex(20),
                )
                env = server.env()
                os.environ.update(env)
                from infra import s3

                s3.client().create_bucket(Bucket=BUCKET)
            try:
                sizes = a.s3_sizes if source == "s3" else a.sizes
                results["sources"][source] = measure(source, sizes, tmp, a.interval, env, overrides=a.set)
            finally:
                if server is not None:
                    server.stop()
            print(
                json.dumps({k: v for k, v in results["sources"][source].items() if k != "runs"}, indent=1), flush=True
            )
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
