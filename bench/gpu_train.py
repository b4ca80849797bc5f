"""The 224 px path on one GPU: SimCLR training from JPEG shards, views made in the loader
against views made on the device.

Synthetic JPEG images (``--source-size`` px, quality 90; ``bench/loader.py``'s noise with
a coloured disc or square) are written as tar shards by the shard stage's writer. Then the
project's training loop (``ShardStream`` -> ``TrainingLoop``: DDP-free, one process, bf16
autocast and channels_last on CUDA) trains SimCLR for one epoch three ways, the same
model, batch and seeds:

- ``loader``: ``views.augment_on: loader``: decode, crop, flip and colour in the
  DataLoader workers (the CPU path);
- ``colour_on_device``: ``augment_on: device``, ``decode_on: loader``: the workers
  decode, crop and flip; the colour runs batched on the device;
- ``decode_on_device``: ``augment_on: device``, ``decode_on: device``: the workers read
  JPEG headers and draw the crop boxes; decoding (nvJPEG), crops, flips and colour run
  on the device.

Recorded per way: images/s of the epoch's steps after the first ``--warmup`` (model and
loader start-up excluded), the epoch's images/s, and the device's memory peak. With
``--smoke`` everything runs tiny on the CPU (a check that the script works where no GPU
is: ``tests/test_gpu_script.py``).

    python bench/gpu_train.py --out $OUT/gpu_train.json        # on a GPU machine (bench/gpu.sh)
    python bench/gpu_train.py --smoke --out /tmp/gpu_train.json

Needs torch, torchvision, numpy, Pillow and webdataset only (no Ray, MLflow or pydantic).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

WAYS = ("loader", "colour_on_device", "decode_on_device")


def make_shards(directory: Path, n: int, size: int, per_shard: int) -> tuple[list[str], list[int]]:
    from loader import JpegSource, synthetic_npz

    from cl_core.data import shards as S
    from cl_core.data.sources import npz_source

    urls: list[str] = []
    counts: list[int] = []
    for a in range(0, n, per_shard):  # in blocks: the generator holds its block's pixels only
        synthetic_npz(directory / "block.npz", min(per_shard, n - a), size, seed=a)
        src = JpegSource(npz_source(directory / "block.npz"))
        r = S.write_shard(src, src.refs(), directory / f"train-{len(urls):06d}.tar")
        urls.append(str(directory / r["name"]))
        counts.append(r["num_samples"])
    (directory / "block.npz").unlink()
    return urls, counts


def train_one(way: str, urls: list[str], counts: list[int], a: argparse.Namespace, device: torch.device) -> dict:
    from cl_core.augment import SimCLRTransform
    from cl_core.augment_device import DeviceViews
    from cl_core.data.device_decode import CropPlan, collate_encoded, decode_encoded
    from cl_core.data.reader import ShardStream
    from cl_core.engine import LoopConfig, TrainingLoop
    from cl_core.methods.simclr import SimCLR

    colour = {"jitter_strength": 1.0, "jitter_prob": 0.8, "grayscale_prob": 0.2, "blur_prob": a.blur}
    if way == "loader":
        views: dict = {"transform": SimCLRTransform(a.image_size, **colour)}
    elif way == "colour_on_device":
        views = {"transform": SimCLRTransform(a.image_size, color=False, **colour)}
    else:
        views = {
            "transform": CropPlan([a.image_size] * 2, [(0.08, 1.0)] * 2, 0.5),
            "decode": decode_encoded,
            "collate": collate_encoded,
        }
    stream = ShardStream(
        urls,
        counts,
        batch_size=a.batch_size,
        rank=0,
        world_size=1,
        loader_workers=a.loader_workers,
        shuffle_buffer=1000,
        seed=0,
        **views,
    )
    torch.manual_seed(0)
    method = SimCLR(a.backbone, backbone_args={"width": 16} if a.backbone == "small_cnn" else {}, temperature=0.2).to(
        device
    )
    cfg = LoopConfig(
        epochs=1,
        batch_size_per_worker=a.batch_size,
        optimizer="lars",
        lr_base=0.3,
        warmup_epochs=0,
        loader_workers=a.loader_workers,
        log_every_steps=1,
    )
    method = cfg.settings_for(device).prepare(method)
    loop = TrainingLoop(
        method, method, stream, cfg, device, view_augment=None if way == "loader" else DeviceViews(**colour)
    )
    steps: list[float] = []

    def report(metrics: dict, state) -> None:
        return None

    # step times from the loop's per-step log hook (log_every_steps=1, after the step's loss is read back)
    def on_log(step: int, metrics: dict) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        steps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    history = loop.run(report, log=on_log)
    seconds = time.perf_counter() - t0
    w = min(a.warmup, max(0, len(steps) - 2))
    steady = (len(steps) - 1 - w) * a.batch_size / (steps[-1] - steps[w]) if len(steps) - 1 > w else None
    return {
        "way": way,
        "steps": loop.step,
        "epoch_seconds": seconds,
        "images_per_sec_epoch": loop.step * a.batch_size / seconds,
        "images_per_sec_steady": steady,
        "loss": history[-1]["train/loss"],
        "device_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--source-size", type=int, default=256, help="side of the stored JPEGs")
    ap.add_argument("--image-size", type=int, default=224, help="side of the views")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--blur", type=float, default=0.5, help="blur probability (SimCLR's ImageNet value)")
    ap.add_argument("--loader-workers", type=int, default=min(12, (os.cpu_count() or 2) - 2))
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the steady rate")
    ap.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    ap.add_argument("--smoke", action="store_true", help="tiny, on the CPU: checks the script")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.smoke:
        a.images, a.source_size, a.image_size, a.batch_size, a.backbone = 48, 40, 32, 8, "small_cnn"
        a.loader_workers, a.warmup, a.blur = 1, 1, 0.5
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    if not a.smoke and device.type != "cuda":
        sys.exit("bench/gpu_train.py: no CUDA device (use --smoke for the CPU check)")
    import torchvision

    res: dict = {
        "machine": {
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "cpu_cores": os.cpu_count(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d"),
        "settings": {k: v for k, v in vars(a).items() if k != "out"},
        "ways": {},
    }
    with tempfile.TemporaryDirectory(prefix="clpipe-gpu-") as d:
        t0 = time.perf_counter()
        urls, counts = make_shards(Path(d), a.images, a.source_size, per_shard=512 if not a.smoke else 16)
        res["shard_seconds"] = time.perf_counter() - t0
        print(f"{sum(counts)} JPEGs in {len(urls)} shards, {res['shard_seconds']:.0f} s", flush=True)
        for way in a.ways:
            res["ways"][way] = train_one(way, urls, counts, a, device)
            print(json.dumps(res["ways"][way]), flush=True)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
