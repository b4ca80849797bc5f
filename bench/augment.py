"""SimCLR colour augmentation: per image in a loader worker vs batched on the device.

- ``per_image``: the colour part of ``cl_core.augment.SimCLRTransform`` (ColorJitter in
  RandomApply, RandomGrayscale, GaussianBlur in RandomApply where the config blurs,
  ToDtype + Normalize) on uint8 ``tv_tensors.Image`` views one at a time, as a DataLoader
  worker runs it: one torch thread (torch limits each worker to one).
- ``batched``: ``cl_core.augment_device.BatchColorAugment`` on the whole uint8 batch on
  the CPU, with one thread (per-core comparison, ``ratio``) and with all of torch's
  threads.
- ``batched_cuda`` (CUDA only): the same on the GPU, the batch already there (uint8),
  timed with ``torch.cuda.synchronize``.

The sides alternate, several repetitions each; the result is the median images/s per
side and the ratio batched / per_image at one thread.

    .venv/bin/python bench/augment.py                  # both configs, 7 repetitions (~15 s on 2 cores)
    .venv/bin/python bench/augment.py --configs 32px --reps 3

Writes ``bench/results/augment-<device>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.methods import machine  # noqa: E402
from cl_core.augment import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from cl_core.augment_device import BatchColorAugment  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# name: (image size, batch, blur_prob); jitter_strength 1.0, jitter_prob 0.8, grayscale_prob 0.2
CONFIGS = {"32px": (32, 256, 0.0), "224px": (224, 64, 0.5)}
COLOR = {"jitter_strength": 1.0, "jitter_prob": 0.8, "grayscale_prob": 0.2}


def per_image_transform(image_size: int, blur_prob: float) -> v2.Compose:
    """The colour ops of SimCLRTransform, in its order, with its parameters."""
    s = COLOR["jitter_strength"]
    ops: list[v2.Transform] = [
        v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=COLOR["jitter_prob"]),
        v2.RandomGrayscale(p=COLOR["grayscale_prob"]),
    ]
    if blur_prob > 0:
        k = max(3, int(0.1 * image_size) // 2 * 2 + 1)
        ops.append(v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=blur_prob))
    return v2.Compose(
        ops + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))]
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, threads: int) -> float:
    torch.set_num_threads(threads)
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def run_config(name: str, reps: int, all_threads: int) -> dict:
    size, batch, blur_prob = CONFIGS[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)
    views = [tv_tensors.Image(img) for img in x]
    tf = per_image_transform(size, blur_prob)
    aug = BatchColorAugment(size, blur_prob=blur_prob, **COLOR)
    cpu = torch.device("cpu")
    torch.manual_seed(0)  # the per-image path draws from the global generator

    def per_image() -> object:
        return [tf(v) for v in views]

    # side: (callable, device, threads)
    sides: dict[str, tuple[Callable[[], object], torch.device, int]] = {
        "per_image": (per_image, cpu, 1),
        "batched": (lambda: aug(x, gen), cpu, 1),
    }
    if all_threads > 1:
        sides[f"batched_{all_threads}t"] = (lambda: aug(x, gen), cpu, all_threads)
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        xc = x.to(cuda)
        gc = torch.Generator(device=cuda).manual_seed(0)
        sides["batched_cuda"] = (lambda: aug(xc, gc), cuda, all_threads)
    for fn, device, threads in sides.values():  # warm-up
        timed(fn, device, threads)
    seconds: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(reps):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))  # alternate the order
        for k in order:
            fn, device, threads = sides[k]
            seconds[k].append(timed(fn, device, threads))
    torch.set_num_threads(all_threads)
    rates = {k: [batch / s for s in v] for k, v in seconds.items()}
    med = {k: statistics.median(v) for k, v in rates.items()}
    out = {
        "config": name,
        "image_size": size,
        "batch": batch,
        "blur_prob": blur_prob,
        **COLOR,
        "reps": reps,
        "threads": {k: v[2] for k, v in sides.items()},
        "images_per_sec": rates,
        "median_images_per_sec": med,
        "ratio": med["batched"] / med["per_image"],
    }
    if "batched_cuda" in med:
        out["ratio_cuda"] = med["batched_cuda"] / med["per_image"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="*", choices=sorted(CONFIGS))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    all_threads = torch.get_num_threads()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = [run_config(c, args.reps, all_threads) for c in (args.configs or list(CONFIGS))]
    report = {
        "benchmark": "simclr-color-augment",
        "device": device,
        "machine": machine() | {"torch_threads": all_threads},
        "results": results,
    }
    out = args.out or RESULTS / f"augment-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    multi = f"batched_{all_threads}t"
    cuda = device == "cuda"
    print(
        "| config | batch | per image (1 thread) | batched CPU (1 thread) | ratio |"
        + (f" batched CPU ({all_threads} threads) |" if all_threads > 1 else "")
        + (" batched CUDA | CUDA / per image |" if cuda else "")
    )
    print("|---|---:|---:|---:|---:|" + ("---:|" if all_threads > 1 else "") + ("---:|---:|" if cuda else ""))
    for r in results:
        med = r["median_images_per_sec"]
        row = (
            f"| {r['config']} (blur {r['blur_prob']}) | {r['batch']} | {med['per_image']:.0f} | "
            f"{med['batched']:.0f} | {r['ratio']:.2f}x |"
        )
        if multi in med:
            row += f" {med[multi]:.0f} |"
        if cuda:
            row += f" {med['batched_cuda']:.0f} | {r['ratio_cuda']:.1f}x |"
        print(row)
    print("images/s (one view each), medians over the repetitions")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
