"""Every image method for the same short budget on digits: val kNN top-1 and images/s.

Not part of the test suite. Each method trains in this process (one worker, the
project's ``PretrainLoop`` on WebDataset shards of scikit-learn's digits, 16 px views,
small CNN of width 32) for the same number of epochs and global batch; then the
encoder's kNN top-1 on the val split (bank: the labeled train split) is measured with
the pipeline's own kNN monitor. The optimizer and learning rate follow each paper's
choice (LARS, SGD or AdamW), scaled to the batch; hyperparameters that only make sense
at ImageNet scale (queues of 65,536 keys, 8,192-wide projectors, 65,536 DINO
prototypes) are sized to a 1,259-image training split, and the table says so.

    .venv/bin/python bench/methods.py                 # every image method, 15 epochs
    .venv/bin/python bench/methods.py --methods simclr moco --epochs 5

Writes ``bench/results/methods.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import inspect
import json
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
from cl_core.data.sources import digits_source  # noqa: E402
from cl_core.engine import LoopConfig, PretrainLoop  # noqa: E402
from cl_core.evaluate import extract_features, knn_top1  # noqa: E402
from cl_core.methods import get_method, known_methods  # noqa: E402
from pipelines.config import ViewsConfig  # noqa: E402
from pipelines.stages.pretrain import view_transform  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
IMAGE_SIZE = 16

# per method: the paper's optimizer family and a learning rate for batch 256, and the
# hyperparameters resized for a 1,259-image split (everything else: the paper defaults)
SETTINGS: dict[str, dict] = {
    "simclr": {"optimizer": "lars", "lr_base": 1.0, "params": {"temperature": 0.5, "head_layers": 3, "proj_dim": 64}},
    "moco": {"optimizer": "sgd", "lr_base": 0.12, "weight_decay": 1e-4,
             "params": {"version": 2, "queue_size": 1024, "momentum": 0.99}},
    "mocov3": {"optimizer": "lars", "lr_base": 1.0, "params": {"hidden_dim": 512, "proj_dim": 128}},
    "byol": {"optimizer": "lars", "lr_base": 1.0, "params": {"proj_hidden_dim": 512, "proj_dim": 128, "tau_base": 0.99}},
    "simsiam": {"optimizer": "sgd", "lr_base": 0.05, "weight_decay": 1e-4,
                "params": {"proj_dim": 512, "pred_hidden_dim": 128}},
    "barlow_twins": {"optimizer": "lars", "lr_base": 0.4, "params": {"proj_hidden_dim": 512, "proj_dim": 512}},
    "vicreg": {"optimizer": "lars", "lr_base": 0.4, "params": {"proj_hidden_dim": 512, "proj_dim": 512}},
    "swav": {"optimizer": "lars", "lr_base": 1.0,
             "params": {"num_prototypes": 100, "hidden_dim": 512, "freeze_prototypes_steps": 20}},
    "dino": {"optimizer": "adamw", "lr_base": 0.0005, "weight_decay": 0.04,
             "params": {"out_dim": 1024, "hidden_dim": 512, "bottleneck_dim": 128, "momentum": 0.99,
                        "freeze_last_layer_steps": 20}},
    "supcon": {"optimizer": "lars", "lr_base": 1.0, "params": {}},
    "instdisc": {"optimizer": "sgd", "lr_base": 0.12, "weight_decay": 1e-4, "params": {"num_negatives": 1024}},
    "cmc": {"optimizer": "sgd", "lr_base": 0.12, "weight_decay": 1e-4, "params": {}},
    "cpc": {"optimizer": "adamw", "lr_base": 0.002, "weight_decay": 1e-6, "params": {"context_dim": 64}},
}


def machine() -> dict:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    return {"cpu_model": cpu or None, "cpu_cores": os.cpu_count(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "platform": platform.platform()}


def write_digits(out: Path) -> dict:
    source = digits_source()
    splits = S.split_refs(source.refs(), val_fraction=0.15, test_fraction=0.15, seed=0, stratified=True)
    results = {}
    for split, items in splits.items():
        results[split] = [S.write_shard(source, items[a:b], out / f"{split}-{i:06d}.tar")
                          for i, (a, b) in enumerate(S.plan_shards(len(items), 256, 4))]
    manifest = S.build_manifest(source=source, split_sizes={k: len(v) for k, v in splits.items()},
                                shard_results=results, seed=0, config={})
    S.write_manifest(out, manifest)
    return manifest


# the pipeline's own view builder, with the digits settings of pipelines/configs/default.yaml
VIEWS = ViewsConfig(image_size=IMAGE_SIZE, crop_min_scale=0.3, hflip_prob=0.0, jitter_strength=0.5, local_views=2,
                    local_image_size=8, local_crop_scale=(0.1, 0.3))


def transform_for(name: str):
    return view_transform(name, VIEWS)


def run_method(name: str, shard_dir: Path, manifest: dict, a: argparse.Namespace, evalset) -> dict:
    urls, counts = S.shard_urls(shard_dir, manifest, "train")
    s = SETTINGS.get(name, {"optimizer": "lars", "lr_base": 1.0, "params": {}})
    torch.manual_seed(0)
    cls = get_method(name)
    kwargs = {"backbone": "small_cnn", "backbone_args": {"width": 32}, **s["params"]}
    if "num_samples" in inspect.signature(cls.__init__).parameters:
        kwargs["num_samples"] = sum(counts)
    method = cls(**kwargs, gather_distributed=False)
    stream = ShardStream(urls, counts, transform=transform_for(name), batch_size=a.batch_size, rank=0, world_size=1,
                         loader_workers=a.loader_workers, shuffle_buffer=500, seed=0)
    cfg = LoopConfig(epochs=a.epochs, batch_size_per_worker=a.batch_size, optimizer=s["optimizer"],
                     lr_base=s["lr_base"], weight_decay=s.get("weight_decay", 1e-6), warmup_epochs=1,
                     loader_workers=a.loader_workers)
    loop = PretrainLoop(method, method, stream, cfg, torch.device("cpu"))
    bank_x, bank_y, val_x, val_y = evalset

    def evaluate(encoder: torch.nn.Module) -> dict[str, float]:
        fb, fv = extract_features(encoder, bank_x), extract_features(encoder, val_x)
        return {"val/knn_top1": knn_top1(fb, bank_y, fv, val_y, k=20, temperature=0.07)}

    t0 = time.perf_counter()
    history = loop.run(lambda m, st: None, evaluate)
    wall = time.perf_counter() - t0
    ips = [h["train/images_per_sec"] for h in history[1:]] or [history[0]["train/images_per_sec"]]
    return {"method": name, "view_kind": cls.view_kind, "knn_top1": history[-1]["val/knn_top1"],
            "best_knn_top1": max(h["val/knn_top1"] for h in history), "images_per_sec": float(np.median(ips)),
            "final_loss": history[-1]["train/loss"], "seconds": wall, "settings": s,
            "knn_curve": [round(h["val/knn_top1"], 4) for h in history]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="*", help="default: every image method")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--loader-workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "methods.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    names = a.methods or [m for m in known_methods() if get_method(m).view_kind != "text"]
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = Path(tmp)
        manifest = write_digits(shard_dir)
        tf = EvalTransform(IMAGE_SIZE)
        bank_x, bank_y = load_split(S.shard_urls(shard_dir, manifest, "train")[0], tf)
        val_x, val_y = load_split(S.shard_urls(shard_dir, manifest, "val")[0], tf)
        torch.manual_seed(0)
        random_enc = get_method("simclr")(backbone_args={"width": 32}, gather_distributed=False).encoder()
        baseline = knn_top1(extract_features(random_enc, bank_x), bank_y, extract_features(random_enc, val_x), val_y,
                            k=20, temperature=0.07)
        rows = []
        for name in names:
            print(f"[methods] {name} ...", flush=True)
            r = run_method(name, shard_dir, manifest, a, (bank_x, bank_y, val_x, val_y))
            print(f"[methods] {name}: kNN top-1 {r['knn_top1']:.4f}, {r['images_per_sec']:.0f} img/s, "
                  f"{r['seconds']:.0f} s", flush=True)
            rows.append(r)
    out = {"bench": "methods", "epochs": a.epochs, "batch_size": a.batch_size, "image_size": IMAGE_SIZE,
           "backbone": "small_cnn (width 32)", "train_images": int(manifest["splits"]["train"]["num_samples"]),
           "val_images": len(val_y), "random_init_knn_top1": baseline, "machine": machine(), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(markdown(out))
    return out


def markdown(out: dict) -> str:
    lines = [f"{out['epochs']} epochs, batch {out['batch_size']}, {out['image_size']} px, {out['backbone']}, "
             f"{out['train_images']} train / {out['val_images']} val images; random-init encoder kNN top-1 "
             f"{out['random_init_knn_top1']:.3f}", "",
             "| method | views | val kNN top-1 (final) | best | images/s | optimizer, lr/256 |",
             "|---|---|---:|---:|---:|---|"]
    for r in out["rows"]:
        s = r["settings"]
        lines.append(f"| {r['method']} | {r['view_kind']} | {r['knn_top1']:.3f} | {r['best_knn_top1']:.3f} | "
                     f"{r['images_per_sec']:.0f} | {s['optimizer']} {s['lr_base']:g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
