"""The pretraining loop that each training worker runs (plain PyTorch).

The loop reads top to bottom in phases: set up the optimizer and schedule; restore
state; per epoch: plan the data, step through the batches, reduce metrics across
workers, evaluate, hand a checkpoint and metrics to ``report``. Whatever runs it (a Ray
Train worker, a plain ``torch.distributed`` launch, a test) supplies ``report``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cl_core import distributed
from cl_core.data.reader import ShardStream, training_loader
from cl_core.methods.base import Method
from cl_core.optim import build_optimizer, lr_at, scale_lr, set_lr


@dataclass(frozen=True)
class LoopConfig:
    epochs: int
    batch_size_per_worker: int
    optimizer: str = "lars"
    lr_base: float = 0.3  # per 256 images
    lr_scaling: str = "linear"
    weight_decay: float = 1e-6
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    loader_workers: int = 1
    log_every_steps: int = 0  # 0: per-epoch metrics only


class NonFiniteLossError(FloatingPointError):
    pass


ReportFn = Callable[[dict[str, float], dict | None], None]


class PretrainLoop:
    """Owns the optimizer, the step counter and the epoch counter of one worker.

    Args:
        model: the method, possibly wrapped by DDP (its forward returns a StepOutput).
        method: the unwrapped method (parameters, encoder, hooks).
        stream: this worker's :class:`ShardStream`.
        aux: for methods with ``uses_labels`` (fine-tuning, distillation): a callable
            giving one extra labeled batch ``(views, labels)`` per step, or None.
    """

    def __init__(self, model: nn.Module, method: Method, stream: ShardStream, cfg: LoopConfig, device: torch.device,
                 aux: Callable[[], tuple[list[torch.Tensor], torch.Tensor]] | None = None):
        self.model, self.method, self.stream, self.cfg, self.device = model, method, stream, cfg, device
        self.aux = aux  # supervised objectives only: gives an extra labeled batch per step
        self.world_size = distributed.world_size()
        self.global_batch = cfg.batch_size_per_worker * self.world_size
        self.peak_lr = scale_lr(cfg.lr_base, self.global_batch, cfg.lr_scaling)
        self.steps_per_epoch = stream.plan().steps
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        self.optimizer = build_optimizer(
            cfg.optimizer, method.param_groups(cfg.weight_decay), self.peak_lr,
            weight_decay=cfg.weight_decay, momentum=cfg.momentum,
        )
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps completed
        self.autocast = device.type == "cuda"

    # ---- state -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            # the schedule is a pure function of the step (lr_at); its parameters are kept
            # so a checkpoint says which schedule it was on
            "scheduler": {"kind": "warmup_cosine", "peak_lr": self.peak_lr, "warmup_steps": self.warmup_steps,
                          "total_steps": self.total_steps, "lr": self.lr()},
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        torch.set_rng_state(state["torch_rng"].cpu())  # a CPU ByteTensor even if loaded onto a GPU

    def lr(self) -> float:
        return lr_at(self.step, total_steps=self.total_steps, warmup_steps=self.warmup_steps, peak_lr=self.peak_lr)

    def _aux_batch(self):
        if self.aux is None:
            return None
        views, labels, *_ = self.aux()
        return [v.to(self.device, non_blocking=True) for v in views], labels.to(self.device, non_blocking=True)

    # ---- loop --------------------------------------------------------------------
    def describe(self) -> str:
        return (
            f"{self.world_size} worker(s) x {self.cfg.batch_size_per_worker} = global batch {self.global_batch}; "
            f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps; peak lr {self.peak_lr:.4g} "
            f"({self.cfg.lr_scaling} rule), warm-up {self.warmup_steps} steps"
        )

    def run(
        self,
        report: ReportFn,
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        log: Callable[[int, dict[str, float]], None] | None = None,
    ) -> list[dict[str, float]]:
        """Train from ``self.epoch`` to ``cfg.epochs``; after each epoch call
        ``report(metrics, state_dict)``. Returns the per-epoch metrics."""
        history = []
        while self.epoch < self.cfg.epochs:
            history.append(self._epoch(report, evaluate, log))
        return history

    def _epoch(self, report: ReportFn, evaluate, log) -> dict[str, float]:
        self.stream.set_epoch(self.epoch)
        plan = self.stream.plan()
        loader = training_loader(self.stream, num_workers=self.cfg.loader_workers, pin_memory=self.device.type == "cuda")
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        n_steps = 0
        t0 = time.perf_counter()
        for views, labels, index in loader:
            views = [v.to(self.device, non_blocking=True) for v in views]
            set_lr(self.optimizer, self.lr(), self.peak_lr)
            self.method.set_progress(self.step, self.total_steps)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                if self.method.uses_labels:
                    out = self.model(views, labels.to(self.device, non_blocking=True), self._aux_batch())
                elif self.method.needs_index:
                    out = self.model(views, index=index.to(self.device, non_blocking=True))
                else:
                    out = self.model(views)
            if not torch.isfinite(out.loss):
                raise NonFiniteLossError(
                    f"non-finite loss {out.loss.item()} at step {self.step} (epoch {self.epoch + 1}); "
                    f"the last good checkpoint is {f'the one after epoch {self.epoch}' if self.epoch else 'none (first epoch)'}"
                )
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            self.method.before_optimizer_step(self.step, self.total_steps)
            self.optimizer.step()
            self.method.after_optimizer_step(self.step, self.total_steps)
            self.step += 1
            n_steps += 1
            for k, v in {"train/loss": out.loss.detach(), **out.metrics}.items():
                sums[k] = sums[k] + v.float() if k in sums else v.float().clone()
            if log is not None and self.cfg.log_every_steps and self.step % self.cfg.log_every_steps == 0:
                log(self.step, {"train/step_loss": float(out.loss.detach()), "train/lr": self.lr()})
        elapsed = time.perf_counter() - t0
        if n_steps != plan.steps:
            raise RuntimeError(f"epoch {self.epoch}: loader gave {n_steps} batches, the plan says {plan.steps}")
        means = {k: distributed.all_reduce_mean(v / max(1, n_steps)).item() for k, v in sorted(sums.items())}
        mean_loss = means.pop("train/loss", float("nan"))
        self.epoch += 1
        metrics = {
            **means,
            "train/loss": mean_loss,
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/images_per_sec": plan.samples_seen / elapsed,
            "train/epoch_seconds": elapsed,
            "epoch": float(self.epoch),
            "step": float(self.step),
            "epoch/samples_seen": float(plan.samples_seen),
            "epoch/unique_samples": float(plan.unique_samples),
        }
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(f"non-finite mean loss in epoch {self.epoch - 1}")
        if evaluate is not None:
            metrics.update(evaluate(self.method.encoder()))
        report(metrics, self.state_dict())
        return metrics
