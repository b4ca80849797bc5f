"""Where the wall time of ``clpipe run`` goes: per stage, Ray start-up, MLflow logging
and compute.

Runs the pipeline in this process exactly as ``clpipe run`` does
(``pipelines.cli.main(["run", "--work-dir", TMP, ...])``, default config
``pipelines/configs/default.yaml``) in a fresh temporary work dir, with timing wrappers
around a few functions for the duration of the run (restored afterwards):

- ``pipelines.ray_env.init``: starting the local Ray cluster in the driver;
- the MLflow calls the driver makes: every public ``MlflowClient`` method, the fluent
  functions (``mlflow.start_run``, ``end_run``, ``log_*``, ``set_tag(s)``, ...),
  ``mlflow.pyfunc.log_model``, ``mlflow.artifacts.load_dict``,
  ``pipelines.models.log_model`` and the wrappers in ``pipelines.tracking``. Only the
  outermost call is timed (no double counting), and its time goes to the stage whose
  MLflow run window [start, end] it overlaps;
- ``fit`` of the Ray Train stages (pretrain, finetune, distill) and ``Tuner.fit`` of
  the sweep, with the sweep's trial concurrency.

Afterwards, per stage, from the MLflow store (sqlite in the work dir), Ray's task events
and the Tune results:

- wall: the stage run's end - start;
- Ray Train stages: compute = the sum of the stage's ``*train/epoch_seconds`` metrics
  (the loop's own timer on rank 0); Ray start-up = start of the first epoch (its
  metric's timestamp minus its value) - start of ``fit``; other = the rest: evaluation
  between epochs, checkpoints, workers' MLflow logging, the final checkpoint and
  worker-group shutdown, the driver's shard checks, checkpoint copies, plots;
- sweep: Tune's trials run side by side, so trial time is divided by the number of trial
  slots: compute = sum of the trials' epoch seconds / slots, Ray start-up = Tuner.fit -
  sum of the trials' own run time (``time_total_s``) / slots, i.e. Tune's set-up, trial
  actor start-up and slots left idle;
- shard and evaluate (Ray tasks): Ray start-up = from submitting the first task to the
  start of its function (Ray's ``task:execute`` event): worker lease and start, loading
  the task's code, argument transfer; compute = the rest after MLflow;
- labels, register: compute = wall - MLflow.

Not included in MLflow: the per-epoch metrics the Ray Train workers (rank 0) log from
their own processes (one small ``log_batch`` per epoch; inside "other"). Python imports
(torch, Ray, MLflow, the stages) and ``ray.shutdown`` after the run are timed but kept
out of the total, which is the wall time of ``main()``.

    .venv/bin/python bench/pipeline.py                  # the default run (~5 min on 2 cores)
    .venv/bin/python bench/pipeline.py --quick          # no sweep, 1-2 epochs per stage (~2 min)
    .venv/bin/python bench/pipeline.py --set pretrain.epochs=5 --out /tmp/p.json

Writes ``bench/results/pipeline.json`` (machine, settings, per-stage numbers, MLflow time
per operation) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = Path(__file__).resolve().parent / "results"
QUICK = ["sweep.enabled=false", "pretrain.epochs=2", "finetune.epochs=2", "finetune.min_steps=0", "distill.epochs=1"]
TRAIN_STAGES = ("pretrain", "finetune", "distill")
TASK_STAGES = ("shard", "evaluate")  # stages that run Ray tasks in the driver's Ray
FLUENT = (
    "start_run",
    "end_run",
    "log_metric",
    "log_metrics",
    "log_param",
    "log_params",
    "set_tag",
    "set_tags",
    "log_artifact",
    "log_artifacts",
    "log_dict",
    "log_text",
    "log_figure",
    "log_image",
    "get_run",
    "register_model",
    "set_experiment",
    "search_runs",
    "set_tracking_uri",
)
TRACKING = ("setup", "log_params", "log_metrics", "find_cached", "artifact_uri", "save_outputs", "load_outputs")
LOCAL_ONLY = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "CLPIPE_STACK_ENV")


def machine() -> dict:
    import mlflow
    import ray

    from bench.methods import machine as base

    return base() | {"ray": ray.__version__, "mlflow": mlflow.__version__}


class Probe:
    """Timing wrappers on functions and methods, removed by :meth:`restore`.

    Times are wall-clock seconds (``time.time``, as MLflow's run and metric timestamps)
    with durations from ``perf_counter``."""

    def __init__(self) -> None:
        self.mlflow_calls: list[tuple[str, float, float]] = []  # (operation, start, end)
        self.spans: dict[str, list[dict]] = defaultdict(list)  # ray_init, train_fit, tune_fit, ...
        self._local = threading.local()
        self._undo: list[tuple[Any, str, Any]] = []

    def _set(self, owner: Any, name: str, new: Any, original: Any) -> None:
        self._undo.append((owner, name, original))
        setattr(owner, name, new)

    def restore(self) -> None:
        while self._undo:
            owner, name, original = self._undo.pop()
            setattr(owner, name, original)

    # ---- MLflow: only the outermost call of a thread is timed ---------------------
    def _timed_mlflow(self, label: str, fn: Any) -> Any:
        local = self._local

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if getattr(local, "depth", 0):
                return fn(*args, **kwargs)
            local.depth = 1
            t0, p0 = time.time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                local.depth = 0
                self.mlflow_calls.append((label, t0, t0 + time.perf_counter() - p0))

        return timed

    def mlflow_function(self, module: Any, name: str, label: str) -> None:
        fn = getattr(module, name, None)
        if callable(fn):
            self._set(module, name, self._timed_mlflow(label, fn), fn)

    def mlflow_class(self, cls: type, label: str) -> None:
        for name, value in list(vars(cls).items()):
            if (name == "__init__" or not name.startswith("_")) and inspect.isfunction(value):
                self._set(cls, name, self._timed_mlflow(f"{label}.{name}", value), value)

    # ---- spans: Ray init, Train / Tune fits, values returned ----------------------
    def span(self, owner: Any, name: str, kind: str, keep: bool = False) -> None:
        fn = vars(owner)[name] if isinstance(owner, type) else getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            rec = {"start": time.time()}
            p0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                if keep:
                    rec["value"] = out
                return out
            finally:
                rec["end"] = rec["start"] + time.perf_counter() - p0
                rec["args"] = args if keep else ()
                self.spans[kind].append(rec)

        self._set(owner, name, timed, fn)


def instrument(probe: Probe) -> None:
    import mlflow
    import mlflow.artifacts
    import mlflow.pyfunc
    import mlflow.tracking.fluent
    import ray.tune
    from mlflow.tracking import MlflowClient

    import pipelines.cli
    from pipelines import models, ray_env, tracking

    # the stage modules (pipelines.stages re-exports functions of the same names)
    _train, pretrain, finetune, distill, sweep = (
        importlib.import_module(f"pipelines.stages.{m}") for m in ("_train", "pretrain", "finetune", "distill", "sweep")
    )

    probe.mlflow_class(MlflowClient, "MlflowClient")
    for name in FLUENT:
        probe.mlflow_function(mlflow, name, f"mlflow.{name}")
        # the fluent module's own names too: ActiveRun.__exit__ calls its end_run
        probe.mlflow_function(mlflow.tracking.fluent, name, f"mlflow.{name}")
    probe.mlflow_function(mlflow.pyfunc, "log_model", "mlflow.pyfunc.log_model")
    probe.mlflow_function(mlflow.artifacts, "load_dict", "mlflow.artifacts.load_dict")
    probe.mlflow_function(models, "log_model", "models.log_model")
    for name in TRACKING:
        probe.mlflow_function(tracking, name, f"tracking.{name}")
    probe.span(ray_env, "init", "ray_init")
    for module in (_train, pretrain, finetune, distill):
        if getattr(module, "fit", None) is not None:
            probe.span(module, "fit", "train_fit")
    probe.span(ray.tune.Tuner, "fit", "tune_fit", keep=True)
    probe.span(sweep, "_concurrency", "sweep_slots", keep=True)
    probe.span(pipelines.cli, "run", "pipeline", keep=True)


# ---- analysis -----------------------------------------------------------------------
def overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def spans_in(spans: list[dict], s: float, e: float) -> list[dict]:
    return [x for x in spans if overlap(x["start"], x["end"], s, e) > 0]


def epoch_records(client: Any, run: Any) -> dict[str, list[tuple[int, float, float]]]:
    """{model: [(epoch, epoch_seconds, end timestamp s)]} from the stage's MLflow metrics."""
    out = {}
    for key in sorted(run.data.metrics):
        if key == "train/epoch_seconds" or key.endswith("/train/epoch_seconds"):
            hist = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
            model = key.removesuffix("train/epoch_seconds").rstrip("/") or "encoder"
            out[model] = [(int(m.step), float(m.value), m.timestamp / 1000) for m in hist]
    return out


def ray_task_events(wait_s: float = 3.0) -> list[dict]:
    """Normal Ray tasks of this session: submission and function start/end (seconds)."""
    try:
        from ray.util.state import list_tasks

        time.sleep(wait_s)  # task events reach the GCS about once a second
        tasks = list_tasks(
            filters=[("type", "=", "NORMAL_TASK")], detail=True, limit=10_000, timeout=60, raise_on_missing_output=False
        )
    except Exception as e:  # noqa: BLE001 - the state API is optional here: the row falls back
        print(f"[pipeline] Ray task events unavailable ({type(e).__name__}: {e})", flush=True)
        return []
    out = []
    for t in tasks:
        t = t if isinstance(t, dict) else t.__dict__
        ev = [x for x in ((t.get("profiling_data") or {}).get("events") or []) if x.get("event_name") == "task:execute"]
        start = ev[0]["start_time"] / 1000 if ev else (t["start_time_ms"] / 1000 if t.get("start_time_ms") else None)
        end = ev[0]["end_time"] / 1000 if ev else (t["end_time_ms"] / 1000 if t.get("end_time_ms") else None)
        if t.get("creation_time_ms") and start is not None and end is not None:
            out.append(
                {
                    "name": t.get("func_or_class_name") or t.get("name"),
                    "submitted": t["creation_time_ms"] / 1000,
                    "start": start,
                    "end": end,
                    "source": "task:execute" if ev else "RUNNING state",
                }
            )
    return out


def stage_row(name: str, client: Any, run_id: str, cached: bool, probe: Probe, tasks: list[dict]) -> dict:
    run = client.get_run(run_id)
    s, e = run.info.start_time / 1000, run.info.end_time / 1000
    wall = e - s
    ops: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    mlflow_s = 0.0
    for label, a, b in probe.mlflow_calls:
        o = overlap(a, b, s, e)
        if o > 0:
            mlflow_s += o
            ops[label][1] += o
            if s <= (a + b) / 2 <= e:
                ops[label][0] += 1
    row: dict[str, Any] = {
        "stage": name,
        "cached": cached,
        "wall": wall,
        "ray_startup": None,
        "mlflow": mlflow_s,
        "compute": None,
        "other": None,
        "detail": {},
        "mlflow_ops": {
            k: {"calls": int(c), "seconds": round(v, 4)} for k, (c, v) in sorted(ops.items(), key=lambda kv: -kv[1][1])
        },
    }
    if cached:  # a cache hit: nothing computed
        row.update(compute=0.0, other=wall - mlflow_s)
        return row
    fits = spans_in(probe.spans["train_fit"], s, e)
    epochs = epoch_records(client, run)
    if name in TRAIN_STAGES and fits and epochs:
        fs, fe = min(f["start"] for f in fits), max(f["end"] for f in fits)
        fit_s = sum(f["end"] - f["start"] for f in fits)
        first_start = min(rs[0][2] - rs[0][1] for rs in epochs.values() if rs)
        last_end = max(rs[-1][2] for rs in epochs.values() if rs)
        compute = sum(v for rs in epochs.values() for _, v, _ in rs)
        mlflow_in_fit = sum(overlap(a, b, fs, fe) for _, a, b in probe.mlflow_calls)
        row.update(ray_startup=first_start - fs, compute=compute)
        row["detail"] = {
            "fit_s": fit_s,
            "before_first_epoch_s": first_start - fs,
            "epochs_s": compute,
            "between_epochs_s": last_end - first_start - compute,
            "after_last_epoch_s": fe - last_end,
            "driver_outside_fit_s": wall - mlflow_s - fit_s + mlflow_in_fit,
            "models": {
                m: {"epochs": len(rs), "epoch_seconds": [round(v, 4) for _, v, _ in rs]} for m, rs in epochs.items()
            },
        }
    elif name == "sweep" and probe.spans["tune_fit"]:
        tf = spans_in(probe.spans["tune_fit"], s, e)
        fit_s = sum(f["end"] - f["start"] for f in tf)
        trials = []
        for f in tf:
            for r in f.get("value") or []:
                df = r.metrics_dataframe
                if df is None or "epoch" not in df:
                    continue
                df = df.dropna(subset=["epoch"]).drop_duplicates("epoch", keep="last").sort_values("epoch")
                trials.append(
                    {
                        "trial": Path(r.path).name,
                        "epochs": len(df),
                        "epoch_seconds": float(df["train/epoch_seconds"].sum()),
                        "trial_seconds": float(df["time_total_s"].iloc[-1]),
                    }
                )
        slots_spans = spans_in(probe.spans["sweep_slots"], s, e)
        slots = min(int(slots_spans[-1]["value"]), len(trials)) if slots_spans and trials else 1
        epoch_sum = sum(t["epoch_seconds"] for t in trials)
        trial_sum = sum(t["trial_seconds"] for t in trials)
        row.update(ray_startup=fit_s - trial_sum / slots, compute=epoch_sum / slots)
        row["detail"] = {
            "tune_fit_s": fit_s,
            "trial_slots": slots,
            "trials": trials,
            "trial_seconds_sum": trial_sum,
            "epoch_seconds_sum": epoch_sum,
            "in_trial_other_s": (trial_sum - epoch_sum) / slots,
            "driver_outside_fit_s": wall - mlflow_s - fit_s,
        }
    elif name in TASK_STAGES:
        mine = [t for t in tasks if s <= t["submitted"] <= e]
        if mine:
            first = min(mine, key=lambda t: t["submitted"])
            row["ray_startup"] = min(t["start"] for t in mine) - first["submitted"]
            row["detail"] = {
                "tasks": len(mine),
                "task_timing": mine[0]["source"],
                "first_task_wait_s": row["ray_startup"],
                "task_function_seconds_sum": sum(t["end"] - t["start"] for t in mine),
                "task_function_seconds_union": union_length([(t["start"], t["end"]) for t in mine]),
            }
    if row["compute"] is None:
        row["compute"] = wall - mlflow_s - (row["ray_startup"] or 0.0)
    row["other"] = wall - mlflow_s - (row["ray_startup"] or 0.0) - row["compute"]
    return row


def analyse(probe: Probe, total: float, tasks: list[dict]) -> dict:
    from mlflow.tracking import MlflowClient

    (pipe,) = probe.spans["pipeline"]
    cfg, result = pipe["args"][0], pipe["value"]
    client = MlflowClient(cfg.tracking_uri())
    rows = [stage_row(name, client, st.run_id, st.cached, probe, tasks) for name, st in result.stages.items()]
    ray_init = sum(x["end"] - x["start"] for x in probe.spans["ray_init"])
    mlflow_all = sum(b - a for _, a, b in probe.mlflow_calls)
    driver_mlflow = mlflow_all - sum(r["mlflow"] for r in rows)
    driver_wall = total - sum(r["wall"] for r in rows)
    ops: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for label, a, b in probe.mlflow_calls:
        ops[label][0] += 1
        ops[label][1] += b - a
    driver = {
        "stage": "driver (outside stages)",
        "cached": False,
        "wall": driver_wall,
        "ray_startup": ray_init,
        "mlflow": driver_mlflow,
        "compute": 0.0,
        "other": driver_wall - ray_init - driver_mlflow,
        "detail": {"what": "Ray init, MLflow store set-up and parent run, cache lookups, config, summary"},
    }
    rows = [driver, *rows]
    tot = {
        "stage": "total",
        "wall": total,
        **{k: sum(r[k] or 0.0 for r in rows) for k in ("ray_startup", "mlflow", "compute", "other")},
    }
    for r in [*rows, tot]:
        r["compute_share"] = r["compute"] / r["wall"] if r["wall"] > 0 else None
    return {
        "rows": rows,
        "total": tot,
        "ray_init_seconds": ray_init,
        "tracking_uri_kind": cfg.tracking_uri().split(":")[0],
        "mlflow_ops": {
            k: {"calls": int(c), "seconds": round(v, 4)} for k, (c, v) in sorted(ops.items(), key=lambda kv: -kv[1][1])
        },
    }


# ---- output -------------------------------------------------------------------------
def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{round(v, digits) + 0.0:.{digits}f}"  # no "-0.0"


def markdown(out: dict) -> str:
    s = out["settings"]
    lines = [
        f"`clpipe run` {'(quick) ' if s['quick'] else ''}overrides: {' '.join(s['overrides']) or 'none'}; "
        f"{out['machine']['cpu_cores']} cores, GPU {out['machine']['gpu'] or 'none'}; "
        f"wall {out['total']['wall']:.1f} s, driver Ray init {out['ray_init_seconds']:.1f} s "
        f"(not in the total: imports {out['imports_seconds']:.1f} s, ray.shutdown "
        f"{_f(out['ray_shutdown_seconds'])} s)",
        "",
        "| stage | wall s | Ray start-up s | MLflow s | compute s | other s | compute share |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in [*out["rows"], out["total"]]:
        name = f"**{r['stage']}**" if r["stage"] == "total" else r["stage"] + (" (cached)" if r.get("cached") else "")
        share = "-" if r["compute_share"] is None else f"{100 * r['compute_share']:.0f}%"
        lines.append(
            f"| {name} | {_f(r['wall'])} | {_f(r['ray_startup'])} | {_f(r['mlflow'])} | {_f(r['compute'])} | "
            f"{_f(r['other'])} | {share} |"
        )
    train = [r for r in out["rows"] if r["stage"] in TRAIN_STAGES and "fit_s" in r["detail"]]
    if train:
        lines += [
            "",
            "| training stage | fit s | before first epoch s | epochs s | between epochs s | "
            "after last epoch s | driver outside fit and MLflow s |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in train:
            d = r["detail"]
            cells = [
                _f(d[k])
                for k in (
                    "fit_s",
                    "before_first_epoch_s",
                    "epochs_s",
                    "between_epochs_s",
                    "after_last_epoch_s",
                    "driver_outside_fit_s",
                )
            ]
            lines.append(f"| {r['stage']} | {' | '.join(cells)} |")
    lines += ["", "| MLflow operation (driver, outermost call) | calls | s |", "|---|---:|---:|"]
    for k, v in list(out["mlflow_ops"].items())[:10]:
        lines.append(f"| {k} | {v['calls']} | {v['seconds']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML config (default: the embedded default pipeline)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed to clpipe run --set (repeatable)",
    )
    p.add_argument("--quick", action="store_true", help=f"a fast check: {' '.join(QUICK)}")
    p.add_argument("--out", default=str(RESULTS / "pipeline.json"))
    a = p.parse_args(argv)
    clash = [k for k in LOCAL_ONLY if os.environ.get(k)]
    if clash or (Path(".clpipe-stack") / "stack.env").is_file():
        sys.exit(
            f"bench/pipeline.py measures the local run (its own Ray, sqlite MLflow store); unset "
            f"{', '.join(clash) or 'nothing'} and run from a directory without .clpipe-stack/stack.env"
        )
    overrides = [*(QUICK if a.quick else []), *a.overrides]
    load_before = os.getloadavg()

    t0 = time.perf_counter()
    import ray

    import pipelines.cli
    import pipelines.stages  # noqa: F401 - every stage module (torch, Ray Train/Tune, MLflow)

    imports_s = time.perf_counter() - t0

    probe = Probe()
    with tempfile.TemporaryDirectory(prefix="clpipe-bench-") as work:
        argv_run = [
            "run",
            *([a.config] if a.config else []),
            "--work-dir",
            work,
            *[x for o in overrides for x in ("--set", o)],
        ]
        try:
            instrument(probe)
            t0 = time.perf_counter()
            rc = pipelines.cli.main(argv_run)
            total = time.perf_counter() - t0
        finally:
            probe.restore()
        if rc != 0:
            sys.exit(f"clpipe run exited with {rc}; nothing written")
        tasks = ray_task_events()
        analysis = analyse(probe, total, tasks)
        shutdown_s = None
        if ray.is_initialized():
            t0 = time.perf_counter()
            ray.shutdown()
            shutdown_s = time.perf_counter() - t0
    out = {
        "bench": "pipeline",
        "settings": {
            "config": a.config or "pipelines/configs/default.yaml",
            "quick": a.quick,
            "overrides": overrides,
            "work_dir": "fresh temporary directory",
        },
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "imports_seconds": imports_s,
        "ray_shutdown_seconds": shutdown_s,
        **analysis,
        "notes": [
            "total = wall time of pipelines.cli.main(['run', ...]) in this process; imports and "
            "ray.shutdown are measured apart",
            "MLflow = the driver's MLflow calls (outermost call timed), split by overlap with each stage "
            "run's [start, end]; the Ray Train workers' own per-epoch log_batch calls are not in it "
            "(they fall in 'other')",
            "Ray Train stages: compute = sum of *train/epoch_seconds; Ray start-up = first epoch start "
            "(metric timestamp - value, so it includes the first epoch's val evaluation) - fit() start",
            "sweep: trial times divided by the trial slots Tune used; Ray start-up there includes idle slots",
            "shard/evaluate: Ray start-up = first task's submission to the start of its function (Ray task events)",
        ],
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2, default=str))
    print(markdown(out))
    return out


if __name__ == "__main__":
    main()
