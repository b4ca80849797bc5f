"""The cost of Ray Train: the same training loop bare and as a Ray Train run.

Both sides run the project's ``TrainingLoop`` (SimCLR, small CNN, the digits shards
read by ``ShardStream``, DDP over gloo, a checkpoint every epoch) on the same number of
worker processes with the same threads each:

- ``bare``: one process per worker started with ``torch.multiprocessing`` (spawn), a
  plain ``torch.distributed`` gloo group, checkpoints written with ``torch.save``;
- ``ray``: a ``TorchTrainer`` on a local Ray started by this script, workers set up by
  ``ray.train.torch.prepare_model``, checkpoints through ``ray.train.report``.

Measured per side: the fixed start-up (from launch to the first optimizer step) and the
steady-state time per step (the epochs after the first, checkpoints included). The sides
alternate over several repetitions; the result is the medians and Ray Train's overhead
per step in percent.

    .venv/bin/python bench/overhead.py                    # 2 workers, 4 epochs, 3 repetitions
    .venv/bin/python bench/overhead.py --workers 1 --reps 2

Writes ``bench/results/overhead.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.methods import machine, write_digits  # noqa: E402
from cl_core import distributed  # noqa: E402
from cl_core.augment import SimCLRTransform  # noqa: E402
from cl_core.data import shards as S  # noqa: E402
from cl_core.data.reader import ShardStream  # noqa: E402
from cl_core.engine import LoopConfig, TrainingLoop  # noqa: E402
from cl_core.methods import SimCLR  # noqa: E402
from infra.procs import free_port  # noqa: E402
from pipelines.config import RayConfig  # noqa: E402
from pipelines.ray_env import TRAIN_POLL_ENV  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def train_loop(rank: int, world: int, cfg: dict, wrap, save) -> dict:
    """The loop both sides run; ``wrap`` makes the DDP model, ``save(metrics, state)``
    writes the epoch's checkpoint. Returns rank 0's timings (wall-clock stamps)."""
    entered = time.time()
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    method = SimCLR("small_cnn", backbone_args={"width": 32}, temperature=0.5, head_layers=3, proj_dim=64)
    model = wrap(method)
    urls, counts = S.shard_urls(cfg["shard_dir"], cfg["manifest"], "train")
    stream = ShardStream(
        urls,
        counts,
        transform=SimCLRTransform(16, crop_min_scale=0.3),
        batch_size=32,
        rank=rank,
        world_size=world,
        loader_workers=cfg["loader_workers"],
        shuffle_buffer=500,
        seed=0,
    )
    loop = TrainingLoop(
        model,
        method,
        stream,
        LoopConfig(
            epochs=cfg["epochs"], batch_size_per_worker=32, loader_workers=cfg["loader_workers"], log_every_steps=1
        ),
        torch.device("cpu"),
    )
    stamps: list[float] = []
    ends: list[float] = []

    def report(metrics: dict, state: dict | None) -> None:
        save(metrics, state)
        ends.append(time.time())

    loop.run(report, log=lambda step, m: stamps.append(time.time()))
    return {
        "entered": entered,
        "first_step": stamps[0],
        "steps_per_epoch": loop.steps_per_epoch,
        "epoch_ends": ends,
        "end": time.time(),
        "stamps": stamps,
        "pids": distributed.all_gather_object(os.getpid()),
    }


# ---- where the CPU goes ---------------------------------------------------------------
def _proc_table() -> dict[int, tuple[int, str, float]]:
    """{pid: (parent pid, name, CPU seconds)} of every process, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(d.name)] = (int(fields[1]), name, (int(fields[11]) + int(fields[12])) / tick)
    return table


class CpuSampler(threading.Thread):
    """Samples the CPU seconds of this process and all its descendants (Ray's daemons,
    the Train controller and workers, or the spawned bare workers) every 0.2 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        root = os.getpid()
        while not self._halt.is_set():
            table, now = _proc_table(), time.time()
            tree, children = {root}, {}
            for pid, (ppid, _, _) in table.items():
                children.setdefault(ppid, []).append(pid)
            todo = [root]
            while todo:
                for c in children.get(todo.pop(), []):
                    tree.add(c)
                    todo.append(c)
            self.samples.append((now, {pid: (table[pid][1], table[pid][2]) for pid in tree if pid in table}))
            self._halt.wait(0.2)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def cpu_between(self, t0: float, t1: float, workers: list[int]) -> dict[str, float]:
        """CPU seconds per process name between the samples nearest to t0 and t1, the
        training workers as one entry."""
        a = min(self.samples, key=lambda s: abs(s[0] - t0))[1]
        b = min(self.samples, key=lambda s: abs(s[0] - t1))[1]
        out: dict[str, float] = {}
        for pid, (name, cpu) in b.items():
            key = "training workers" if pid in workers else name
            out[key] = out.get(key, 0.0) + cpu - a.get(pid, (name, 0.0))[1]
        return {k: v for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v > 0}


# ---- bare: torch.multiprocessing + gloo ------------------------------------------------
def _bare_entry(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ckpt = Path(out) / "ckpt"

    def save(metrics: dict, state: dict | None) -> None:
        if rank == 0:
            ckpt.mkdir(exist_ok=True)
            torch.save(state, ckpt / "state.pt")

    result = train_loop(rank, world, cfg, lambda m: torch.nn.parallel.DistributedDataParallel(m), save)
    if rank == 0:
        torch.save(result, Path(out) / "result.pt")
    dist.destroy_process_group()


def run_bare(cfg: dict, world: int) -> dict:
    import torch.multiprocessing as mp

    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        launched = time.time()
        mp.spawn(_bare_entry, args=(world, port, cfg, out), nprocs=world, join=True)
        result = torch.load(Path(out) / "result.pt", weights_only=False)  # this script's own file
    return {"launched": launched, **result}


# ---- Ray Train ----------------------------------------------------------------------------
def _ray_worker(cfg: dict) -> dict | None:
    from ray import train

    ctx = train.get_context()
    rank = ctx.get_world_rank()

    def save(metrics: dict, state: dict | None) -> None:
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                torch.save(state, Path(d) / "state.pt")
            train.report(
                {"epoch": metrics["epoch"]}, checkpoint=train.Checkpoint.from_directory(d) if rank == 0 else None
            )

    result = train_loop(rank, ctx.get_world_size(), cfg, lambda m: train.torch.prepare_model(m), save)
    return result if rank == 0 else None


def run_ray(cfg: dict, world: int, storage: str, index: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=world, resources_per_worker={"CPU": cfg["threads"]}),
        run_config=RunConfig(name=f"overhead-{index}", storage_path=storage),
    )
    launched = time.time()
    result = trainer.fit()
    return {"launched": launched, **result.return_value}


def summarize(r: dict, sampler: CpuSampler) -> dict:
    ends, stamps, n = r["epoch_ends"], r["stamps"], r["steps_per_epoch"]
    steady = (ends[-1] - ends[0]) / ((len(ends) - 1) * n)  # epochs 2.., checkpoints included
    # inside the epochs: the gaps between consecutive steps of one epoch; at the epoch
    # boundaries: from an epoch's last step to the next epoch's first (report, checkpoint,
    # the loader's restart), epochs 2.. only
    inner = [
        b - a
        for e in range(1, len(ends))
        for a, b in zip(stamps[e * n : (e + 1) * n - 1], stamps[e * n + 1 : (e + 1) * n], strict=True)
    ]
    boundary = [stamps[e * n] - stamps[e * n - 1] for e in range(1, len(ends))]
    window = ends[-1] - ends[0]
    cpu = sampler.cpu_between(ends[0], ends[-1], r["pids"])
    return {
        "startup_s": r["first_step"] - r["launched"],
        "step_ms": 1000 * steady,
        "inner_step_ms": 1000 * statistics.median(inner),
        "epoch_boundary_ms": 1000 * statistics.median(boundary),
        "total_s": r["end"] - r["launched"],
        "cpu_cores_used": {k: v / window for k, v in cpu.items()},
    }


def _median_cores(runs: list[dict[str, float]]) -> dict[str, float]:
    names = {k for r in runs for k in r}
    med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in names}
    return {k: v for k, v in sorted(med.items(), key=lambda kv: -kv[1]) if v >= 0.005}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (and Ray CPUs) per worker")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--loader-workers", type=int, default=0)
    ap.add_argument(
        "--poll-seconds",
        type=float,
        default=RayConfig().train_poll_seconds,
        help="Ray Train controller's poll interval, as the pipeline sets it (ray.train_poll_seconds; "
        "Ray's own default is 2)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "overhead.json")
    a = ap.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = Path(tmp) / "shards"
        shard_dir.mkdir()
        manifest = write_digits(shard_dir)
        cfg = {
            "shard_dir": str(shard_dir),
            "manifest": manifest,
            "epochs": a.epochs,
            "threads": a.threads,
            "loader_workers": a.loader_workers,
        }
        os.environ[TRAIN_POLL_ENV] = str(a.poll_seconds)  # as pipelines.ray_env.init does
        t0 = time.time()
        ray.init(address="local", num_cpus=a.workers * a.threads + 1, include_dashboard=False, log_to_driver=False)
        ray_init_s = time.time() - t0
        runs: dict[str, list[dict]] = {"bare": [], "ray": []}
        for i in range(a.reps):
            order = ["bare", "ray"] if i % 2 == 0 else ["ray", "bare"]
            for side in order:
                sampler = CpuSampler()
                sampler.start()
                raw = run_bare(cfg, a.workers) if side == "bare" else run_ray(cfg, a.workers, str(Path(tmp) / "ray"), i)
                sampler.stop()
                runs[side].append(summarize(raw, sampler))
                print(f"rep {i + 1} {side}: {runs[side][-1]}", flush=True)
        ray.shutdown()
    med = {
        side: {k: statistics.median(r[k] for r in v) for k in v[0] if k != "cpu_cores_used"} for side, v in runs.items()
    }
    cores = {side: _median_cores([r["cpu_cores_used"] for r in v]) for side, v in runs.items()}
    overhead = 100 * (med["ray"]["step_ms"] / med["bare"]["step_ms"] - 1)
    report = {
        "benchmark": "ray-train-overhead",
        "machine": machine(),
        "settings": vars(a) | {"out": str(a.out)},
        "ray_init_s": ray_init_s,
        "runs": runs,
        "median": med,
        "steady_state_overhead_pct": overhead,
        "startup_extra_s": med["ray"]["startup_s"] - med["bare"]["startup_s"],
        "inner_step_overhead_pct": 100 * (med["ray"]["inner_step_ms"] / med["bare"]["inner_step_ms"] - 1),
        "epoch_boundary_extra_ms": med["ray"]["epoch_boundary_ms"] - med["bare"]["epoch_boundary_ms"],
        "cpu_cores_used_steady_state": cores,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    print(
        "| side | start-up to first step (s) | steady-state step (ms) | step inside an epoch (ms) "
        "| epoch boundary (ms) | total (s) | CPU cores used, steady state |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for side in ("bare", "ray"):
        m = med[side]
        used = ", ".join(f"{k} {v:.2f}" for k, v in list(cores[side].items())[:5])
        print(
            f"| {side} | {m['startup_s']:.1f} | {m['step_ms']:.1f} | {m['inner_step_ms']:.1f} | "
            f"{m['epoch_boundary_ms']:.0f} | {m['total_s']:.1f} | {used} |"
        )
    print(
        f"\nRay Train steady-state overhead per step: {overhead:+.1f}% "
        f"({report['inner_step_overhead_pct']:+.1f}% inside epochs, "
        f"{report['epoch_boundary_extra_ms']:+.0f} ms per epoch boundary); fixed start-up: "
        f"{report['startup_extra_s']:+.1f} s more than a bare launch (plus {ray_init_s:.1f} s to start the local Ray "
        "once per pipeline)"
    )
    print(f"results: {a.out}")


if __name__ == "__main__":
    main()
