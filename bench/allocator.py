"""CPU training step with glibc's default allocator against the training loop's
``cpu_allocator: cache`` (:mod:`cl_core.allocator`), for this project's SimCLR and for
lightly's, side by side in one run.

Each (side, allocator) pair lives in its own process (the allocator setting is
process-wide); the parent asks them in turn, alternating the order, to time a fixed
number of steps on the same pre-made views. Reports the median images/s, the ratios
and each process's peak RSS.

    .venv/bin/python bench/allocator.py                  # small_cnn-32 and resnet18-32
    .venv/bin/python bench/allocator.py --configs small_cnn-32 --reps 3

Writes ``bench/results/allocator-cpu.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.methods import machine  # noqa: E402
from bench.step import CONFIGS, CPU_CONFIGS, RESULTS, SideProcess  # noqa: E402

SIDES = [("clpipe", "cache"), ("clpipe", "system"), ("lightly", "system"), ("lightly", "cache")]


def run_config(config: str, reps: int, steps: int, warmup: int) -> dict:
    batch = CONFIGS[config][3]
    cpu = torch.device("cpu")
    sides = {f"{kind}/{alloc}": SideProcess(kind, config, cpu, alloc=alloc) for kind, alloc in SIDES}
    for side in sides.values():  # warm-up, one side at a time
        side.ask(warmup)
    seconds: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(reps):
        for k in list(sides) if r % 2 == 0 else list(reversed(sides)):
            seconds[k].append(sides[k].ask(steps))
    rss = {k: side.close() for k, side in sides.items()}
    med = {k: statistics.median(batch * steps / s for s in v) for k, v in seconds.items()}
    return {
        "config": config,
        "batch": batch,
        "steps_per_rep": steps,
        "reps": reps,
        "images_per_sec": {k: [batch * steps / s for s in v] for k, v in seconds.items()},
        "median_images_per_sec": med,
        "peak_rss_mib": rss,
        "cache_speedup": {
            "clpipe": med["clpipe/cache"] / med["clpipe/system"],
            "lightly": med["lightly/cache"] / med["lightly/system"],
        },
        "ratio_same_allocator": {
            "system": med["clpipe/system"] / med["lightly/system"],
            "cache": med["clpipe/cache"] / med["lightly/cache"],
        },
        "ratio_as_shipped": med["clpipe/cache"] / med["lightly/system"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="*", choices=CPU_CONFIGS, default=CPU_CONFIGS)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "allocator-cpu.json")
    args = ap.parse_args()
    results = [run_config(c, args.reps, args.steps, args.warmup) for c in args.configs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "cpu-allocator",
                "device": "cpu",
                "machine": machine() | {"torch_threads": torch.get_num_threads()},
                "results": results,
            },
            indent=2,
        )
    )
    print(
        "| config | clpipe cache | clpipe system | lightly system | lightly cache | cache speed-up (clpipe) "
        "| clpipe/lightly, same allocator (system / cache) | as shipped (clpipe cache / lightly system) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        m = r["median_images_per_sec"]
        same = r["ratio_same_allocator"]
        print(
            f"| {r['config']} | {m['clpipe/cache']:.0f} | {m['clpipe/system']:.0f} | {m['lightly/system']:.0f} | "
            f"{m['lightly/cache']:.0f} | {r['cache_speedup']['clpipe']:.2f}x | {same['system']:.2f}x / "
            f"{same['cache']:.2f}x | {r['ratio_as_shipped']:.2f}x |"
        )
    print(
        "images/s (an image = two views), medians over the repetitions; peak RSS (MiB): "
        + "; ".join(
            f"{r['config']} " + ", ".join(f"{k} {v:.0f}" for k, v in r["peak_rss_mib"].items()) for r in results
        )
    )
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
