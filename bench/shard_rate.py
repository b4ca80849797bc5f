"""The shard stage's write rate on many small JPEG files, against ``tar`` of the same files.

``--images`` JPEG files (``--image-size`` px RGB, quality 90, 10 class folders; the noise
with a coloured disc or square of ``bench/loader.py``) are written once. Then, on the same
disk, with the files in the page cache for both (each side runs once before it is timed):

- ``tar``: GNU ``tar -cf`` of the folder into one archive, the plain disk-bound copy;
- ``shard (folder)``: ``clpipe run --until shard`` on the folder: listing, the split,
  the Ray tasks (one per shard, SPREAD over the nodes) that read, fully decode (a corrupt
  file is found here, not in training) and write each image into its tar shard, then the
  manifest with every shard's sha256;
- ``shard (s3)`` (``--s3``): the same files as objects in a SeaweedFS S3 server on
  127.0.0.1 (one PUT each, not timed), sharded from ``s3://`` with up to 16 GETs in flight
  per task (pyarrow's S3 client), then again with one GET at a time
  (``CLPIPE_S3_READS_IN_FLIGHT=1``: boto3, the reader before the read-ahead), side by side.

Each side's rate is images/s and MB/s of source bytes over its whole wall time (the
stage's from its MLflow run: start-up of Ray excluded, listing included), and the
tasks' own window (the stage's ``images_per_sec`` metric).

Run (about 16 minutes on 2 cores with the defaults)::

    .venv/bin/python bench/shard_rate.py                 # 100,000 64 px JPEGs, folder and S3
    .venv/bin/python bench/shard_rate.py --images 5000 --no-s3 --out /tmp/shard_rate.json

Results go to bench/results/shard_rate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
BUCKET = "clpipe-shard-rate"


def make_jpegs(root: Path, n: int, size: int) -> int:
    """``n`` JPEG files under ``root/classK/``; their total bytes."""
    from PIL import Image
    from scale import images

    total = 0
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for a in range(0, n, 10_000):
        x, y = images(min(10_000, n - a), size, seed=a)
        for i in range(len(x)):
            p = root / f"class{y[i]}" / f"{a + i:07d}.jpg"
            Image.fromarray(x[i]).save(p, format="JPEG", quality=90)
            total += p.stat().st_size
    return total


def time_tar(root: Path, out: Path) -> float:
    subprocess.run(["tar", "-cf", str(out), "-C", str(root), "."], check=True)  # warm-up: the page cache
    out.unlink()
    t0 = time.perf_counter()
    subprocess.run(["tar", "-cf", str(out), "-C", str(root), "."], check=True)
    seconds = time.perf_counter() - t0
    out.unlink()
    return seconds


def shard_stage(path: str, work: Path) -> dict:
    """The shard stage alone on ``path``, twice (the first warms the cache and Ray's workers,
    its result is dropped); the second's stage run: seconds and its rate metrics."""
    import mlflow

    from pipelines.cli import run
    from pipelines.config import load_config

    out = {}
    for attempt in range(2):
        cfg = load_config(
            "default",
            [
                f"work_dir={work}-{attempt}",
                "data.source.kind=image_folder",
                f"data.source.path={path}",
                "data.samples_per_shard=1000",
                "sweep.enabled=false",
            ],
        )
        result = run(cfg, until="shard")
        client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri())
        r = client.get_run(result.stages["shard"].run_id)
        out = {
            "stage_seconds": (r.info.end_time - r.info.start_time) / 1000,
            **r.data.metrics,
            "nodes": json.loads(r.data.tags.get("clpipe.shard.nodes", "{}")),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--no-s3", dest="s3", action="store_false")
    ap.add_argument("--upload-threads", type=int, default=16)
    ap.add_argument("--out", type=Path, default=RESULTS / "shard_rate.json")
    a = ap.parse_args()
    from semi_supervised import machine

    res: dict = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "images": a.images,
        "image_size": a.image_size,
    }
    with tempfile.TemporaryDirectory(prefix="clpipe-shard-rate-", dir=os.environ.get("CLPIPE_BENCH_TMP")) as d:
        tmp = Path(d)
        server = None
        if a.s3:  # before Ray starts: its workers take the credentials from this environment
            from infra import seaweed

            server = seaweed.start(
                tmp / "weed", seaweed.free_s3_port(), access_key=secrets.token_hex(10), secret_key=secrets.token_hex(20)
            )
            os.environ.update(server.env())
        try:
            _measure(a, tmp, res, server)
        finally:
            if server is not None:
                server.stop()
    for k in ("shard_folder", "shard_s3", "shard_s3_one_at_a_time"):
        if k in res:
            res[k]["vs_tar"] = round(res[k]["images_per_sec"] / res["tar"]["images_per_sec"], 4)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"written to {a.out}")


def _measure(a: argparse.Namespace, tmp: Path, res: dict, server) -> None:
    root = tmp / "jpegs"
    src_bytes = make_jpegs(root, a.images, a.image_size)
    res["source_mb"] = src_bytes / 1e6
    mb = src_bytes / 1e6

    def rates(seconds: float) -> dict:
        return {
            "seconds": round(seconds, 2),
            "images_per_sec": round(a.images / seconds, 1),
            "mb_per_sec": round(mb / seconds, 2),
        }

    res["tar"] = rates(time_tar(root, tmp / "all.tar"))
    print("tar", res["tar"], flush=True)
    st = shard_stage(str(root), tmp / "work-folder")
    res["shard_folder"] = {
        **rates(st["stage_seconds"]),
        "tasks_images_per_sec": st["images_per_sec"],
        "tasks_mb_per_sec_written": st["mb_per_sec"],
        "nodes": st["nodes"],
    }
    print("shard (folder)", res["shard_folder"], flush=True)
    if server is not None:
        from infra import s3

        s3.client().create_bucket(Bucket=BUCKET)
        files = sorted(root.rglob("*.jpg"))
        t0 = time.perf_counter()
        with ThreadPoolExecutor(a.upload_threads) as pool:
            list(pool.map(lambda p: s3.upload_file(p, f"s3://{BUCKET}/jpegs/{p.relative_to(root)}"), files))
        res["s3_upload"] = rates(time.perf_counter() - t0)
        print("upload", res["s3_upload"], flush=True)
        st = shard_stage(f"s3://{BUCKET}/jpegs", tmp / "work-s3")
        res["shard_s3"] = {
            **rates(st["stage_seconds"]),
            "tasks_images_per_sec": st["images_per_sec"],
            "tasks_mb_per_sec_written": st["mb_per_sec"],
            "nodes": st["nodes"],
        }
        print("shard (s3)", res["shard_s3"], flush=True)
        # side by side: the same stage reading one object at a time (boto3, as before the
        # read-ahead), in a fresh Ray whose workers see CLPIPE_S3_READS_IN_FLIGHT=1
        import ray

        ray.shutdown()
        os.environ["CLPIPE_S3_READS_IN_FLIGHT"] = "1"
        try:
            st = shard_stage(f"s3://{BUCKET}/jpegs", tmp / "work-s3-one")
        finally:
            os.environ.pop("CLPIPE_S3_READS_IN_FLIGHT")
            ray.shutdown()
        res["shard_s3_one_at_a_time"] = {
            **rates(st["stage_seconds"]),
            "tasks_images_per_sec": st["images_per_sec"],
            "tasks_mb_per_sec_written": st["mb_per_sec"],
            "nodes": st["nodes"],
        }
        res["s3_read_ahead_speedup"] = round(
            res["shard_s3"]["images_per_sec"] / res["shard_s3_one_at_a_time"]["images_per_sec"], 3
        )
        print("shard (s3, one object at a time)", res["shard_s3_one_at_a_time"], flush=True)


if __name__ == "__main__":
    main()
