"""DINO: self-distillation with no labels, a momentum teacher and multi-crop [0].

- [0] Caron et al., Emerging Properties in Self-Supervised Vision Transformers, 2021,
  https://arxiv.org/abs/2104.14294
- [1] Caron et al., Unsupervised Learning of Visual Features by Contrasting Cluster
  Assignments, 2020, https://arxiv.org/abs/2006.09882 (multi-crop)
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from cl_core.errors import HyperparameterError
from cl_core.losses.dino import batch_center, dino_loss
from cl_core.methods.base import (
    Method,
    StepOutput,
    check_int,
    check_momentum,
    check_positive,
    register,
)
from cl_core.models import build_backbone
from cl_core.models.dino_head import DINOHead
from cl_core.models.momentum import cosine_momentum, ema_update, momentum_copy
from cl_core.models.multicrop import check_multicrop, forward_by_resolution


@register("dino")
class DINO(Method):
    """Student g_s = backbone + :class:`~cl_core.models.dino_head.DINOHead` on every view;
    teacher g_t = an EMA copy of both on the 2 global views only.

    The loss (:func:`~cl_core.losses.dino.dino_loss`) is the cross entropy between the
    centered, sharpened teacher distribution of one global view and the student's
    distribution of every other view, averaged over the pairs. After each training
    forward the center moves towards the mean teacher output of the global batch
    (``c <- m c + (1 - m) mean``); after each optimizer step the teacher moves towards
    the student with a momentum rising from ``momentum`` to 1 on a cosine schedule.

    Schedules, as functions of the fraction of training done (``set_progress``): the
    teacher temperature rises linearly from ``warmup_teacher_temp`` to
    ``teacher_temp`` over the first ``teacher_temp_warmup`` of training, then stays.

    Args:
        backbone: name for :func:`cl_core.models.build_backbone` (ResNets, small_cnn,
            ViTs: their position embeddings are interpolated for the local crops);
            ``backbone_args`` its keyword arguments.
        gather_distributed: the center is the mean over all workers' teacher outputs;
            False gives the single-process center.
        out_dim: K, the output dimension.
        hidden_dim, bottleneck_dim: widths of the head's MLP.
        norm_last_layer: fix the norm of the last layer's rows to 1.
        student_temp: tau_s.
        teacher_temp, warmup_teacher_temp, teacher_temp_warmup: tau_t after the warm-up,
            at its start, and the warm-up's length as a fraction of training.
        center_momentum: m of the center's EMA.
        momentum: the teacher's EMA momentum at step 0 (1 at the end).
        freeze_last_layer_steps: optimizer steps during which the last layer's gradient
            is dropped (DINO's code: the first epoch, 1251 iterations at batch 1024 on
            ImageNet; set it to one epoch of your data).
    """

    # the sweep's default space (sweep.space unset): DINO's teacher momentum around its 0.996
    sweep_space: ClassVar[dict[str, list[Any]]] = {"momentum": [0.99, 0.996, 0.999]}

    view_kind = "multi_crop"
    # the official training loop (main_dino.py): every student tensor's gradient clipped to
    # norm 3.0, weight decay on a cosine from the configured value (0.04) to 0.4
    loop_defaults = {"grad_clip": 3.0, "weight_decay_end": 0.4}

    center: torch.Tensor

    global_bn = True  # main_dino.py: convert_sync_batchnorm when the backbone has BatchNorm

    def __init__(
        self,
        backbone: str = "small_cnn",
        *,
        backbone_args: dict | None = None,
        gather_distributed: bool = True,
        out_dim: int = 65536,  # DINO [0] code: K = 65536 (the K of Sec. 3.1)
        hidden_dim: int = 2048,  # DINO [0] Sec. 3.1: 3-layer MLP, hidden 2048
        bottleneck_dim: int = 256,  # DINO [0] code: 256-d bottleneck before the l2 norm of Sec. 3.1
        norm_last_layer: bool = True,  # DINO [0] code: weight-normalised last layer with g fixed to 1
        student_temp: float = 0.1,  # DINO [0] Sec. 4.1: tau_s = 0.1
        teacher_temp: float = 0.07,  # DINO [0] Sec. 4.1: tau_t warms up to 0.07
        warmup_teacher_temp: float = 0.04,  # DINO [0] Sec. 4.1: from 0.04
        teacher_temp_warmup: float = 0.1,  # DINO [0] Sec. 4.1: first 30 epochs (of 300: 0.1)
        center_momentum: float = 0.9,  # DINO [0] code: center momentum m = 0.9 (Eq. 4)
        momentum: float = 0.996,  # DINO [0] Sec. 3.1: 0.996, cosine schedule to 1
        freeze_last_layer_steps: int = 1251,  # DINO [0] code: first epoch (1251 its at batch 1024)
    ) -> None:
        super().__init__()
        check_int("out_dim", out_dim, minimum=2)
        check_int("hidden_dim", hidden_dim)
        check_int("bottleneck_dim", bottleneck_dim)
        self.student_temp = check_positive("student_temp", student_temp)
        self.teacher_temp = check_positive("teacher_temp", teacher_temp)
        self.warmup_teacher_temp = check_positive("warmup_teacher_temp", warmup_teacher_temp)
        if (
            not isinstance(teacher_temp_warmup, (int, float))
            or isinstance(teacher_temp_warmup, bool)
            or not 0 <= teacher_temp_warmup <= 1
        ):
            raise HyperparameterError(
                "teacher_temp_warmup", f"must be a fraction of training in [0, 1], got {teacher_temp_warmup!r}"
            )
        self.teacher_temp_warmup = float(teacher_temp_warmup)
        self.center_momentum = check_momentum("center_momentum", center_momentum)
        self.momentum = check_momentum("momentum", momentum)
        self.freeze_last_layer_steps = check_int("freeze_last_layer_steps", freeze_last_layer_steps, minimum=0)
        self.gather_distributed = gather_distributed
        self.out_dim = out_dim

        self.backbone, self.feat_dim = build_backbone(backbone, **(backbone_args or {}))
        self.head = DINOHead(self.feat_dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer=norm_last_layer)
        # the teacher starts as the student (DINO [0] Algorithm 1: gt.params = gs.params)
        self.teacher_backbone = momentum_copy(self.backbone)
        self.teacher_head = momentum_copy(self.head)
        self.register_buffer("center", torch.zeros(out_dim))

    # ---- schedules (pure functions of the progress) -------------------------------
    def _progress(self) -> tuple[int, int]:
        return getattr(self, "progress_step", 0), getattr(self, "progress_total", 1)

    def teacher_temperature(self) -> float:
        """tau_t now: linear from ``warmup_teacher_temp`` to ``teacher_temp`` over the first
        ``teacher_temp_warmup`` of training, then constant."""
        step, total = self._progress()
        t = step / max(1, total)
        if t >= self.teacher_temp_warmup:
            return self.teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * t / self.teacher_temp_warmup

    def teacher_momentum(self, step: int, total_steps: int) -> float:
        """EMA momentum after optimizer step ``step``: cosine from ``momentum`` to 1."""
        return cosine_momentum(self.momentum, step, total_steps)

    # ---- forward -----------------------------------------------------------------
    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        n = check_multicrop(views, "dino")
        s = self.head(forward_by_resolution(self.backbone, views)).float().reshape(len(views), n, self.out_dim)
        with torch.no_grad():
            t = self.teacher_head(self.teacher_backbone(torch.cat(views[:2]))).float().reshape(2, n, self.out_dim)
        tau_t = self.teacher_temperature()
        loss, p_t = dino_loss(s, t, self.center, self.student_temp, tau_t)
        if self.training:
            self.update_center(t)  # after the loss: this step used the previous center
        with torch.no_grad():
            # collapse monitors (DINO [0] Sec. 5.3, Fig. 7): the teacher's entropy (-> 0: one
            # dimension dominates; -> log K: uniform) and the mean KL(teacher || student)
            # = loss - entropy (-> 0 in either collapse)
            h_t = -(p_t * p_t.clamp_min(1e-12).log()).sum(-1).mean()
            step, total = self._progress()
            metrics = {
                "train/loss": loss.detach(),
                "train/teacher_entropy": h_t,
                "train/kl": loss.detach() - h_t,
                "train/teacher_temp": torch.tensor(tau_t),
                "train/momentum": torch.tensor(self.teacher_momentum(step, total)),
            }
        return StepOutput(loss=loss, metrics=metrics)

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """``c <- m c + (1 - m) mean(teacher_out)`` over the global batch (DINO [0] Eq. 4)."""
        mean = batch_center(teacher_out, self.gather_distributed).to(self.center.dtype)
        self.center.mul_(self.center_momentum).add_(mean, alpha=1.0 - self.center_momentum)

    # ---- hooks -------------------------------------------------------------------
    def momentum_targets(self) -> list[nn.Module]:
        return [self.teacher_backbone, self.teacher_head]

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        if step < self.freeze_last_layer_steps:
            # no update at all while frozen (DINO's code drops the gradient)
            for p in self.head.last_layer.parameters():
                p.grad = None

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        m = self.teacher_momentum(step, total_steps)
        ema_update(self.teacher_backbone, self.backbone, m)
        ema_update(self.teacher_head, self.head, m)

    def encoder(self) -> nn.Module:
        """The teacher's backbone: DINO evaluates the teacher, whose features are better
        than the student's throughout training (paper Sec. 5.2)."""
        return self.teacher_backbone

    @classmethod
    def smoke_kwargs(cls) -> dict:
        return {
            **super().smoke_kwargs(),
            "out_dim": 32,
            "hidden_dim": 32,
            "bottleneck_dim": 16,
            "freeze_last_layer_steps": 1,
        }
