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
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ray import train
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    Result,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from cl_core.augment import EvalTransform, FinetuneTransform
from cl_core.data import storage
from cl_core.data.reader import ShardStream, load_split, training_loader
from cl_core.engine import LoopConfig, PretrainLoop
from cl_core.evaluate import top1
from cl_core.methods.base import Method
from pipelines import ray_env, tracking
from pipelines.config import CropFlipConfig, TrainingConfig
from pipelines.graph import StageContext

STATE_FILE = "state.pt"
MODELS_DIR = "models"
MAX_CHECKPOINTS_PER_MODEL = 10  # short epochs (a few labeled batches) checkpoint every few epochs


def checkpoint_uri(result: Result) -> str:
    """The final checkpoint of ``result`` as a local path or an ``s3://`` URI."""
    ckpt = result.checkpoint
    return ray_env.storage_uri(ckpt.path, ckpt.filesystem if _is_s3_fs(ckpt.filesystem) else None)


def _is_s3_fs(filesystem: Any) -> bool:
    return filesystem is not None and getattr(filesystem, "type_name", "") == "s3"


def use_gpu(section: TrainingConfig) -> bool:
    return ray_env.cluster_gpus() >= section.num_workers if section.use_gpu == "auto" else bool(section.use_gpu)


def fit(ctx: StageContext, worker: Callable[[dict], Any], worker_config: dict, section: TrainingConfig) -> Result:
    """Run ``worker`` on ``section.num_workers`` Ray Train workers; raise its error."""
    storage_path, storage_fs = ray_env.storage(ctx.config)
    trainer = TorchTrainer(
        worker,
        train_loop_config=worker_config,
        scaling_config=ScalingConfig(num_workers=section.num_workers, use_gpu=use_gpu(section),
                                     resources_per_worker={"CPU": section.cpus_per_worker}),
        run_config=RunConfig(
            # deterministic per cache key: a rerun of an interrupted stage resumes from its checkpoint
            name=ctx.ray_run_name,
            storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=section.max_failures),
            logging_config=LoggingConfig(log_level=ctx.config.ray.train_log_level),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


def loop_config(section: TrainingConfig, batch_size: int | None = None) -> LoopConfig:
    return LoopConfig(
        epochs=section.epochs, batch_size_per_worker=batch_size or section.batch_size_per_worker,
        optimizer=section.optimizer, lr_base=section.lr_base, lr_scaling=section.lr_scaling,
        weight_decay=section.weight_decay, momentum=section.momentum, warmup_epochs=section.warmup_epochs,
        loader_workers=section.loader_workers, log_every_steps=section.log_every_steps)


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


def crop_flip(views: CropFlipConfig, image_size: int, n_views: int = 1) -> FinetuneTransform:
    return FinetuneTransform(image_size, crop_min_scale=views.crop_min_scale, hflip_prob=views.hflip_prob,
                             n_views=n_views)


def batch_for(counts: list[int], wanted: int, world: int) -> int:
    """A per-worker batch no larger than each worker's share of a small labeled subset
    (1% of the labels may be a dozen images), so an epoch is not mostly repeats."""
    return max(1, min(wanted, sum(counts) // world))


def cycle(stream: ShardStream):
    """Endless labeled batches from ``stream`` (in-process loader), epoch after epoch."""
    epoch = 0
    while True:
        stream.set_epoch(epoch)
        yield from training_loader(stream, num_workers=0)
        epoch += 1


class SequentialJobs:
    """Trains named models one after another in one Ray Train worker group, selecting
    each model's epoch with the best val top-1.

    ``build(job)`` returns ``(objective, classifier, stream, aux)``; the objective is a
    :class:`~cl_core.methods.base.Method` with ``uses_labels``, ``classifier`` maps
    images to logits (the model that is kept).
    """

    def __init__(self, config: dict, worker: Worker, log_prefix: str) -> None:
        self.config, self.w, self.prefix = config, worker, log_prefix
        self.client = None
        self.val: tuple[torch.Tensor, torch.Tensor] | None = None
        if worker.rank == 0:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(config["tracking_uri"])
            self.val = load_split(config["val_urls"], EvalTransform(config["image_size"]))
        self.finished: dict[str, dict] = {}
        self.resume: dict | None = None
        ckpt = train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                self.resume = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
                for name in self.resume["finished"]:
                    self.finished[name] = torch.load(Path(d) / MODELS_DIR / f"{name}.pt", map_location="cpu",
                                                     weights_only=True)

    def run(self, jobs: list[dict], build: Callable[[dict], tuple[Method, torch.nn.Module, ShardStream, Any]],
            section: TrainingConfig) -> list[dict]:
        history: list[dict] = []
        start = self.resume["job"] if self.resume else 0
        for i, job in enumerate(jobs):
            if i < start:
                continue
            history += self._one(i, job, jobs, build, section)
        return history

    def _one(self, i: int, job: dict, jobs: list[dict], build, section: TrainingConfig) -> list[dict]:
        name = job["name"]
        objective, classifier, stream, aux = build(job)
        objective = objective.to(self.w.device)
        model = train.torch.prepare_model(objective)
        # a budget in steps as well as epochs: 1% of the labels may be one batch per epoch
        steps = stream.plan().steps
        epochs = max(section.epochs, -(-getattr(section, "min_steps", 0) // max(1, steps)))
        cfg = loop_config(section, stream.batch_size)
        loop = PretrainLoop(model, objective, stream, dataclasses.replace(cfg, epochs=epochs), self.w.device, aux=aux)
        ckpt_every = max(1, epochs // MAX_CHECKPOINTS_PER_MODEL)
        best = {"val_top1": -1.0, "epoch": 0, "state_dict": None}
        if self.resume and self.resume["job"] == i and self.resume["loop"] is not None:
            loop.load_state_dict(self.resume["loop"])
            best = self.resume["best"]
            if self.w.rank == 0:
                print(f"[{self.prefix}] {name}: resumed from checkpoint at epoch {loop.epoch}", flush=True)
        elif self.w.rank == 0:
            print(f"[{self.prefix}] {name}: {loop.describe()}", flush=True)

        def evaluate(_encoder) -> dict[str, float]:
            assert self.val is not None
            x, y = self.val
            was = classifier.training
            classifier.eval()
            with torch.no_grad():
                logits = torch.cat([classifier(x[j:j + 512].to(self.w.device)).float().cpu() for j in range(0, len(x), 512)])
            classifier.train(was)
            return {"val/top1": top1(logits, y)}

        def report(metrics: dict[str, float], state: dict | None) -> None:
            # every epoch: MLflow metrics and best-epoch selection on rank 0; Ray Train
            # (a round trip through its controller) only on checkpoint epochs, on every rank alike
            epoch = int(metrics["epoch"])
            at_checkpoint = epoch % ckpt_every == 0 or epoch == epochs
            if self.w.rank != 0:
                if at_checkpoint:
                    train.report({}, checkpoint=None)
                return
            if metrics["val/top1"] > best["val_top1"]:
                best.update(val_top1=metrics["val/top1"], epoch=epoch,
                            state_dict={k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()})
            metrics = {**metrics, "val/best_top1": best["val_top1"]}
            tracking.log_metrics(self.config["run_id"], {f"{name}/{k}": v for k, v in metrics.items()},
                                 step=epoch, client=self.client)
            if at_checkpoint:
                print("[{}] {} epoch {}/{}  loss {:.4f}  val top-1 {:.3f} (best {:.3f} at epoch {})".format(
                    self.prefix, name, epoch, epochs, metrics["train/loss"], metrics["val/top1"],
                    best["val_top1"], best["epoch"]), flush=True)
                self._checkpoint({"job": i, "loop": state, "best": best}, metrics)

        history = loop.run(report, evaluate if self.w.rank == 0 else None)
        if self.w.rank == 0:
            self.finished[name] = {"spec": job["spec"], "state_dict": best["state_dict"], "epoch": best["epoch"],
                                   "val_top1": best["val_top1"], "epochs": epochs, "steps": loop.step}
            print(f"[{self.prefix}] {name}: selected epoch {best['epoch']} (val top-1 {best['val_top1']:.4f})", flush=True)
            self._checkpoint({"job": i + 1, "loop": None, "best": None}, {"job": float(i + 1)})
        else:
            train.report({}, checkpoint=None)
        del model, objective, loop
        return [{"job": name, **h} for h in history]

    def _checkpoint(self, state: dict, metrics: dict[str, float]) -> None:
        state = {**state, "finished": sorted(self.finished)}
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / STATE_FILE)
            (Path(d) / MODELS_DIR).mkdir()
            for name, rec in self.finished.items():
                torch.save(rec, Path(d) / MODELS_DIR / f"{name}.pt")
            train.report(metrics, checkpoint=train.Checkpoint.from_directory(d))


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
        where = storage.join(ckpt, MODELS_DIR, f.name) if storage.is_s3(ckpt) else str(f)
        out[f.stem] = {"model_path": where, "spec": copy.deepcopy(rec["spec"]), "selected_epoch": rec["epoch"],
                       "val_top1": rec["val_top1"], "epochs": rec["epochs"], "steps": rec["steps"]}
    return out


def load_classifier(record: dict) -> torch.nn.Module:
    """A classifier saved by :class:`SequentialJobs` (``weights_only`` load), in eval mode."""
    from cl_core.models import build_classifier

    path = record["model_path"]
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: the model file an upstream stage wrote is missing; "
                                "rerun that stage (clpipe run --rerun STAGE)")
    rec = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    model = build_classifier(rec["spec"])
    model.load_state_dict(rec["state_dict"])
    return model.eval()
