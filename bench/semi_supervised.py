"""SimCLRv2's semi-supervised numbers on digits: teacher vs supervised baseline, student
vs teacher, at 1% and 10% of the labels.

Runs the default pipeline (the same stages ``clpipe run`` runs) with
``labels.fractions=[0.01, 0.1]`` twice in one work directory:

1. self-distillation: the student has the teacher's backbone (the default, T = 0.1);
2. big-to-small: a small_cnn of width 16 (about a quarter of the teacher's parameters,
   T = 1.0 as SimCLRv2 for big-to-small).

The second run reuses the first one's shards, label subsets, pretrained encoder and
teachers from the stage cache, so only distill, evaluate and register run again. Every
number is test top-1 on the 269-image test split (one image is 0.37 points).

Run (about 8 minutes on 2 cores)::

    .venv/bin/python bench/semi_supervised.py [--work-dir DIR] [--set KEY=VALUE ...]

Results go to bench/results/semi_supervised.json and are printed as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "semi_supervised.json"


CPU_FLAGS = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"}


def machine() -> dict:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    flags = next((set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")), set())
    return {
        "cpu_model": cpu or None,
        # the vector units a CPU result depends on (bf16 autocast trained pretrain at 1.30x fp32's images/s on
        # a CPU with avx512_bf16, e2e_compile.json; on an AVX2-only host an unrecorded try was several times
        # slower than fp32): hosts named alike can differ
        "cpu_flags": sorted(flags & CPU_FLAGS),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def run(work: str, overrides: list[str]) -> dict:
    from pipelines.cli import run as run_pipeline
    from pipelines.config import load_config

    cfg = load_config(None, [f"work_dir={work}", "labels.fractions=[0.01, 0.1]", *overrides])
    t0 = time.perf_counter()
    result = run_pipeline(cfg)
    ev, dist = result.stages["evaluate"].outputs, result.stages["distill"].outputs
    return {
        "overrides": overrides,
        "rows": ev["rows"],
        "seconds": time.perf_counter() - t0,
        "student_params": {k: v.get("params") for k, v in dist["models"].items()},
        "teacher_params": {k: v.get("teacher_params") for k, v in dist["models"].items()},
        "stages": {k: {"seconds": s.seconds, "cached": s.cached} for k, s in result.stages.items()},
    }


def table(runs: dict[str, dict]) -> str:
    self_rows = {r["label_fraction"]: r for r in runs["self"]["rows"]}
    small_rows = {r["label_fraction"]: r for r in runs["small"]["rows"]}
    sp = next(iter(runs["small"]["student_params"].values()))
    tp = next(iter(runs["small"]["teacher_params"].values()))
    lines = [
        f"| labels | supervised baseline | teacher | teacher - baseline | self-distilled student | student - teacher "
        f"| small student ({sp / tp:.2f}x params) | small - teacher |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in sorted(self_rows):
        a, b = self_rows[f], small_rows[f]
        lines.append(
            f"| {f:g} ({a['labels']}) | {a['baseline']:.4f} | {a['teacher']:.4f} "
            f"| {100 * (a['teacher'] - a['baseline']):+.1f} pt "
            f"| {a['student']:.4f} | {100 * (a['student'] - a['teacher']):+.1f} pt "
            f"| {b['student']:.4f} | {100 * (b['student'] - b['teacher']):+.1f} pt |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", help="default: a fresh temporary directory")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    args = ap.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="clpipe-semi-")
    runs = {
        "self": run(work, args.overrides),
        "small": run(work, [*args.overrides, "distill.student_width=16", "distill.temperature=1.0"]),
    }
    md = table(runs)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine(), "runs": runs, "table": md}, indent=2))
    print(md)
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
