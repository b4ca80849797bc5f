"""The pretrain stage against a plain PyTorch loop: images/s and wall time, side by side.

Fashion-MNIST at 28 px (``fashion_mnist.yaml``'s recipe: SimCLR, small CNN width 32,
3-layer head, its views), global batch 64, the same number of training images and epochs:

- ``plain``: one process, ``torch.set_num_threads(2)``, the IDX images in memory as a
  map-style dataset (``Image.fromarray(...).convert("RGB")`` + the same
  ``SimCLRTransform``), ``DataLoader(batch_size=64, shuffle=True, drop_last=True,
  num_workers=1)``, the same method class and optimizer (SGD, momentum 0.9, the same
  peak lr and weight decay), forward / backward / step; nothing else. Its wall time runs
  from building the model to the last step.
- ``stage`` variants: ``clpipe run fashion_mnist --until pretrain`` on the same images
  (``data.max_samples``; val and test are cut from it as the stage does), sweep off; the
  shard stage is cached after the first variant. Its images/s are the stage's
  ``train/images_per_sec`` per epoch (the workers' own count); its wall time is the
  pretrain run's MLflow duration (Ray Train start-up, the kNN monitor and checkpoints
  included).

Variants: ``default`` (fashion_mnist.yaml as shipped: 2 workers x 1 thread, 1 loader
process each, global BN, the monitor on, the colour augmentation batched in the training
workers, ``views.augment_on: device``, the loader processes only crop and flip),
``augment_on_loader`` (the loader processes make both views whole, as the plain loop's
does; fashion_mnist.yaml's setting before), ``one_worker`` (1 worker x 2 threads, batch
64), ``no_global_bn``, ``no_monitor``, ``augment_on_device`` (the default's setting, named
for when the default changes), ``bf16`` (``precision: bf16``: bf16 autocast on the CPU) and
``compile`` (``torch.compile``'d networks, compilation included). Each stage record names
its ``augment_on``; the plain loop always augments in its DataLoader process and trains in
fp32, eager.
images/s: the median over the epochs after the first (the first carries start-up), for
every side alike; the ratios are stage / plain. Each stage side also records how its
workers made their small collectives (``clpipe.train.small_collectives``). The plain
loop's images/s moves by up to ~10% from one run to the next on this shared VM, so
``--repeats R`` runs R rounds (every variant, then the plain loop), takes each ratio
within its round and reports the medians, each round kept under ``rounds``.

Run (on 2 cores: about 12 minutes with the defaults; the whole training set about 14
minutes, and 27 with three rounds)::

    .venv/bin/python bench/e2e.py
    .venv/bin/python bench/e2e.py --samples 60000 --epochs 2 --variants default augment_on_loader \
        --out bench/results/e2e_full.json
    .venv/bin/python bench/e2e.py --samples 60000 --epochs 2 --variants default --repeats 3 \
        --out bench/results/e2e_full_rounds.json
    .venv/bin/python bench/e2e.py --samples 4000 --epochs 2 --variants default --out /tmp/e2e.json

Results go to bench/results/e2e.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
FASHION = "/usr/share/datasets/fashion-mnist"
VARIANTS = {
    "default": [],
    "one_worker": ["pretrain.num_workers=1", "pretrain.cpus_per_worker=2", "pretrain.batch_size_per_worker=64"],
    "no_global_bn": ["pretrain.sync_bn=false"],
    "no_monitor": ["pretrain.monitor.enabled=false"],
    "augment_on_device": ["pretrain.views.augment_on=device"],
    "augment_on_loader": ["pretrain.views.augment_on=loader"],
    "bf16": ["pretrain.precision=bf16"],
    "compile": ["pretrain.compile=true"],
}


class _Views(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i]).convert("RGB"))


def plain(images: np.ndarray, cfg, epochs: int, batch: int, threads: int = 2) -> dict:
    """The plain loop; per-epoch seconds and images/s, and the wall time."""
    from cl_core.methods import build_method
    from cl_core.optim import build_optimizer, scale_lr
    from pipelines.stages._pretraining import view_transform

    p = cfg.pretrain
    # the plain loop makes both views whole in its DataLoader process (torchvision's way),
    # whatever the stage's views.augment_on
    views = p.views.model_copy(update={"augment_on": "loader", "decode_on": "loader"})
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    method = build_method(
        {"method": p.method, "kwargs": p.model_kwargs(num_samples=len(images))}, gather_distributed=False
    )
    opt = build_optimizer(
        p.optimizer,
        method.param_groups(p.weight_decay),
        scale_lr(p.lr_base, batch, p.lr_scaling),
        weight_decay=p.weight_decay,
        momentum=p.momentum,
    )
    loader = torch.utils.data.DataLoader(
        _Views(images, view_transform(p.method, views)), batch_size=batch, shuffle=True, drop_last=True, num_workers=1
    )
    method.train()
    epochs_out = []
    for _ in range(epochs):
        e0, n = time.perf_counter(), 0
        for views in loader:
            out = method(views)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            n += len(views[0])
        sec = time.perf_counter() - e0
        epochs_out.append({"seconds": sec, "images_per_sec": n / sec, "images": n})
    return {
        "wall_seconds": time.perf_counter() - t0,
        "epochs": epochs_out,
        "images_per_sec": statistics.median(e["images_per_sec"] for e in epochs_out[1:] or epochs_out),
    }


def stage(work: str, samples: int, epochs: int, extra: list[str], rerun: bool = False) -> dict:
    import mlflow

    from pipelines.cli import run
    from pipelines.config import load_config

    cfg = load_config(
        "fashion_mnist",
        [
            f"work_dir={work}",
            f"data.max_samples={samples}",
            "sweep.enabled=false",
            f"pretrain.epochs={epochs}",
            "pretrain.batch_size_per_worker=32",
            *extra,
        ],
    )
    with contextlib.redirect_stdout(io.StringIO()):
        result = run(cfg, until="pretrain", rerun="pretrain" if rerun else None)
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri())
    rid = result.stages["pretrain"].run_id
    info = client.get_run(rid).info
    hist = {
        k: [m.value for m in sorted(client.get_metric_history(rid, k), key=lambda m: m.step)]
        for k in ("train/images_per_sec", "train/epoch_seconds")
    }
    ips = hist["train/images_per_sec"]
    return {
        "overrides": extra,
        "wall_seconds": (info.end_time - info.start_time) / 1000,
        "epochs": [{"seconds": s, "images_per_sec": r} for s, r in zip(hist["train/epoch_seconds"], ips, strict=True)],
        "images_per_sec": statistics.median(ips[1:] or ips),
        "train_images": int(result.stages["shard"].outputs["counts"]["train"]),
        "small_collectives": client.get_run(rid).data.tags.get("clpipe.train.small_collectives"),
        "augment_on": cfg.pretrain.views.augment_on,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--samples", type=int, default=12_000, help="data.max_samples (train is 90%% of it)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of (every variant, then the plain loop); "
        "each ratio is taken within its round, and the medians over the rounds are reported",
    )
    ap.add_argument("--work-dir", help="default: a fresh temporary directory")
    ap.add_argument("--out", type=Path, default=RESULTS / "e2e.json")
    a = ap.parse_args()
    if not Path(FASHION).is_dir():
        sys.exit(f"{FASHION} is missing: make fashion-mnist-data (or apt-get install -y dataset-fashion-mnist)")
    from semi_supervised import machine

    from cl_core.data.sources import IdxSource
    from pipelines.config import load_config

    work = a.work_dir or tempfile.mkdtemp(prefix="clpipe-e2e-")
    res: dict = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "samples": a.samples,
        "epochs": a.epochs,
        "global_batch": 64,
        "repeats": a.repeats,
        "target": {"images_per_sec_vs_plain": 1.0, "wall_vs_plain": 1.1},
        "stage": {},
    }
    import ray

    rounds: list[dict] = []
    images = None  # the plain loop's images: the stage's training count, drawn once
    cfg = load_config("fashion_mnist", [f"work_dir={work}"])
    for r in range(a.repeats):  # each round: every variant, then the plain loop right after them
        rnd: dict = {"stage": {}}
        for name in a.variants:
            rnd["stage"][name] = stage(work, a.samples, a.epochs, VARIANTS[name], rerun=r > 0)
            print(r, name, json.dumps({k: v for k, v in rnd["stage"][name].items() if k != "epochs"}), flush=True)
        ray.shutdown()  # the plain loop runs without Ray's daemons (they take a few % of the cores even idle)
        if images is None:
            n = rnd["stage"][a.variants[0]]["train_images"]
            src = IdxSource(FASHION)
            images = src.images[: src.n_train][np.random.default_rng(0).permutation(src.n_train)[:n]]
        rnd["plain"] = plain(images, cfg, a.epochs, 64)
        rnd["plain"]["train_images"] = len(images)
        print(r, "plain", json.dumps({k: v for k, v in rnd["plain"].items() if k != "epochs"}), flush=True)
        for st in rnd["stage"].values():  # each ratio against the plain loop of the same round
            st["images_per_sec_vs_plain"] = round(st["images_per_sec"] / rnd["plain"]["images_per_sec"], 4)
            st["wall_vs_plain"] = round(st["wall_seconds"] / rnd["plain"]["wall_seconds"], 4)
        rounds.append(rnd)
    if a.repeats == 1:
        res["stage"], res["plain"] = rounds[0]["stage"], rounds[0]["plain"]
    else:  # the median of each figure over the rounds; every round kept
        med = statistics.median
        res["rounds"] = rounds
        res["plain"] = {
            "train_images": rounds[0]["plain"]["train_images"],
            **{k: med(rd["plain"][k] for rd in rounds) for k in ("images_per_sec", "wall_seconds")},
        }
        res["stage"] = {
            name: {
                **{
                    k: med(rd["stage"][name][k] for rd in rounds)
                    for k in ("images_per_sec", "wall_seconds", "images_per_sec_vs_plain", "wall_vs_plain")
                },
                "small_collectives": rounds[-1]["stage"][name]["small_collectives"],
                "augment_on": rounds[-1]["stage"][name]["augment_on"],
                "images_per_sec_vs_plain_each": [rd["stage"][name]["images_per_sec_vs_plain"] for rd in rounds],
            }
            for name in a.variants
        }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
