"""The pretraining loop that each training worker runs (plain PyTorch).

The loop reads top to bottom in phases: set up the optimizer and schedule; restore
state; per epoch: plan the data, step through the batches, reduce metrics across
workers, evaluate, hand a checkpoint and metrics to ``report``. Whatever runs it (a Ray
Train worker, a plain ``torch.distributed`` launch, a test) supplies ``report``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from cl_core import allocator, distributed
from cl_core.data.device_decode import EncodedBatch
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
    checkpoint_every_steps: int = 0  # also checkpoint inside an epoch every N optimizer steps (0: off)
    checkpoint_every_minutes: float = 0.0  # also checkpoint when this long since the last one (0: off)
    precision: str = "auto"  # "auto" (bf16 on CUDA), "fp32" or "bf16": autocast of the step
    channels_last: bool | None = None  # None: on CUDA only
    compile: bool = False  # torch.compile the method's networks (Method.compile_targets), in place
    cpu_allocator: str = "cache"  # on a CPU device: "cache" keeps freed memory for the next step (cl_core.allocator)
    # None: the method's loop_defaults (DINO: 3.0 and 0.4), else off / constant
    grad_clip: float | None = (
        None  # clip each parameter tensor's gradient to this l2 norm (DINO's clip_gradients); 0: off
    )
    weight_decay_end: float | None = None  # cosine from weight_decay to this over training (DINO); unset: constant

    def settings_for(self, device: torch.device) -> DeviceSettings:
        """The step's device settings (what the loop uses; callers prepare the model
        with the same before wrapping it in DDP)."""
        return device_settings(
            device,
            bf16=None if self.precision == "auto" else self.precision == "bf16",
            channels_last=self.channels_last,
        )


class NonFiniteLossError(FloatingPointError):
    pass


def clip_per_parameter(params: Iterable[torch.Tensor], max_norm: float) -> None:
    """Scale each tensor's gradient whose l2 norm exceeds ``max_norm`` down to it (with
    DINO's 1e-6 in the denominator); per tensor, not the global norm of
    ``torch.nn.utils.clip_grad_norm_``."""
    for p in params:
        if p.grad is not None:
            coef = max_norm / (torch.linalg.vector_norm(p.grad) + 1e-6)
            p.grad.mul_(torch.clamp(coef, max=1.0))


def weight_decay_at(step: int, total_steps: int, start: float, end: float) -> float:
    """DINO's cosine weight-decay schedule: ``start`` at step 0 towards ``end`` at
    ``total_steps`` (the learning rate's cosine without warm-up); a pure function of the step."""
    return lr_at(step, total_steps=total_steps, warmup_steps=0, peak_lr=start, final_lr=end)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s step randomness (InstDisc's and CMC's negative indices,
    dropout masks): distinct per rank, a pure function of (seed, rank)."""
    return (seed * 1_000_003 + 7_919 * (rank + 1)) % (2**63)


@dataclass(frozen=True)
class DeviceSettings:
    """How a training step uses its device: bf16 autocast and channels_last memory
    format (both on for CUDA by default: tensor cores and cuDNN's NHWC kernels)."""

    device: torch.device
    bf16: bool
    channels_last: bool

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the device (asynchronously from pinned memory), NHWC for images."""
        if self.channels_last and x.dim() == 4:
            return x.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return x.to(self.device, non_blocking=True)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def device_settings(
    device: torch.device, *, bf16: bool | None = None, channels_last: bool | None = None
) -> DeviceSettings:
    cuda = device.type == "cuda"
    return DeviceSettings(device, cuda if bf16 is None else bf16, cuda if channels_last is None else channels_last)


def compile_networks(method: Method) -> list[nn.Module]:
    """``torch.compile`` the method's networks in place (``nn.Module.compile``: parameter
    names and state dicts are unchanged, so checkpoints and saved models do not notice).
    Losses, queues and EMA updates stay eager. The first steps pay the compilation (about
    20 s for a small CNN on a CPU); returns the compiled modules."""
    seen: list[nn.Module] = []
    for module in method.compile_targets():
        if not any(module is m for m in seen):
            module.compile()
            seen.append(module)
    return seen


ViewAugmentFn = Callable[[list[torch.Tensor], torch.Generator], list[torch.Tensor]]
ReportFn = Callable[[dict[str, float], dict | None], None]
CheckpointFn = Callable[[dict[str, float], dict], None]


class TrainingLoop:
    """Owns the optimizer, the step counter and the epoch counter of one worker: the loop
    of every training stage (pretraining, sweep trials, fine-tuning, distillation), each
    training one :class:`Method` objective.

    Args:
        model: the method, possibly wrapped by DDP (its forward returns a StepOutput).
        method: the unwrapped method (parameters, encoder, hooks).
        stream: this worker's :class:`ShardStream`.
        aux: for methods with ``uses_labels`` (fine-tuning, distillation): a callable
            giving one extra labeled batch ``(views, labels)`` per step, or None.
        view_augment: ``(views, generator) -> views`` run on the device before the step
            (:class:`cl_core.augment_device.DeviceViews`), or None.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        stream: ShardStream,
        cfg: LoopConfig,
        device: torch.device,
        aux: Callable[[], tuple[list[torch.Tensor], torch.Tensor]] | None = None,
        view_augment: ViewAugmentFn | None = None,
    ):
        self.model, self.method, self.stream, self.cfg, self.device = model, method, stream, cfg, device
        self.aux = aux  # supervised objectives only: gives an extra labeled batch per step
        # views.augment_on: device: the loader's views are uint8 crops; their colour
        # augmentation runs here, batched, from a generator seeded per step
        self.view_augment = view_augment
        self._augment_gen = torch.Generator(device=device) if view_augment is not None else None
        self.world_size = distributed.world_size()
        self.global_batch = cfg.batch_size_per_worker * self.world_size
        self.peak_lr = scale_lr(cfg.lr_base, self.global_batch, cfg.lr_scaling)
        self.steps_per_epoch = stream.plan().steps
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        self.optimizer = build_optimizer(
            cfg.optimizer,
            method.param_groups(cfg.weight_decay),
            self.peak_lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
        )
        defaults = type(method).loop_defaults
        self.grad_clip = float(defaults.get("grad_clip", 0.0) if cfg.grad_clip is None else cfg.grad_clip)
        self.weight_decay_end = (
            defaults.get("weight_decay_end") if cfg.weight_decay_end is None else cfg.weight_decay_end
        )
        # the groups that decay (the others, biases and norms, stay at 0 under the schedule),
        # known even when the configured decay is 0
        # (indices: loading an optimizer state replaces its group dicts)
        self._decayed = [i for i, g in enumerate(method.param_groups(1.0)) if g["weight_decay"] > 0]
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps completed
        # inside the running epoch: batches done, running metric sums and seconds spent,
        # so a checkpoint taken mid-epoch resumes at the next batch with the same means
        self.batch_in_epoch = 0
        self._sums: dict[str, torch.Tensor] = {}
        self._seconds = 0.0
        self.last_checkpoint = "none yet"  # where the run would resume from (for error messages)
        self._last_checkpoint_time = time.monotonic()
        self.settings = cfg.settings_for(device)
        if cfg.compile:
            compile_networks(method)
        if device.type == "cpu":
            allocator.cache_freed_memory(cfg.cpu_allocator == "cache")
        # the weights were drawn before, from the seed every rank shares (and DDP sends rank
        # 0's); from here on each rank draws its own negatives and dropout masks, CPU and
        # CUDA generators alike (a checkpoint keeps both per rank)
        torch.manual_seed(rank_seed(stream.seed, distributed.rank()))

    # ---- state -------------------------------------------------------------------
    def state_dict(self) -> dict:
        # every rank's generator and running sums, in one collective (every rank calls
        # state_dict at the same points)
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        per_rank = distributed.all_gather_object(
            (torch.get_rng_state(), {k: float(v) for k, v in self._sums.items()}, cuda_rng)
        )
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            # the schedule is a pure function of the step (lr_at); its parameters are kept
            # so a checkpoint says which schedule it was on
            "scheduler": {
                "kind": "warmup_cosine",
                "peak_lr": self.peak_lr,
                "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps,
                "lr": self.lr(),
            },
            "batch_in_epoch": self.batch_in_epoch,
            "epoch_sums": [sums for _, sums, _ in per_rank],
            "epoch_seconds": self._seconds,
            "torch_rng": [rng for rng, _, _ in per_rank],
            "cuda_rng": [rng for _, _, rng in per_rank],
        }

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        sums = state.get("epoch_sums", {})
        if isinstance(sums, list):  # one per rank, like the generators
            sums = sums[distributed.rank()] if len(sums) == self.world_size else sums[0]
        self._sums = {k: torch.tensor(v, dtype=torch.float32) for k, v in sums.items()}
        self._seconds = float(state.get("epoch_seconds", 0.0))
        rng = state["torch_rng"]
        if isinstance(rng, list):  # one per rank; a different world size continues from rank 0's
            rng = rng[distributed.rank()] if len(rng) == self.world_size else rng[0]
        torch.set_rng_state(rng.cpu())  # a CPU ByteTensor even if loaded onto a GPU
        cuda_rng = state.get("cuda_rng")
        if self.device.type == "cuda" and isinstance(cuda_rng, list) and cuda_rng:
            mine = cuda_rng[distributed.rank()] if len(cuda_rng) == self.world_size else cuda_rng[0]
            if mine is not None:
                torch.cuda.set_rng_state(mine.cpu(), self.device)
        self.last_checkpoint = self.position()

    def position(self) -> str:
        """Where the loop stands, as a checkpoint would record it."""
        if self.batch_in_epoch:
            return f"epoch {self.epoch + 1}, batch {self.batch_in_epoch} of {self.steps_per_epoch} (step {self.step})"
        return f"end of epoch {self.epoch} (step {self.step})"

    def lr(self) -> float:
        return lr_at(self.step, total_steps=self.total_steps, warmup_steps=self.warmup_steps, peak_lr=self.peak_lr)

    def weight_decay(self) -> float:
        """This step's weight decay (the configured one unless ``weight_decay_end``)."""
        if self.weight_decay_end is None:
            return self.cfg.weight_decay
        return weight_decay_at(self.step, self.total_steps, self.cfg.weight_decay, self.weight_decay_end)

    def _step_generator(self) -> torch.Generator:
        """The device augmentation's generator, seeded from (seed, rank, step): a pure
        function of the step, so a resumed run draws what the interrupted one would."""
        assert self._augment_gen is not None
        seed = (self.stream.seed * 1_000_003 + distributed.rank()) * 1_000_000_007 + self.step
        return self._augment_gen.manual_seed(seed % (2**63))

    def _aux_batch(self) -> tuple[list[torch.Tensor], torch.Tensor] | None:
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
        checkpoint: CheckpointFn | None = None,
    ) -> list[dict[str, float]]:
        """Train from where the loop stands to ``cfg.epochs``; after each epoch call
        ``report(metrics, state_dict)``; inside an epoch, when ``checkpoint_every_steps``
        or ``checkpoint_every_minutes`` say so, call ``checkpoint(position, state_dict)``
        (on every rank alike). Returns the per-epoch metrics."""
        history = []
        self._last_checkpoint_time = time.monotonic()
        while self.epoch < self.cfg.epochs:
            history.append(self._epoch(report, evaluate, log, checkpoint))
        return history

    def _checkpoint_due(self, steps_in_epoch: int) -> bool:
        """Whether to checkpoint after this step (not after an epoch's last step: the
        epoch's report checkpoints then). The time rule is rank 0's clock, broadcast."""
        cfg = self.cfg
        if self.batch_in_epoch >= steps_in_epoch:
            return False
        due = bool(cfg.checkpoint_every_steps) and self.step % cfg.checkpoint_every_steps == 0
        if cfg.checkpoint_every_minutes > 0:
            late = time.monotonic() - self._last_checkpoint_time >= 60 * cfg.checkpoint_every_minutes
            due = due or distributed.broadcast_flag(late, self.device)
        return due

    def _epoch(
        self,
        report: ReportFn,
        evaluate: Callable[[nn.Module], dict[str, float]] | None,
        log: Callable[[int, dict[str, float]], None] | None,
        checkpoint: CheckpointFn | None,
    ) -> dict[str, float]:
        # a checkpoint taken inside this epoch resumes at its next batch: the stream skips
        # the batches already trained on (the epoch's data order is a function of the seed)
        self.stream.set_epoch(self.epoch, skip_batches=self.batch_in_epoch)
        plan = self.stream.plan()
        loader = training_loader(
            self.stream, num_workers=self.cfg.loader_workers, pin_memory=self.device.type == "cuda"
        )
        self.model.train()
        start_batch = self.batch_in_epoch
        t0 = time.perf_counter() - self._seconds
        for views, labels, index in loader:
            if isinstance(views, EncodedBatch):  # views.decode_on: device: JPEG bytes and crop boxes
                views = views.decode(self.device)
            views = [self.settings.input(v) for v in views]
            if self.view_augment is not None:
                views = self.view_augment(views, self._step_generator())
            set_lr(self.optimizer, self.lr(), self.peak_lr)
            if self.weight_decay_end is not None:
                for i in self._decayed:
                    self.optimizer.param_groups[i]["weight_decay"] = self.weight_decay()
            self.method.set_progress(self.step, self.total_steps)
            with self.settings.autocast():
                if self.method.uses_labels:
                    out = self.model(views, labels.to(self.device, non_blocking=True), self._aux_batch())
                elif self.method.needs_index:
                    out = self.model(views, index=index.to(self.device, non_blocking=True))
                else:
                    out = self.model(views)
            if not torch.isfinite(out.loss):
                raise NonFiniteLossError(
                    f"non-finite loss {out.loss.item()} at step {self.step} (epoch {self.epoch + 1}); "
                    f"the last good checkpoint: {self.last_checkpoint}"
                )
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if self.grad_clip > 0:
                clip_per_parameter(self.method.parameters(), self.grad_clip)
            self.method.before_optimizer_step(self.step, self.total_steps)
            self.optimizer.step()
            self.method.after_optimizer_step(self.step, self.total_steps)
            self.step += 1
            self.batch_in_epoch += 1
            for k, v in {"train/loss": out.loss.detach(), **out.metrics}.items():
                self._sums[k] = self._sums[k] + v.float() if k in self._sums else v.float().clone()
            if log is not None and self.cfg.log_every_steps and self.step % self.cfg.log_every_steps == 0:
                log(self.step, {"train/step_loss": float(out.loss.detach()), "train/lr": self.lr()})
            if checkpoint is not None and self._checkpoint_due(plan.steps):
                self._seconds = time.perf_counter() - t0
                checkpoint(
                    {
                        "epoch": float(self.epoch),
                        "step": float(self.step),
                        "batch_in_epoch": float(self.batch_in_epoch),
                    },
                    self.state_dict(),
                )
                self._mark_checkpoint()
        elapsed = time.perf_counter() - t0
        n_steps = self.batch_in_epoch
        if n_steps != plan.steps:
            raise RuntimeError(
                f"epoch {self.epoch}: loader gave {n_steps - start_batch} batches after batch "
                f"{start_batch}, the plan says {plan.steps} in all"
            )
        means = {
            k: distributed.all_reduce_mean(v.to(self.device) / max(1, n_steps)).item()
            for k, v in sorted(self._sums.items())
        }
        mean_loss = means.pop("train/loss", float("nan"))
        self.epoch += 1
        self.batch_in_epoch, self._sums, self._seconds = 0, {}, 0.0
        metrics = {
            **means,
            "train/loss": mean_loss,
            "train/lr": self.optimizer.param_groups[0]["lr"],
            **(
                {"train/weight_decay": self.optimizer.param_groups[self._decayed[0]]["weight_decay"]}
                if self.weight_decay_end is not None and self._decayed
                else {}
            ),
            "train/images_per_sec": plan.samples_seen / elapsed,
            "train/epoch_seconds": elapsed,
            "epoch": float(self.epoch),
            "step": float(self.step),
            "epoch/samples_seen": float(plan.samples_seen),
            "epoch/unique_samples": float(plan.unique_samples),
        }
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(
                f"non-finite mean loss in epoch {self.epoch - 1}; the last good checkpoint: {self.last_checkpoint}"
            )
        if evaluate is not None:
            metrics.update(evaluate(self.method.encoder()))
        report(metrics, self.state_dict())
        self._mark_checkpoint()
        return metrics

    def _mark_checkpoint(self) -> None:
        self.last_checkpoint = self.position()
        self._last_checkpoint_time = time.monotonic()
