"""What one Ray Train run costs before it trains anything: Ray's ``TorchTrainer`` against
the pipeline's ``pipelines.stages._train.Trainer`` (the same trainer less Ray Data's per-run
``DatasetManager`` actor), side by side on one local Ray.

Each run is a 2-worker ``fit`` of a loop that only imports torch. The two trainers take
turns (A, B, A, B, ...) so that the machine's changing speed falls on both alike.
Recorded per trainer: CPU seconds of the whole machine per run (``/proc/stat``, every
process: the actors' start-up, the workers', Ray's own), wall seconds per run, and the
Ray worker processes started per run (one log file each).

    .venv/bin/python bench/trainer_overhead.py            # 4 runs of each
    .venv/bin/python bench/trainer_overhead.py --runs 2 --out /tmp/t.json

Writes ``bench/results/trainer_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine_cpu_seconds() -> float:
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def loop(config: dict) -> None:
    import torch  # what every Train worker of the pipeline does first

    torch.set_num_threads(1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=4, help="fits of each trainer")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "trainer_overhead.json"))
    a = ap.parse_args()

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines import ray_env
    from pipelines.config import RayConfig
    from pipelines.stages._train import Trainer

    ray_env.init(RayConfig(num_cpus=2))
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    storage = tempfile.mkdtemp(prefix="trainer-overhead-")
    makers = {"ray TorchTrainer": TorchTrainer, "pipeline Trainer": Trainer}
    samples: dict[str, list[dict]] = {k: [] for k in makers}
    time.sleep(5)  # the new cluster's own start-up settles
    for i in range(a.runs):
        for name, make in makers.items():
            before = len(list(logs.glob("worker-*.out")))
            c0, t0 = machine_cpu_seconds(), time.perf_counter()
            make(
                loop,
                scaling_config=ScalingConfig(num_workers=2),
                run_config=RunConfig(name=f"{i}-{name.split()[-1]}", storage_path=storage),
            ).fit()
            time.sleep(2)  # the run's actors exit
            samples[name].append(
                {
                    "cpu_s": round(machine_cpu_seconds() - c0, 2),
                    "wall_s": round(time.perf_counter() - t0 - 2, 2),
                    "processes": len(list(logs.glob("worker-*.out"))) - before,
                }
            )
            print(name, samples[name][-1], flush=True)
    ray.shutdown()
    summary = {
        name: {
            "cpu_s_per_run": round(statistics.median(s["cpu_s"] for s in rs), 2),
            "wall_s_per_run": round(statistics.median(s["wall_s"] for s in rs), 2),
            "processes_per_run": statistics.median(s["processes"] for s in rs),
            "runs": rs,
        }
        for name, rs in samples.items()
    }
    a_, b_ = summary["ray TorchTrainer"], summary["pipeline Trainer"]
    out = {
        "what": "2-worker TorchTrainer.fit of an empty loop on a local Ray (2 CPUs), medians",
        "ray": ray.__version__,
        "cpu_cores": os.cpu_count(),
        "trainers": summary,
        "cpu_ratio": round(b_["cpu_s_per_run"] / a_["cpu_s_per_run"], 3),
        "wall_ratio": round(b_["wall_s_per_run"] / a_["wall_s_per_run"], 3),
    }
    Path(a.out).write_text(json.dumps(out, indent=2))
    for name, s in summary.items():
        print(
            f"{name:24s} {s['cpu_s_per_run']:6.2f} cpu-s  {s['wall_s_per_run']:6.2f} s  "
            f"{s['processes_per_run']} processes per run"
        )
    print(f"cpu ratio {out['cpu_ratio']}, wall ratio {out['wall_ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
