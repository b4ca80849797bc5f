"""The teacher against a linear probe of its own encoder on digits, side by side over
seeds: which fine-tuning setting makes the fine-tuned teacher at least as good as the
probe (issue: a fine-tuned teacher must not end below a linear probe on the same labels).

Each seed pretrains once (the budget of tests/pipelines/test_pipeline_methods.py: 5 epochs, no
sweep) and every variant fine-tunes the same encoder on the same 126 labels (10%), then
evaluate scores the teacher and the probe on the same 269 test images. Run (about 17
minutes on 2 cores)::

    .venv/bin/python bench/digits_finetune.py [--seeds 0 1 2] [--variants NAME ...]

Writes bench/results/digits_finetune.json (per seed: teacher, probe, teacher - probe, the
selected val top-1; per variant: the mean and the smallest difference).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from semi_supervised import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "digits_finetune.json"
# the budget of the test that holds teacher >= probe
BUDGET = ["sweep.enabled=false", "pretrain.epochs=5", "finetune.baseline=false", "distill.epochs=1"]
VARIANTS = {
    "head layer 1, lr 0.1": ["finetune.finetune_from_head_layer=1", "finetune.lr_base=0.1"],
    "head layer 1, lr 0.2": ["finetune.finetune_from_head_layer=1", "finetune.lr_base=0.2"],
    "head layer 1, lr 0.2, 120 epochs": [
        "finetune.finetune_from_head_layer=1",
        "finetune.lr_base=0.2",
        "finetune.epochs=120",
        "finetune.min_steps=240",
    ],
    "encoder alone, lr 0.1": ["finetune.finetune_from_head_layer=0", "finetune.lr_base=0.1"],
    "encoder alone, lr 0.2": ["finetune.finetune_from_head_layer=0", "finetune.lr_base=0.2"],
}


def once(work: str, seed: int, overrides: list[str]) -> dict:
    from pipelines.cli import run
    from pipelines.config import load_config

    cfg = load_config(None, [f"work_dir={work}", f"seed={seed}", *BUDGET, *overrides])
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = run(cfg, until="evaluate")
    (row,) = [r for r in result.stages["evaluate"].outputs["rows"] if r["label_fraction"] == 0.1]
    model = result.stages["finetune"].outputs["models"]["teacher_10pct"]
    return {
        "seed": seed,
        "teacher": row["teacher"],
        "probe": row["encoder_linear"],
        "teacher_minus_probe": row["teacher"] - row["encoder_linear"],
        "val_top1": model["val_top1"],
        "selected_epoch": model["selected_epoch"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix=f"clpipe-digits-ft{seed}-") as work:  # one encoder per seed
            for v in args.variants:
                r = once(work, seed, VARIANTS[v])
                runs[v].append(r)
                print(
                    f"seed {seed}  {v:24s} teacher {r['teacher']:.4f}  probe {r['probe']:.4f}  "
                    f"diff {100 * r['teacher_minus_probe']:+.1f} pt",
                    flush=True,
                )
    summary = {
        v: {
            "overrides": VARIANTS[v],
            "mean_teacher_minus_probe": statistics.mean(r["teacher_minus_probe"] for r in rs),
            "min_teacher_minus_probe": min(r["teacher_minus_probe"] for r in rs),
            "mean_teacher": statistics.mean(r["teacher"] for r in rs),
        }
        for v, rs in runs.items()
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": machine(),
                "date": time.strftime("%Y-%m-%d"),
                "budget": BUDGET,
                "summary": summary,
                "runs": runs,
            },
            indent=2,
        )
    )
    print(json.dumps(summary, indent=1))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
