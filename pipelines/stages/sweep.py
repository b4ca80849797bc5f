"""sweep: Ray Tune over the method's hyperparameters before the final pretrain
(ShardSet -> SweepResult).

Each trial is a short pretrain of the configured method that reports val kNN top-1
after every epoch; successive halving (ASHA's rungs, each decided once all of its
trials reported: pipelines/halving.py) stops the trials that trail. With
``workers_per_trial: 1`` a trial is the project's ``TrainingLoop`` in the Tune trial
process itself; with more, the trial is a small driver that runs the pretrain stage's
``train_worker`` on its own ``TorchTrainer`` (Ray's Train-in-Tune pattern: the trial
reserves almost nothing, its Train workers reserve the rest of ``cpus_per_trial``) and
forwards the reports to Tune with ``TuneReportCallback``. Trial names are deterministic
(their index and values); the Tune experiment lives under the work dir's
``ray_results/<stage>-<key>`` and a rerun after an interruption restores it
(``Tuner.restore``): single-worker trials resume from their Tune checkpoint, multi-worker
trials from their Train run (named after the trial, under ``<experiment>/train``).
Afterwards every trial becomes a nested MLflow run (params, per-epoch metrics, whether
halving stopped it), and the sweep run gets the ranked table and the plots. The best
values flow into the pretrain stage.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import mlflow
import torch
from ray import tune
from ray.tune.search import SearchAlgorithm, Searcher

from cl_core.data import storage
from cl_core.data.reader import ShardStream
from cl_core.data.shards import read_manifest
from cl_core.engine import TrainingLoop
from cl_core.methods import Method, build_method
from pipelines import plots, ray_env, tracking
from pipelines.config import PretrainConfig, SweepConfig, SweepStageConfig, apply_sweep
from pipelines.console import console
from pipelines.graph import StageContext
from pipelines.halving import SyncHalving
from pipelines.stages._data import checked_split
from pipelines.stages._pretraining import (
    device_views,
    knn_monitor,
    make_worker_config,
    train_worker,
    view_stream,
)
from pipelines.stages._train import STATE_FILE, Trainer, loop_config

METRIC = "val/knn_top1"
DRIVER_CPUS = 0.01  # what a multi-worker trial's driver reserves; its Train workers get the rest


def _trial_pretrain(config: dict[str, Any], base: dict[str, Any]) -> PretrainConfig:
    """The pretrain section of one trial: the swept values over the configured ones."""
    p = apply_sweep(PretrainConfig.model_validate(base["pretrain"]), {k: config[k] for k in base["names"]})
    # trials checkpoint at epoch ends only: Tune (and the halving) see one report per epoch
    return p.model_copy(update={"epochs": base["epochs"], "checkpoint_every_steps": 0, "checkpoint_every_minutes": 0.0})


def trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    """One single-worker Tune trial, trained in this process: ``config`` holds the swept
    values, ``base`` the rest."""
    for name in ("ray.tune", "ray.train"):  # one "checkpoint created" line per epoch and trial is noise
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(max(1, int(base["cpus"])))
    p = _trial_pretrain(config, base).model_copy(update={"loader_workers": 0})
    device = torch.device("cuda" if base["gpu"] else "cpu")
    torch.manual_seed(base["seed"])
    train, val = base["checks"]["train"], base["checks"]["val"]
    model = {"method": p.method, "kwargs": p.model_kwargs(num_samples=sum(train.counts))}
    cfg = loop_config(p)
    method = cast(Method, cfg.settings_for(device).prepare(build_method(model, gather_distributed=False).to(device)))
    stream = ShardStream(
        train.urls,
        train.counts,
        rank=0,
        world_size=1,
        loader_workers=0,
        verify=train.verify,
        batch_size=p.batch_size_per_worker,
        shuffle_buffer=p.shuffle_buffer,
        seed=base["seed"],
        **view_stream(p.method, p.views, device, train.urls),
    )
    loop = TrainingLoop(method, method, stream, cfg, device, view_augment=device_views(p.views))
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            loop.load_state_dict(torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True))
    monitor = knn_monitor(p, train.urls, val.urls, device, train.verify, val.verify)

    def evaluate(encoder: torch.nn.Module) -> dict[str, float]:
        return {METRIC: monitor(encoder)}

    def report(metrics: dict[str, float], state: dict | None) -> None:
        keep = {k: v for k, v in metrics.items() if k.startswith(("train/", "val/")) or k in ("epoch", "step")}
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / STATE_FILE)
            tune.report(keep, checkpoint=tune.Checkpoint.from_directory(d))

    loop.run(report, evaluate)


def trial_group(config: dict[str, Any], base: dict[str, Any]) -> None:
    """One multi-worker Tune trial: a driver that runs the pretrain stage's ``train_worker``
    on ``workers_per_trial`` Ray Train workers and forwards rank 0's reports to Tune.

    The Train run is named after the trial and kept under the experiment, so a restored
    trial continues from its last Train checkpoint (epoch, optimizer, method state)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    for name in ("ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    p = _trial_pretrain(config, base)
    per_worker = math.floor((base["cpus"] - DRIVER_CPUS) / base["workers"] * 1e4) / 1e4
    p = p.model_copy(update={"num_workers": base["workers"], "cpus_per_worker": per_worker})
    model = {"method": p.method, "kwargs": p.model_kwargs(num_samples=sum(base["checks"]["train"].counts))}
    worker_config = make_worker_config(
        p,
        model,
        base["shard_dir"],
        base["manifest"],
        seed=base["seed"],
        checks=base["checks"],
        tracking_uri=None,
        run_id=None,
    )
    trainer = Trainer(
        train_worker,  # type: ignore[arg-type]  # Train V2 returns its value (the stubs are V1's)
        train_loop_config=worker_config,
        scaling_config=ScalingConfig(
            num_workers=base["workers"], use_gpu=base["gpu"], resources_per_worker={"CPU": per_worker}
        ),
        run_config=RunConfig(
            name=tune.get_context().get_trial_name(),
            storage_path=base["train_storage"],
            storage_filesystem=base["storage_fs"],
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]  # a Train V2 callback (V1 stubs)
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=p.max_failures),
            logging_config=LoggingConfig(log_level=base["train_log_level"]),
        ),  # type: ignore[call-arg]  # V2's
    )
    result = trainer.fit()
    if result.error:
        raise result.error


def _domain(spec: dict[str, Any]) -> Any:
    kind, values = next(iter(spec.items()))
    return (
        {"grid": tune.grid_search, "choice": tune.choice}[kind](values)
        if kind in ("grid", "choice")
        else {"uniform": tune.uniform, "loguniform": tune.loguniform}[kind](*values)
    )


class _Progress(tune.Callback):
    """One console line per trial epoch and per finished trial, with the sweep's progress in
    epochs and an estimate of the time left (at most: the halving may stop trials early)."""

    def __init__(self, names: list[str], epochs: int, total_trials: int) -> None:
        self.names, self.epochs, self.planned = names, epochs, max(1, total_trials) * epochs
        self.done = self.finished = 0
        self.t0 = time.perf_counter()

    def _values(self, trial) -> str:
        return ", ".join(f"{n}={_fmt(trial.config.get(n))}" for n in self.names)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if METRIC not in result:
            return
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        left = elapsed / self.done * max(0, self.planned - self.done)
        console.print(
            f"sweep: {self._values(trial)}: epoch {int(result.get('epoch', 0))}/{self.epochs} val kNN top-1 "
            f"{result[METRIC]:.4f} [{self.done}/{self.planned} trial epochs, {elapsed:.0f} s, "
            f"at most ~{left:.0f} s left]"
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        ran = int((trial.last_result or {}).get("epoch", 0))
        if ran < self.epochs:  # the halving's stop: its remaining epochs are not run
            self.planned -= self.epochs - ran
        self.finished += 1  # (Tune sets the trial's status after its callbacks)
        finished = self.finished
        console.print(
            f"sweep: {self._values(trial)}: {'stopped by the halving after' if ran < self.epochs else 'done,'} "
            f"{ran} epoch(s) [{finished}/{len(trials)} trials finished]"
        )


def _trial_name(names: list[str]):
    def name(t) -> str:  # deterministic: the trial's index in the experiment and its values
        idx = t.trial_id.rsplit("_", 1)[-1]
        vals = ",".join(f"{n}={_fmt(t.config.get(n))}" for n in names)
        return f"trial_{idx}_{vals}"

    return name


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _use_gpu(pre: PretrainConfig, workers: int) -> bool:
    """Trials train on GPUs (one per worker) when pretrain does: ``use_gpu`` true, or
    "auto" and the cluster has a GPU for each of a trial's workers."""
    return ray_env.cluster_gpus() >= workers if pre.use_gpu == "auto" else bool(pre.use_gpu)


def _concurrency(sw: SweepConfig, gpu: bool) -> int | None:
    """How many trials run at once: ``max_concurrent_trials`` if it fits, else as many
    as the cluster's CPUs (and GPUs, one per trial worker) hold, counting what its
    autoscaler may start. On a joined cluster that holds no trial yet (nodes still to
    start or join) the trials queue in Tune (None: no limit but the resources) instead
    of failing; their pending demand is what an autoscaler scales up for."""
    cpus = ray_env.cluster_cpus()
    fits = int(cpus // sw.cpus_per_trial)
    gpu_fits = int(ray_env.cluster_gpus() // sw.workers_per_trial) if gpu else fits
    if min(fits, gpu_fits) < 1 and ray_env.joined():
        console.print(
            f"sweep: the cluster holds no trial yet ({cpus:g} CPUs"
            f"{f', {ray_env.cluster_gpus():g} GPUs' if gpu else ''} "
            "now); the trials wait in Tune's queue for nodes to start or join"
        )
        return sw.max_concurrent_trials
    if fits < 1:
        raise ValueError(f"sweep.cpus_per_trial ({sw.cpus_per_trial}) exceeds the cluster's {cpus:g} CPUs")
    what = f"x cpus_per_trial ({sw.cpus_per_trial}) needs more than the cluster's {cpus:g} CPUs"
    if gpu:
        gpus = ray_env.cluster_gpus()
        if gpus // sw.workers_per_trial < fits:
            fits = int(gpus // sw.workers_per_trial)
            what = f"x workers_per_trial ({sw.workers_per_trial}) GPUs needs more than the cluster's {gpus:g} GPUs"
        if fits < 1:
            raise ValueError(
                f"sweep.workers_per_trial ({sw.workers_per_trial}): a trial needs a GPU per worker and "
                f"the cluster has {gpus:g}; lower it or set pretrain.use_gpu: false"
            )
    if sw.max_concurrent_trials is not None:
        if sw.max_concurrent_trials > fits:
            raise ValueError(f"sweep.max_concurrent_trials ({sw.max_concurrent_trials}) {what}; lower it to {fits}")
        return sw.max_concurrent_trials
    return fits


def sweep(ctx: StageContext, cfg: SweepStageConfig, inputs: dict) -> dict:
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    sw, pre = cfg.sweep, cfg.pretrain
    shard_set = inputs["shard"]
    manifest = read_manifest(shard_set["shard_dir"])
    if not manifest["labeled"]:
        raise ValueError(
            "sweep: the objective is val kNN top-1, which needs labels; the source has none (set sweep.enabled: false)"
        )
    train, val = (checked_split(shard_set["shard_dir"], manifest, s) for s in ("train", "val"))
    if not val.urls:
        raise ValueError("sweep: the val split is empty; set data.val_fraction > 0")
    space = sw.space or {}  # the config resolves an unset space to the method's own
    names = sorted(space)
    workers = sw.workers_per_trial
    gpu = _use_gpu(pre, workers)
    concurrent = _concurrency(sw, gpu)
    if ctx.rerun:  # --rerun: a fresh experiment, not a resume of this key's last one
        ray_env.forget_run(ctx.env, ctx.ray_run_name)
    storage_path, storage_fs = ray_env.storage(ctx.env)  # local, or S3 through pyarrow
    exp_path = f"{storage_path}/{ctx.ray_run_name}"
    exp_dir = ray_env.storage_uri(exp_path, storage_fs)
    base = {
        "pretrain": pre.model_dump(mode="json"),
        "names": names,
        "epochs": sw.epochs,
        "cpus": sw.cpus_per_trial,
        "seed": ctx.seed,
        "checks": {"train": train, "val": val},
        "gpu": gpu,
        "workers": workers,
        "shard_dir": shard_set["shard_dir"],
        "manifest": manifest,
        "train_storage": f"{exp_path}/train",
        "storage_fs": storage_fs,
        "train_log_level": ctx.env.ray.train_log_level,
    }
    if workers == 1:
        trainable = tune.with_resources(
            tune.with_parameters(trial, base=base), {"cpu": sw.cpus_per_trial, "gpu": 1 if gpu else 0}
        )
    else:  # the driver reserves DRIVER_CPUS; its TorchTrainer's placement group holds the workers
        trainable = tune.with_resources(tune.with_parameters(trial_group, base=base), {"cpu": DRIVER_CPUS})
    seed = sw.seed if sw.seed is not None else ctx.seed
    if sw.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg: Searcher | SearchAlgorithm = OptunaSearch(seed=seed)
    else:  # seeded: random domains (choice, uniform) draw the same values on every run
        from ray.tune.search import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=seed)
    # rungs in epochs (the loop's own count, which survives a restore) rather than Tune's report count;
    # each rung decided once all of its trials reported (pipelines/halving.py), so a rerun stops the same
    # trials; the scheduler (not Tune's searcher, which would count paused trials as running) limits concurrency
    total = sw.num_samples * math.prod(len(v["grid"]) for v in space.values() if "grid" in v)
    scheduler = SyncHalving(
        time_attr="epoch",
        max_t=sw.epochs,
        grace_period=min(sw.grace_period, sw.epochs),
        reduction_factor=sw.reduction_factor,
        total_trials=total,
        max_running=concurrent,
    )
    ray_env.keep_credentials_out_of_tune()
    # Tune's console tables and TensorBoard files are not wanted: the pipeline logs to MLflow
    _set_output = "RAY_AIR_NEW_OUTPUT" not in os.environ
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    saved = _saved_state(exp_dir)
    if saved:
        console.print(
            f"sweep: the interrupted sweep in {exp_dir} cannot be resumed: its saved state {saved} is cut off "
            "(the run was killed while Tune wrote it); starting the sweep afresh"
        )
        ray_env.forget_run(ctx.env, ctx.ray_run_name)
        saved = None
    if saved is not None and tune.Tuner.can_restore(exp_path, storage_filesystem=storage_fs):
        console.print(f"sweep: resuming the interrupted sweep in {exp_dir}")
        mlflow.set_tag(tracking.TAG_RESUMED, exp_dir)
        tuner = tune.Tuner.restore(
            exp_path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=storage_fs
        )
    else:
        console.print(
            f"sweep: {pre.method}, {' x '.join(f'{n} {_space_text(space[n])}' for n in names)}, "
            f"{sw.num_samples} sample(s), {sw.epochs} epochs per trial, {workers} worker(s) per trial"
            f"{' with GPUs' if gpu else ''}, {sw.search} search, successive halving, "
            f"{concurrent or 'as many as the nodes hold'} at a time"
        )
        tuner = tune.Tuner(
            trainable,
            param_space={n: _domain(space[n]) for n in names},
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="max",
                scheduler=scheduler,
                search_alg=search_alg,
                num_samples=sw.num_samples,
                trial_name_creator=_trial_name(names),
                trial_dirname_creator=_trial_name(names),
            ),
            run_config=tune.RunConfig(
                name=ctx.ray_run_name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                verbose=0,
                callbacks=[CSVLoggerCallback(), JsonLoggerCallback(), _Progress(names, sw.epochs, total)],
                failure_config=tune.FailureConfig(max_failures=pre.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            ),
        )
    grid = tuner.fit()
    results = [grid[i] for i in range(len(grid))]
    if _set_output:
        os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
    errors = [r for r in results if r.error is not None]
    if errors:
        raise RuntimeError(
            f"sweep: {len(errors)} trial(s) failed; first: {str(errors[0].error).splitlines()[0]} "
            f"(logs under {exp_dir})"
        )
    rows: list[dict[str, Any]] = []
    for r in results:
        df = r.metrics_dataframe
        if df is not None and "epoch" in df:  # one row per epoch: a resumed trial may repeat one
            df = df.dropna(subset=["epoch"]).drop_duplicates("epoch", keep="last").sort_values("epoch")
        curve = [float(x) for x in df[METRIC]] if df is not None and METRIC in df else []
        epochs_run = int(df["epoch"].iloc[-1]) if df is not None and "epoch" in df and len(df) else len(curve)
        config = r.config or {}
        rows.append(
            {
                "trial": Path(r.path).name,
                **{n: config[n] for n in names},
                "best": max(curve) if curve else math.nan,
                "last": curve[-1] if curve else math.nan,
                "epochs_run": epochs_run,
                "stopped_early": epochs_run < sw.epochs,
                "curve": curve,
                "loss": [float(x) for x in df["train/loss"]] if df is not None and "train/loss" in df else [],
            }
        )
    # trials that ran every epoch first (a stopped trial's last value is from an early rung), then by value
    rows.sort(
        key=lambda row: (row["stopped_early"], -(row["last"] if not math.isnan(row["last"]) else -1), row["trial"])
    )
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    _log(ctx, rows, names, sw)
    best = {n: rows[0][n] for n in names}
    console.print(
        f"sweep: best {', '.join(f'{n}={_fmt(v)}' for n, v in best.items())} "
        f"(val kNN top-1 {rows[0]['last']:.4f}); {sum(r['stopped_early'] for r in rows)} of {len(rows)} "
        "trial(s) stopped early by successive halving"
    )
    return {
        "best": best,
        "best_metric": rows[0]["last"],
        "metric": METRIC,
        "trials": len(rows),
        "ranked": [{k: v for k, v in r.items() if k not in ("curve", "loss")} for r in rows],
        "experiment_dir": exp_dir,
    }


def _saved_state(exp_dir: str) -> str | None:
    """Where the experiment's saved state stands: None when it never saved one (a run killed
    before that starts afresh), "" when every state file reads, else the name of one that
    does not (Tune writes the file in place, so a kill during the write leaves it cut off and
    Tune could not restore from it)."""
    files = (
        [f for f in storage.list_files(exp_dir) if Path(f).name.startswith("experiment_state-")]
        if storage.is_s3(exp_dir)
        else sorted(str(p) for p in Path(exp_dir).glob("experiment_state-*.json"))
    )
    if not files:
        return None
    for f in files:
        try:
            json.loads(storage.read_bytes(f))
        except (OSError, ValueError):  # cut off, empty or gone
            return Path(f).name
    return ""


def _space_text(spec: dict[str, Any]) -> str:
    kind, values = next(iter(spec.items()))
    return f"{kind} {values}"


def _log(ctx: StageContext, rows: list[dict], names: list[str], sw: SweepConfig) -> None:
    """Nested MLflow runs per trial, the ranked CSV and the plots on the sweep run."""
    client = mlflow.tracking.MlflowClient(ctx.tracking_uri)
    exp_id = mlflow.get_run(ctx.run_id).info.experiment_id
    for r in rows:
        run = client.create_run(
            exp_id,
            run_name=r["trial"],
            tags={
                "mlflow.parentRunId": ctx.run_id,
                tracking.TAG_KIND: "trial",
                "clpipe.trial.rank": str(r["rank"]),
                "clpipe.trial.stopped_early": str(r["stopped_early"]).lower(),
            },
        )
        tracking.log_params(run.info.run_id, {n: r[n] for n in names})
        for epoch, (v, loss) in enumerate(zip(r["curve"], r["loss"] or [math.nan] * len(r["curve"]), strict=True), 1):
            metrics = {METRIC: v} if math.isnan(loss) else {METRIC: v, "train/loss": loss}
            tracking.log_metrics(run.info.run_id, metrics, step=epoch, client=client)
        client.log_metric(run.info.run_id, "epochs_run", r["epochs_run"])
        client.set_terminated(run.info.run_id)
    out = ctx.output_dir
    out.mkdir(parents=True, exist_ok=True)
    header = ["rank", "trial", *names, "last", "best", "epochs_run", "stopped_early"]
    lines = [",".join(header)] + [",".join(str(r[h]) for h in header) for r in rows]
    (out / "trials.csv").write_text("\n".join(lines) + "\n")
    (out / "trials.json").write_text(json.dumps(rows, indent=2))
    mlflow.log_artifact(str(out / "trials.csv"))
    mlflow.log_artifact(str(out / "trials.json"))
    for path in plots.sweep_plots(rows, names, METRIC, sw.epochs, out):
        mlflow.log_artifact(str(path))
    mlflow.log_metrics(
        {
            "sweep/best": rows[0]["last"],
            "sweep/trials": len(rows),
            "sweep/stopped_early": sum(r["stopped_early"] for r in rows),
        }
    )
