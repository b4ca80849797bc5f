"""Every image method for the same budget on Fashion-MNIST (digits where it is missing):
kNN and linear-probe top-1 on the official test images, step time, peak memory.

Not part of the test suite. Each method trains in a fresh process of its own (so its
peak RSS is its own) with the project's ``TrainingLoop`` (one worker, one DataLoader
process) on WebDataset shards of a stratified subset of the training images, for the
same epochs and batch. Then, from the final encoder: kNN top-1 (k = 20, the pipeline's
monitor) with the training subset as the labeled bank, and a logistic-regression probe
fitted on the training subset's features (all its labels), both on the test split (the
official 10,000 t10k images for Fashion-MNIST). The optimizer and learning rate follow
each paper's choice (LARS, SGD or AdamW), scaled to the batch; hyperparameters that only
make sense at ImageNet scale (queues of 65,536 keys, 8,192-wide projectors, 65,536 DINO
prototypes) are sized down, and the JSON records every setting.

    .venv/bin/python bench/methods.py                          # every image method (~50 min on 2 cores)
    .venv/bin/python bench/methods.py --methods simclr moco --epochs 1
    .venv/bin/python bench/methods.py --data digits            # the embedded data set

Writes ``bench/results/methods.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cl_core.augment import EvalTransform  # noqa: E402
from cl_core.data import shards as S  # noqa: E402
from cl_core.data.reader import ShardStream, load_split  # noqa: E402
from cl_core.data.sources import IdxSource, digits_source  # noqa: E402
from cl_core.engine import LoopConfig, TrainingLoop  # noqa: E402
from cl_core.evaluate import extract_features, knn_top1, linear_probe_top1  # noqa: E402
from cl_core.methods import get_method, known_methods  # noqa: E402
from pipelines.config import ViewsConfig  # noqa: E402
from pipelines.stages._pretraining import view_transform  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
RESULTS = Path(__file__).resolve().parent / "results"

# per method: the paper's optimizer family and a learning rate for batch 256, and the
# hyperparameters resized for a 1,259-image split (everything else: the paper defaults)
SETTINGS: dict[str, dict] = {
    "simclr": {"optimizer": "lars", "lr_base": 1.0, "params": {"temperature": 0.5, "head_layers": 3, "proj_dim": 64}},
    "moco": {
        "optimizer": "sgd",
        "lr_base": 0.12,
        "weight_decay": 1e-4,
        "params": {"version": 2, "queue_size": 1024, "momentum": 0.99},
    },
    "mocov3": {"optimizer": "lars", "lr_base": 1.0, "params": {"hidden_dim": 512, "proj_dim": 128}},
    "byol": {
        "optimizer": "lars",
        "lr_base": 1.0,
        "params": {"proj_hidden_dim": 512, "proj_dim": 128, "tau_base": 0.99},
    },
    "simsiam": {
        "optimizer": "sgd",
        "lr_base": 0.05,
        "weight_decay": 1e-4,
        "params": {"proj_dim": 512, "pred_hidden_dim": 128},
    },
    "barlow_twins": {"optimizer": "lars", "lr_base": 0.4, "params": {"proj_hidden_dim": 512, "proj_dim": 512}},
    "vicreg": {"optimizer": "lars", "lr_base": 0.4, "params": {"proj_hidden_dim": 512, "proj_dim": 512}},
    "swav": {
        "optimizer": "lars",
        "lr_base": 1.0,
        "params": {"num_prototypes": 100, "hidden_dim": 512, "freeze_prototypes_steps": 20},
    },
    "dino": {
        "optimizer": "adamw",
        "lr_base": 0.0005,
        "weight_decay": 0.04,
        "params": {
            "out_dim": 1024,
            "hidden_dim": 512,
            "bottleneck_dim": 128,
            "momentum": 0.99,
            "freeze_last_layer_steps": 20,
        },
    },
    "supcon": {"optimizer": "lars", "lr_base": 1.0, "params": {}},
    "instdisc": {"optimizer": "sgd", "lr_base": 0.12, "weight_decay": 1e-4, "params": {"num_negatives": 1024}},
    "cmc": {"optimizer": "sgd", "lr_base": 0.12, "weight_decay": 1e-4, "params": {}},
    "cpc": {"optimizer": "adamw", "lr_base": 0.002, "weight_decay": 1e-6, "params": {"context_dim": 64}},
}


def machine() -> dict:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    return {
        "cpu_model": cpu or None,
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# per data set: the views (pipelines/configs/default.yaml for digits, fashion_mnist.yaml
# for Fashion-MNIST; multi-crop: 2 global + 2 local views, local at 3/7 of the side)
DATA = {
    "digits": ViewsConfig(
        image_size=16,
        crop_min_scale=0.3,
        hflip_prob=0.0,
        jitter_strength=0.5,
        local_views=2,
        local_image_size=8,
        local_crop_scale=(0.1, 0.3),
    ),
    "fashion": ViewsConfig(
        image_size=28,
        crop_min_scale=0.2,
        hflip_prob=0.0,
        jitter_strength=0.5,
        local_views=2,
        local_image_size=12,
        local_crop_scale=(0.05, 0.2),
    ),
}


def _stratified(refs: list, n: int, rng: np.random.Generator) -> list:
    """``n`` of ``refs`` (or all), each class keeping its share, in a random order."""
    if n >= len(refs):
        return list(refs)
    labels = np.array([r.label for r in refs])
    pick: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        pick += list(rng.choice(idx, size=round(n * len(idx) / len(refs)), replace=False))
    rng.shuffle(pick)
    return [refs[i] for i in pick]


def write_data(kind: str, out: Path, train_images: int, test_images: int, seed: int = 0) -> dict:
    """Shards of a train split and a test split: digits' seeded stratified split (70/30,
    the val share joins the test), or a stratified subset of Fashion-MNIST's 60,000
    training images and of the official 10,000 test images."""
    rng = np.random.default_rng(seed)
    if kind == "digits":
        source = digits_source()
        parts = S.split_refs(source.refs(), val_fraction=0.15, test_fraction=0.15, seed=seed, stratified=True)
        splits = {
            "train": _stratified(parts["train"], train_images, rng),
            "test": _stratified(parts["val"] + parts["test"], test_images, rng),
        }
    else:
        source = IdxSource(FASHION)
        refs = source.refs()
        official = source.official_test()
        splits = {
            "train": _stratified([r for r in refs if r.index not in official], train_images, rng),
            "test": _stratified([r for r in refs if r.index in official], test_images, rng),
        }
    results = {}
    for split, items in splits.items():
        results[split] = [
            S.write_shard(source, items[a:b], out / f"{split}-{i:06d}.tar")
            for i, (a, b) in enumerate(S.plan_shards(len(items), 1024, 4))
        ]
    manifest = S.build_manifest(
        source=source, split_sizes={k: len(v) for k, v in splits.items()}, shard_results=results, seed=seed, config={}
    )
    S.write_manifest(out, manifest)
    return manifest


def evaluate(encoder: torch.nn.Module, shard_dir: Path, manifest: dict, image_size: int) -> dict:
    tf = EvalTransform(image_size)
    (tr_x, tr_y), (te_x, te_y) = (load_split(S.shard_urls(shard_dir, manifest, s)[0], tf) for s in ("train", "test"))
    ftr, fte = extract_features(encoder, tr_x), extract_features(encoder, te_x)
    return {
        "knn_top1": knn_top1(ftr, tr_y, fte, te_y, k=20, temperature=0.07),
        "probe_top1": linear_probe_top1(ftr, tr_y, fte, te_y),
    }


def run_method(name: str, shard_dir: Path, manifest: dict, a: argparse.Namespace) -> dict:
    """Train one method and evaluate its encoder (in the calling process)."""
    torch.set_num_threads(a.threads)
    views = DATA[a.data]
    urls, counts = S.shard_urls(shard_dir, manifest, "train")
    s = SETTINGS.get(name, {"optimizer": "lars", "lr_base": 1.0, "params": {}})
    torch.manual_seed(0)
    cls = get_method(name)
    kwargs = {"backbone": "small_cnn", "backbone_args": {"width": a.width}, **s["params"]}
    if "num_samples" in inspect.signature(cls.__init__).parameters:
        kwargs["num_samples"] = sum(counts)
    method = cls(**kwargs, gather_distributed=False)
    stream = ShardStream(
        urls,
        counts,
        transform=view_transform(name, views),
        batch_size=a.batch_size,
        rank=0,
        world_size=1,
        loader_workers=a.loader_workers,
        shuffle_buffer=2000,
        seed=0,
    )
    cfg = LoopConfig(
        epochs=a.epochs,
        batch_size_per_worker=a.batch_size,
        optimizer=s["optimizer"],
        lr_base=s["lr_base"],
        weight_decay=s.get("weight_decay", 1e-6),
        warmup_epochs=1,
        loader_workers=a.loader_workers,
    )
    loop = TrainingLoop(method, method, stream, cfg, torch.device("cpu"))
    before_mib = _status_mib("VmRSS")  # this process with torch, the method and the loop built
    _reset_peak()
    t0 = time.perf_counter()
    history = loop.run(lambda m, st: None)
    wall = time.perf_counter() - t0
    # peak resident memory of training (the evaluation below loads the splits as floats)
    peak_mib = _status_mib("VmHWM")
    ips = [h["train/images_per_sec"] for h in history[1:]] or [history[0]["train/images_per_sec"]]
    result = evaluate(method.encoder().eval(), shard_dir, manifest, views.image_size)
    return {
        "method": name,
        "view_kind": cls.view_kind,
        **result,
        "images_per_sec": float(np.median(ips)),
        "ms_per_step": 1000 * a.batch_size / float(np.median(ips)),
        "peak_rss_mib": peak_mib,
        "rss_before_training_mib": before_mib,
        "training_rss_increase_mib": peak_mib - before_mib,
        "params": sum(p.numel() for p in method.parameters()),
        "final_loss": history[-1]["train/loss"],
        "seconds": wall,
        "settings": s,
    }


def _status_mib(field: str) -> float:
    """A field of /proc/self/status in MiB: VmRSS (now), VmHWM (the peak since the last
    reset; getrusage's ru_maxrss would start from the parent's size at the fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0: ``echo 5 > clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


def _child(name: str, shard_dir: str, manifest: dict, a: argparse.Namespace, q) -> None:
    try:
        q.put(("ok", run_method(name, Path(shard_dir), manifest, a)))
    except Exception as e:  # noqa: BLE001 - reported in the table, the other methods go on
        q.put(("error", f"{type(e).__name__}: {e}"))


def in_fresh_process(name: str, shard_dir: Path, manifest: dict, a: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, str(shard_dir), manifest, a, q))
    proc.start()
    status, payload = q.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{name}: {payload}")
    return payload


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="*", help="default: every image method")
    p.add_argument(
        "--data",
        choices=sorted(DATA),
        default="fashion" if FASHION.is_dir() else "digits",
        help="default: fashion where the dataset-fashion-mnist package is installed, else digits",
    )
    p.add_argument("--train-images", type=int, default=10_000)
    p.add_argument("--test-images", type=int, default=10_000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--width", type=int, default=32, help="small_cnn width")
    p.add_argument("--loader-workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "methods.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    names = a.methods or [m for m in known_methods() if get_method(m).view_kind != "text"]
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = Path(tmp)
        manifest = write_data(a.data, shard_dir, a.train_images, a.test_images)
        torch.manual_seed(0)
        random_enc = get_method("simclr")(backbone_args={"width": a.width}, gather_distributed=False).encoder()
        baseline = evaluate(random_enc.eval(), shard_dir, manifest, DATA[a.data].image_size)
        rows = []
        for name in names:
            print(f"[methods] {name} ...", flush=True)
            r = in_fresh_process(name, shard_dir, manifest, a)
            print(
                f"[methods] {name}: kNN {r['knn_top1']:.4f}, probe {r['probe_top1']:.4f}, "
                f"{r['ms_per_step']:.0f} ms/step"
                f", training +{r['training_rss_increase_mib']:.0f} MiB RSS, {r['seconds']:.0f} s",
                flush=True,
            )
            rows.append(r)
    splits = manifest["splits"]
    out = {
        "bench": "methods",
        "date": time.strftime("%Y-%m-%d"),
        "data": a.data,
        "epochs": a.epochs,
        "batch_size": a.batch_size,
        "views": DATA[a.data].model_dump(mode="json"),
        "backbone": f"small_cnn (width {a.width})",
        "train_images": int(splits["train"]["num_samples"]),
        "test_images": int(splits["test"]["num_samples"]),
        "threads": a.threads,
        "loader_workers": a.loader_workers,
        "random_init": baseline,
        "machine": machine(),
        "rows": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(markdown(out))
    return out


def markdown(out: dict) -> str:
    from readme_tables import methods_table  # bench/ is the script's folder, first on sys.path

    return methods_table(out)


if __name__ == "__main__":
    main()
