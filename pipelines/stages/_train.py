"""What the Ray Train stages (pretrain, finetune, distill) share: the ``TorchTrainer``
driver, the per-worker set-up and a runner for several models trained in turn.

One ``TorchTrainer.fit`` per stage: a stage that trains several models (a teacher and a
baseline per label fraction) runs them one after another in the same worker group, so
Ray's worker start-up is paid once. The checkpoint holds the running model's loop state
and every finished model's selected weights; a restarted worker (or a rerun stage)
continues with the model it was on.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import mlflow
import torch
from ray import train
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    Result,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
)
from ray.train.torch import TorchTrainer

from cl_core import distributed
from cl_core.augment import EvalTransform, FinetuneTransform
from cl_core.data import storage
from cl_core.data.reader import EvalSplit, ShardStream, load_split, training_loader
from cl_core.data.shards import sha256_file
from cl_core.downstream import Classifier
from cl_core.engine import LoopConfig, TrainingLoop
from cl_core.evaluate import recalibrate_batch_norm
from cl_core.methods.base import Method
from pipelines import ray_env, tracking
from pipelines.config import ClassifierTrainingConfig, CropFlipConfig, TrainingConfig
from pipelines.console import Eta, console
from pipelines.graph import StageContext


@dataclass(frozen=True)
class ClassifierJob:
    """What every worker of a fine-tuning or distillation run gets (as
    ``train_loop_config["job"]``): the models to train one after another and where they read."""

    section: dict  # the stage's config section as JSON (validated again on the worker)
    jobs: list[dict]  # one record per model: name, kind, spec, subset, ...
    encoder: dict  # the pretrain stage's Encoder record
    seed: int
    threads: int
    val_urls: list[str]
    val_verify: dict[str, dict[str, Any]]
    image_size: int
    tracking_uri: str
    run_id: str
    train_urls: list[str] = field(default_factory=list)  # distillation's unlabeled images
    train_counts: list[int] = field(default_factory=list)
    train_verify: dict[str, dict[str, Any]] = field(default_factory=dict)


STATE_FILE = "state.pt"  # a checkpoint's training state (model, optimizer, loop, RNG), in every stage
MODELS_DIR = "models"
CHECKPOINT_INFO = "checkpoint.json"  # written last: sha256 of every file and the loop position
MAX_CHECKPOINTS_PER_MODEL = 10  # short epochs (a few labeled batches) checkpoint every few epochs


DATASETS_CALLBACK: type | None
try:
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback as DATASETS_CALLBACK
except ImportError:  # Train V1 or a moved module: nothing to leave out
    DATASETS_CALLBACK = None


class Trainer(TorchTrainer):
    """Ray's ``TorchTrainer``, less Ray Data's ``DatasetManager`` when no ``datasets`` are given.

    Ray Train 2.60 starts a ``DatasetManager`` actor for every run (and every restart of
    its worker group), datasets or not: one more process on the driver's node that imports
    Ray Data. The pipeline reads its WebDataset shards itself, so the actor has nothing to
    do; without it a run starts one process fewer (``bench/trainer_overhead.py`` measures
    the CPU and wall time saved). With ``datasets`` the callbacks are Ray's own.
    """

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()  # type: ignore[misc]  # Train V2's (the stubs are V1's)
        if self.datasets or DATASETS_CALLBACK is None:
            return callbacks
        return [c for c in callbacks if not isinstance(c, DATASETS_CALLBACK)]


def checkpoint_uri(result: Result) -> str:
    """The final checkpoint of ``result`` as a local path or an ``s3://`` URI."""
    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError(f"{result.path}: the training run ended without a checkpoint")
    return ray_env.storage_uri(ckpt.path, ckpt.filesystem if _is_s3_fs(ckpt.filesystem) else None)


def _is_s3_fs(filesystem: Any) -> bool:
    return filesystem is not None and getattr(filesystem, "type_name", "") == "s3"


def use_gpu(section: TrainingConfig) -> bool:
    return ray_env.cluster_gpus() >= section.num_workers if section.use_gpu == "auto" else bool(section.use_gpu)


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete or does not match its recorded checksums."""


class TrainingFailed(RuntimeError):
    """A Ray Train run that failed; the message names the stage and where to resume."""


def write_checkpoint_dir(root: Path, write: Callable[[Path], None], position: str) -> None:
    """``write(root)`` fills ``root``; then :data:`CHECKPOINT_INFO` records the sha256 of
    every file and the loop ``position``."""
    write(root)
    files = {f.relative_to(root).as_posix(): sha256_file(f) for f in sorted(root.rglob("*")) if f.is_file()}
    (root / CHECKPOINT_INFO).write_text(json.dumps({"position": position, "files": files}, indent=2))


def report_checkpoint(metrics: dict[str, float], write: Callable[[Path], None], position: str) -> None:
    """``train.report`` with a checkpoint made by :func:`write_checkpoint_dir`.

    Ray Train persists the directory and only then registers it as the run's latest
    checkpoint, so a worker dying mid-upload leaves the previous one in force; the
    checksums catch a checkpoint damaged in storage later (:func:`verify_checkpoint`)."""
    with tempfile.TemporaryDirectory() as d:
        write_checkpoint_dir(Path(d), write, position)
        train.report(metrics, checkpoint=train.Checkpoint.from_directory(d))


def verify_checkpoint(directory: str | Path, where: str) -> dict:
    """Check a checkpoint directory against its :data:`CHECKPOINT_INFO`; returns the info.
    ``where`` names the checkpoint (its storage path) in the error."""
    root = Path(directory)
    fix = "rerun the stage from scratch with clpipe run --rerun STAGE"
    info_file = root / CHECKPOINT_INFO
    if not info_file.exists():
        raise CheckpointError(f"{where}: checkpoint has no {CHECKPOINT_INFO}, so it may be incomplete; {fix}")
    info = json.loads(info_file.read_text())
    for name, digest in info["files"].items():
        f = root / name
        if not f.exists():
            raise CheckpointError(f"{where}: checkpoint file {name} is missing (incomplete checkpoint); {fix}")
        if sha256_file(f) != digest:
            raise CheckpointError(
                f"{where}: checkpoint file {name} does not match its recorded sha256 (damaged in storage); {fix}"
            )
    return info


def _latest_checkpoint(storage_path: str, storage_fs: Any, run_name: str) -> tuple[str, str] | None:
    """(URI, loop position) of the latest checkpoint a Ray Train run registered, if any."""
    try:
        path = f"{storage_path.rstrip('/')}/{run_name}"
        result = Result.from_path(path, storage_filesystem=storage_fs)
        if result.checkpoint is None:
            return None
        uri = checkpoint_uri(result)
    except Exception:  # noqa: BLE001 - no snapshot: nothing was checkpointed
        return None
    try:
        return uri, str(json.loads(storage.read_bytes(storage.join(uri, CHECKPOINT_INFO)))["position"])
    except Exception:  # noqa: BLE001 - only for the message
        return uri, "position unknown"


def _failure_message(
    ctx: StageContext, section: TrainingConfig, err: BaseException, latest: tuple[str, str] | None
) -> str:
    def first_line(e: BaseException) -> str:
        line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        line = f"{type(e).__name__}: {line}" if line else type(e).__name__
        return line if len(line) <= 200 else line[:200] + " ..."

    text = str(err)
    failures = getattr(err, "worker_failures", None)  # Ray Train's WorkerGroupError: {rank: exception}
    cause = (
        "; ".join(f"rank {r}: {first_line(e)}" for r, e in sorted(failures.items())) if failures else first_line(err)
    )
    died = any(w in text for w in ("ActorDiedError", "ActorUnavailableError", "died", "SIGKILL", "unexpectedly"))
    if latest is None:
        where = "no checkpoint was written yet; rerunning the same command starts the stage over"
    else:
        where = f"the last checkpoint is {latest[0]} ({latest[1]}); rerunning the same command resumes from it"
    restarts = (
        f" after {section.max_failures} restart(s)"
        if section.max_failures > 0
        else f"; set {ctx.name}.max_failures >= 1 to restart automatically"
        if died
        else ""
    )
    what = "a training worker died" if died else "training failed"
    return f"{ctx.name}: {what} ({cause}){restarts}; {where}"


def fit(ctx: StageContext, worker: Callable[[dict], Any], worker_config: dict, section: TrainingConfig) -> Result:
    """Run ``worker`` on ``section.num_workers`` Ray Train workers; a failure raises
    :class:`TrainingFailed` naming the stage and the checkpoint to resume from."""
    if ctx.rerun:  # --rerun: a fresh Ray run, not a resume of this key's last one
        ray_env.forget_run(ctx.env, ctx.ray_run_name)
    storage_path, storage_fs = ray_env.storage(ctx.env)
    resumed = _latest_checkpoint(storage_path, storage_fs, ctx.ray_run_name)
    if resumed is not None:  # an interrupted run of this cache key: Ray Train continues it
        mlflow.set_tag(tracking.TAG_RESUMED, resumed[0])  # on the stage run, active here
        console.print(f"{ctx.name}: continuing an interrupted run from its checkpoint {resumed[0]} ({resumed[1]})")
    trainer = Trainer(
        worker,
        train_loop_config=worker_config,
        scaling_config=ScalingConfig(
            num_workers=section.num_workers,
            use_gpu=use_gpu(section),
            resources_per_worker={"CPU": section.cpus_per_worker},
        ),
        run_config=RunConfig(
            # deterministic per cache key: a rerun of an interrupted stage resumes from its checkpoint
            name=ctx.ray_run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=section.max_failures),
            logging_config=LoggingConfig(log_level=ctx.env.ray.train_log_level),
        ),  # type: ignore[call-arg]  # RunConfig of Train V2 (the stubs are V1's)
    )
    try:
        return trainer.fit()
    except TrainingFailedError as e:  # raised by fit() once the run has failed (after max_failures restarts)
        latest = _latest_checkpoint(storage_path, storage_fs, ctx.ray_run_name)
        raise TrainingFailed(_failure_message(ctx, section, e, latest)) from e


def loop_config(section: TrainingConfig, batch_size: int | None = None) -> LoopConfig:
    """The training loop's settings: every :class:`LoopConfig` field is the stage section's
    field of that name (tests/pipelines/test_config.py holds the two to the same names and defaults)."""
    values = {f.name: getattr(section, f.name) for f in dataclasses.fields(LoopConfig)}
    values["channels_last"] = None if section.channels_last == "auto" else bool(section.channels_last)
    if batch_size:
        values["batch_size_per_worker"] = batch_size
    return LoopConfig(**values)


@dataclass
class Worker:
    """This process's place in the Ray Train worker group."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def setup(cls, threads: int) -> Worker:
        ray_env.quiet_train_worker()  # one progress line per epoch is enough
        ctx = train.get_context()
        torch.set_num_threads(threads)
        return cls(ctx.get_world_rank(), ctx.get_world_size(), train.torch.get_device())


def record_placement(world: int, log: tracking.WorkerLog | None) -> None:
    """Where the workers of this Ray Train group run, gathered from every rank (a
    collective: call it on all of them) and, with ``log`` (rank 0 of a tracked run), kept
    as the run's tags ``clpipe.train.nodes`` ({Ray node id: workers}) and
    ``clpipe.train.node_ips`` ({node IP: workers}). On gloo, it also turns on
    :func:`cl_core.distributed.use_shared_memory` where every worker shares this host's
    ``/dev/shm`` (tag ``clpipe.train.small_collectives``)."""
    import ray

    mine = (ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address())
    every = [mine]
    shm = False
    if world > 1:
        every = [("", "")] * world
        torch.distributed.all_gather_object(every, mine)
        # the small per-step collectives through /dev/shm when every worker is on one host
        shm = distributed.use_shared_memory() if torch.distributed.get_backend() == "gloo" else False
    if log is not None:
        log.tags(
            {
                "clpipe.train.nodes": json.dumps(dict(Counter(n for n, _ in every)), sort_keys=True),
                "clpipe.train.node_ips": json.dumps(dict(Counter(ip for _, ip in every)), sort_keys=True),
                "clpipe.train.small_collectives": "shared_memory"
                if shm
                else ("process_group" if world > 1 else "none"),
            }
        )


def crop_flip(views: CropFlipConfig, image_size: int, n_views: int = 1) -> FinetuneTransform:
    return FinetuneTransform(
        image_size, crop_min_scale=views.crop_min_scale, hflip_prob=views.hflip_prob, n_views=n_views
    )


def batch_for(counts: list[int], wanted: int, world: int) -> int:
    """A per-worker batch no larger than each worker's share of a small labeled subset
    (1% of the labels may be a dozen images), so an epoch is not mostly repeats."""
    return max(1, min(wanted, sum(counts) // world))


def val_due(epoch: int, epochs: int, checks: int | None) -> bool:
    """Whether the val check runs after ``epoch`` (1-based) of ``epochs``: every epoch, or
    at most ``checks`` of them evenly spaced, the last one always (1% of the labels may
    be a few steps per epoch, and a check then costs more than the epoch's training)."""
    if checks is None or checks >= epochs:
        return True
    return epoch * checks // epochs > (epoch - 1) * checks // epochs


def cycle(stream: ShardStream, skip: int = 0):
    """Endless labeled batches from ``stream`` (in-process loader), epoch after epoch,
    after passing over the first ``skip`` (a resumed loop draws one batch per step, so
    it continues where the interrupted one stopped)."""
    epoch = 0
    while True:
        stream.set_epoch(epoch)
        steps = stream.plan().steps
        if skip >= steps:
            skip -= steps
        else:
            stream.set_epoch(epoch, skip_batches=skip)
            skip = 0
            yield from training_loader(stream, num_workers=0)
        epoch += 1


class SequentialJobs:
    """Trains named models one after another in one Ray Train worker group, selecting
    each model's epoch with the best val top-1.

    ``build(job, start_step)`` returns ``(objective, classifier, stream, aux)``; the
    objective is a :class:`~cl_core.methods.base.Method` with ``uses_labels``,
    ``classifier`` maps images to logits (the model that is kept); ``start_step`` is the
    step a resumed job continues from (where an ``aux`` stream resumes).
    """

    def __init__(self, job: ClassifierJob, worker: Worker, log_prefix: str) -> None:
        self.job, self.w, self.prefix = job, worker, log_prefix
        self.log: tracking.WorkerLog | None = None
        self.val: EvalSplit | None = None
        if worker.rank == 0:
            self.log = tracking.WorkerLog(job.tracking_uri, job.run_id, prefix=log_prefix)
        record_placement(worker.world, self.log)
        if worker.rank == 0:
            # streamed from its shards at each check, kept in memory only while it fits a fixed budget
            self.val = EvalSplit(job.val_urls, EvalTransform(job.image_size), verify=job.val_verify)
        self.finished: dict[str, dict] = {}
        self.resume: dict | None = None
        ckpt = train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                verify_checkpoint(d, ckpt.path)
                self.resume = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
                for name in self.resume["finished"]:
                    self.finished[name] = torch.load(
                        Path(d) / MODELS_DIR / f"{name}.pt", map_location="cpu", weights_only=True
                    )

    def run(
        self,
        jobs: list[dict],
        build: Callable[[dict, int], tuple[Method, torch.nn.Module, ShardStream, Any]],
        section: ClassifierTrainingConfig,
    ) -> list[dict]:
        history: list[dict] = []
        start = self.resume["job"] if self.resume else 0
        for i, job in enumerate(jobs):
            if i < start:
                continue
            history += self._one(i, job, jobs, build, section)
        if self.log is not None:
            self.log.close()  # what an MLflow outage held back
        return history

    def _one(self, i: int, job: dict, jobs: list[dict], build, section: ClassifierTrainingConfig) -> list[dict]:
        name = job["name"]
        resuming = bool(self.resume and self.resume["job"] == i and self.resume["loop"] is not None)
        start = int(self.resume["loop"]["step"]) if resuming and self.resume is not None else 0
        objective, classifier, stream, aux = build(job, start)
        cfg = loop_config(section, stream.batch_size)
        objective = cast(Method, cfg.settings_for(self.w.device).prepare(objective.to(self.w.device)))
        model = train.torch.prepare_model(objective)
        distributed.share_gradient_reduction(model)  # DDP's gradient buckets through /dev/shm too, where it is on
        # a budget in steps as well as epochs: 1% of the labels may be one batch per epoch
        steps = stream.plan().steps
        epochs = max(section.epochs, -(-getattr(section, "min_steps", 0) // max(1, steps)))
        loop = TrainingLoop(model, objective, stream, dataclasses.replace(cfg, epochs=epochs), self.w.device, aux=aux)
        ckpt_every = max(1, epochs // MAX_CHECKPOINTS_PER_MODEL)
        where = loop.position  # for the checkpoints' records (``loop`` is deleted at the end)
        best: dict[str, Any] = {"val_top1": -1.0, "epoch": 0, "state_dict": None}
        if resuming:
            assert self.resume is not None
            loop.load_state_dict(self.resume["loop"])
            best = self.resume["best"]
            if self.w.rank == 0:
                print(f"[{self.prefix}] {name}: resumed from checkpoint at {loop.position()}", flush=True)
        elif self.w.rank == 0:
            print(f"[{self.prefix}] {name} (model {i + 1} of {len(jobs)}): {loop.describe()}", flush=True)

        calibration = None
        n_cal = section.bn_recalibration_images
        if self.w.rank == 0 and n_cal:  # uncropped training images for precise BN statistics
            calibration, _ = load_split(
                stream.urls, EvalTransform(self.job.image_size), verify=stream.verify, limit=n_cal
            )

        checks = section.val_checks
        training = loop  # the epoch just finished, for the val checks (``loop`` itself is deleted at the end)

        def evaluate(_encoder, initial: bool = False) -> dict[str, float]:
            assert self.val is not None
            if not initial and not val_due(training.epoch, epochs, checks):
                return {}
            if calibration is not None:  # rank 0's statistics reach the other ranks with DDP's buffer broadcast
                recalibrate_batch_norm(classifier, calibration)
            was = classifier.training
            classifier.eval()
            correct = total = 0
            with torch.no_grad():
                for x, y in self.val.batches():
                    correct += int((classifier(x.to(self.w.device)).float().cpu().argmax(1) == y).sum())
                    total += len(y)
            classifier.train(was)
            # float32, as top1's mean: the same values as over one tensor of the whole split
            return {"val/top1": (torch.tensor(float(correct)) / total).item() if total else 0.0}

        if self.w.rank == 0 and not resuming:  # epoch 0, the starting point, is a candidate too
            initial = evaluate(None, initial=True)
            best.update(
                val_top1=initial["val/top1"],
                epoch=0,
                state_dict={k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()},
            )
            assert self.log is not None
            self.log.metrics({f"{name}/val/top1": initial["val/top1"]}, step=0)

        eta = Eta(epochs, loop.epoch)

        def report(metrics: dict[str, float], state: dict | None) -> None:
            # every epoch: MLflow metrics and best-epoch selection on rank 0; Ray Train
            # (a round trip through its controller) only on checkpoint epochs, on every rank alike
            epoch = int(metrics["epoch"])
            at_checkpoint = epoch % ckpt_every == 0 or epoch == epochs
            if self.w.rank != 0:
                if at_checkpoint:
                    train.report({}, checkpoint=None)
                return
            if "val/top1" in metrics and metrics["val/top1"] > best["val_top1"]:
                best.update(
                    val_top1=metrics["val/top1"],
                    epoch=epoch,
                    state_dict={k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()},
                )
            metrics = {**metrics, "val/best_top1": best["val_top1"]}
            assert self.log is not None
            self.log.metrics({f"{name}/{k}": v for k, v in metrics.items()}, step=epoch)
            if at_checkpoint:
                print(
                    "[{}] {} epoch {}/{}  loss {:.4f}  val top-1 {} (best {:.3f} at epoch {})  {}".format(
                        self.prefix,
                        name,
                        epoch,
                        epochs,
                        metrics["train/loss"],
                        f"{metrics['val/top1']:.3f}" if "val/top1" in metrics else "not checked",
                        best["val_top1"],
                        best["epoch"],
                        eta(epoch),
                    ),
                    flush=True,
                )
                self._checkpoint({"job": i, "loop": state, "best": best}, metrics, f"{name}: {where()}")

        def checkpoint(position: dict[str, float], state: dict) -> None:  # inside an epoch
            if self.w.rank != 0:
                train.report({}, checkpoint=None)
                return
            self._checkpoint({"job": i, "loop": state, "best": best}, position, f"{name}: {where()}")

        history = loop.run(report, evaluate if self.w.rank == 0 else None, checkpoint=checkpoint)
        if self.w.rank == 0:
            self.finished[name] = {
                "spec": job["spec"],
                "state_dict": best["state_dict"],
                "epoch": best["epoch"],
                "val_top1": best["val_top1"],
                "epochs": epochs,
                "steps": loop.step,
            }
            print(
                f"[{self.prefix}] {name}: selected epoch {best['epoch']} (val top-1 {best['val_top1']:.4f})", flush=True
            )
            self._checkpoint({"job": i + 1, "loop": None, "best": None}, {"job": float(i + 1)}, f"{name} finished")
        else:
            train.report({}, checkpoint=None)
        del model, objective, loop
        return [{"job": name, **h} for h in history]

    def _checkpoint(self, state: dict, metrics: dict[str, float], position: str) -> None:
        state = {**state, "finished": sorted(self.finished)}

        def write(d: Path) -> None:
            torch.save(state, d / STATE_FILE)
            (d / MODELS_DIR).mkdir()
            for name, rec in self.finished.items():
                torch.save(rec, d / MODELS_DIR / f"{name}.pt")

        report_checkpoint(metrics, write, position)


def collect_models(result: Result, out_dir: Path) -> dict[str, dict]:
    """Copy the finished models out of the final Ray checkpoint into ``out_dir`` and
    describe them (path, spec, selected epoch, val top-1)."""
    ckpt = checkpoint_uri(result)
    dst = out_dir / MODELS_DIR
    shutil.rmtree(dst, ignore_errors=True)
    if storage.is_s3(ckpt):  # downstream workers on any node read the models from S3
        storage.download_dir(storage.join(ckpt, MODELS_DIR), dst)
    else:
        shutil.copytree(Path(ckpt) / MODELS_DIR, dst)
    out = {}
    for f in sorted(dst.glob("*.pt")):
        rec = torch.load(f, map_location="cpu", weights_only=True)
        # the path downstream stages read, on any node: the checkpoint in Ray's run storage (S3 or a
        # shared mount: ray.storage_path), never the copy on this node's disk
        where = storage.join(ckpt, MODELS_DIR, f.name)
        out[f.stem] = {
            "model_path": where,
            "spec": copy.deepcopy(rec["spec"]),
            "selected_epoch": rec["epoch"],
            "val_top1": rec["val_top1"],
            "epochs": rec["epochs"],
            "steps": rec["steps"],
        }
    return out


def load_classifier(record: dict) -> Classifier:
    """A classifier saved by :class:`SequentialJobs` (``weights_only`` load), in eval mode."""
    from cl_core.downstream import build_classifier

    path = record["model_path"]
    if not storage.exists(path):
        import socket

        raise FileNotFoundError(
            f"{path}: the model file an upstream stage wrote is not there on host "
            f"{socket.gethostname()}; if ray.storage_path is a disk of one node, set it to "
            "s3://... or a path every node mounts; else rerun that stage (clpipe run --rerun STAGE)"
        )
    rec = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    model = build_classifier(rec["spec"])
    model.load_state_dict(rec["state_dict"])
    return model.eval()


def input_example(urls: list[str], image_size: int, verify: dict | None = None):
    """Two preprocessed images (float32, ``(2, C, H, W)``) of the first of ``urls``: a
    logged model's input example, from which MLflow infers its signature."""
    import numpy as np

    x, _ = load_split(urls[:1], EvalTransform(image_size), verify, limit=2)
    return x.numpy().astype(np.float32)


def log_classifiers(models: dict[str, dict], example) -> None:
    """Log every classifier a stage trained as an MLflow model of the stage's run (once:
    the register stage registers these), with its ``NAME/selected_val_top1`` and
    ``NAME/selected_epoch`` metrics linked to it; each record gets its ``model_uri`` and
    ``model_id``."""
    import mlflow

    from pipelines import models as logged

    for name, rec in models.items():
        info = logged.log_model(
            load_classifier(rec), name=name, builder={"kind": "classifier", "spec": rec["spec"]}, input_example=example
        )
        mlflow.log_metrics(
            {f"{name}/selected_val_top1": rec["val_top1"], f"{name}/selected_epoch": rec["selected_epoch"]},
            model_id=info.model_id,
        )
        rec.update(model_uri=info.model_uri, model_id=info.model_id)
