"""MoCo v1/v2: momentum contrast with a queue of negative keys [0, 1].

A query encoder (backbone + head) is trained with InfoNCE against the key of the other
view, produced by a momentum (EMA) copy of the query encoder, and against a FIFO queue
of K keys from earlier batches. MoCo v2 [1] replaces the linear head with a 2-layer MLP,
raises the temperature to 0.2 and adds Gaussian blur to the augmentation; the blur is a
setting of the view pipeline (``views.blur_prob``, 0.5 in [1]), not of this method.

- [0] He, Fan, Wu, Xie, Girshick. Momentum Contrast for Unsupervised Visual
  Representation Learning. CVPR 2020. https://arxiv.org/abs/1911.05722
- [1] Chen, Fan, Girshick, He. Improved Baselines with Momentum Contrastive Learning,
  2020. https://arxiv.org/abs/2003.04297
- [2] Chen, Xie, He. An Empirical Study of Training Self-Supervised Vision Transformers,
  2021. https://arxiv.org/abs/2104.02057 (the cosine momentum schedule option)
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cl_core.errors import HyperparameterError
from cl_core.losses.infonce import queue_infonce
from cl_core.methods.base import (
    Method,
    StepOutput,
    check_int,
    check_momentum,
    check_positive,
    register,
)
from cl_core.models import build_backbone
from cl_core.models.heads import MLP
from cl_core.models.memory import KeyQueue
from cl_core.models.momentum import cosine_momentum, ema_update, momentum_copy
from cl_core.models.shuffle_bn import shuffled_forward

MOMENTUM_SCHEDULES = ("constant", "cosine")


def check_momentum_schedule(value: str) -> str:
    if value not in MOMENTUM_SCHEDULES:
        raise HyperparameterError("momentum_schedule", f"must be one of {', '.join(MOMENTUM_SCHEDULES)}, got {value!r}")
    return value


def scheduled_momentum(base: float, schedule: str, step: int, total_steps: int) -> float:
    """The EMA momentum for optimizer step ``step`` of ``total_steps``: ``base`` throughout
    (``constant``), or rising from ``base`` to 1 along a half cosine (``cosine``)."""
    return base if schedule == "constant" else cosine_momentum(base, step, total_steps)


@register("moco")
class MoCo(Method):
    """MoCo v1/v2: query encoder f_q = head(backbone), key encoder f_k = EMA copy of f_q,
    InfoNCE of q against its key (logit 0) and the queue (logits 1..K).

    Each step: q = f_q(x_q); k = f_k(x_k) without gradient (with shuffling BN, the key
    batch is shuffled across workers before f_k and restored after); loss on
    ``[q.k, q.queue] / T``; then the keys of all workers are enqueued (rank order),
    replacing the oldest ones. After the optimizer step f_k moves towards f_q:
    ``theta_k <- m theta_k + (1 - m) theta_q`` ([0] Eq. 2).

    Args:
        backbone: name for :func:`cl_core.models.build_backbone`; ``backbone_args`` its
            keyword arguments.
        gather_distributed: keys of all workers go into the queue and shuffling BN
            shuffles across workers; without it each worker keeps its own keys and
            shuffles within its batch.
        version: 1 (linear head) or 2 (MLP head, hidden width = feature width, ReLU, no BN).
        temperature: T; None takes the version's default (v1: 0.07, v2: 0.2).
        momentum: EMA momentum m of the key encoder.
        momentum_schedule: ``constant`` (MoCo) or ``cosine`` (m rises to 1 at the end).
        queue_size: K, the number of queued negative keys.
        proj_dim: dim of q and k.
        shuffle_bn: shuffle the key batch across workers around the key encoder.
        symmetric: also use the second view as query against the first view's key and
            average the two losses (the keys of both views are enqueued); MoCo v1/v2
            are asymmetric.
    """

    # the sweep's default space (sweep.space unset): MoCo's momentum ablation (Sec. 4.1):
    # 0.99-0.9999 work, 0.9 loses points
    sweep_space: ClassVar[dict[str, list[Any]]] = {"momentum": [0.9, 0.99, 0.999]}

    def __init__(
        self,
        backbone: str = "small_cnn",
        *,
        backbone_args: dict | None = None,
        gather_distributed: bool = True,
        version: int = 2,  # MoCo v2 [1]; 1 for the original [0]
        temperature: float | None = None,  # None: 0.07 for v1 ([0] Sec. 3.3), 0.2 for v2 ([1] Sec. 3, "MLP head")
        momentum: float = 0.999,  # [0] Sec. 3.2: m = 0.999, the default (ablated in Sec. 4.1)
        momentum_schedule: str = "constant",  # [0]: constant; "cosine" as in MoCo v3 [2]
        queue_size: int = 65536,  # [0] Sec. 4.1: K = 65536
        proj_dim: int = 128,  # [0] Sec. 3.3: 128-D L2-normalised output
        shuffle_bn: bool = True,  # [0] Sec. 3.3, "Shuffling BN"
        symmetric: bool = False,  # [0] and [1] use the asymmetric loss
    ) -> None:
        super().__init__()
        if version not in (1, 2) or isinstance(version, bool):
            raise HyperparameterError("version", f"must be 1 or 2, got {version!r}")
        self.version = version
        default_t = 0.07 if version == 1 else 0.2
        self.temperature = default_t if temperature is None else check_positive("temperature", temperature)
        self.momentum = check_momentum("momentum", momentum)
        self.momentum_schedule = check_momentum_schedule(momentum_schedule)
        self.gather_distributed = gather_distributed
        self.shuffle_bn = bool(shuffle_bn)
        self.symmetric = bool(symmetric)
        proj_dim = check_int("proj_dim", proj_dim)

        self.backbone, self.feat_dim = build_backbone(backbone, **(backbone_args or {}))
        # v1: the backbone's fc maps to 128-D; v2: fc -> ReLU -> fc with the feature width as hidden width
        dims = [self.feat_dim, proj_dim] if version == 1 else [self.feat_dim, self.feat_dim, proj_dim]
        self.head = MLP(dims, norm=False)
        self.key_backbone = momentum_copy(self.backbone)
        self.key_head = momentum_copy(self.head)
        self.queue = KeyQueue(check_int("queue_size", queue_size), proj_dim)

    # ---- encoders ----------------------------------------------------------------
    def _key_encoder(self, x: torch.Tensor) -> torch.Tensor:
        return self.key_head(self.key_backbone(x))

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 keys (N, proj_dim) of this worker's images x, in x's order."""
        if self.shuffle_bn:
            k = shuffled_forward(self._key_encoder, x, gather_distributed=self.gather_distributed)
        else:
            k = self._key_encoder(x)
        return F.normalize(k.float(), dim=1)

    @torch.no_grad()
    def _enqueue(self, k: torch.Tensor) -> None:
        self.queue.enqueue(k, gather=self.gather_distributed)  # every worker's keys in rank order, or this one's

    # ---- training step -----------------------------------------------------------
    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        x_q, x_k = views[0], views[1]  # (N, C, H, W) each
        # this step's negatives: a copy, since the enqueue below overwrites the buffer that
        # the logits' backward would otherwise read
        negatives = self.queue.queue.detach().clone()  # (K, D)
        q = self.head(self.backbone(x_q))  # (N, D)
        k = self.keys(x_k)  # (N, D), no gradient
        out = queue_infonce(q, k, negatives, self.temperature)
        loss, top1 = out.loss, out.top1
        if self.symmetric:
            q2 = self.head(self.backbone(x_k))
            k2 = self.keys(x_q)
            out2 = queue_infonce(q2, k2, negatives, self.temperature)
            loss, top1 = (loss + out2.loss) / 2, (top1 + out2.top1) / 2
        # after the logits, as in [0] Algorithm 1; one enqueue per view, so the queue's order
        # is the same for W workers x N as for one worker with the global batch
        self._enqueue(k)
        if self.symmetric:
            self._enqueue(k2)
        return StepOutput(loss=loss, metrics={"train/loss": loss.detach(), "train/pos_top1": top1})

    # ---- momentum encoder ------------------------------------------------------------
    def momentum_at(self, step: int, total_steps: int) -> float:
        return scheduled_momentum(self.momentum, self.momentum_schedule, step, total_steps)

    def momentum_targets(self) -> list[nn.Module]:
        return [self.key_backbone, self.key_head]

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        m = self.momentum_at(step, total_steps)
        ema_update(self.key_backbone, self.backbone, m)
        ema_update(self.key_head, self.head, m)

    @classmethod
    def smoke_kwargs(cls) -> dict:
        return {**super().smoke_kwargs(), "proj_dim": 8, "queue_size": 32}
