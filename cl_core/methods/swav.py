"""SwAV: swapping assignments between multi-crop views [0].

- [0] Caron et al., Unsupervised Learning of Visual Features by Contrasting Cluster
  Assignments, 2020, https://arxiv.org/abs/2006.09882
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cl_core import distributed
from cl_core.losses.swav import sinkhorn, swapped_prediction_loss
from cl_core.methods.base import Method, StepOutput, check_int, check_positive, register
from cl_core.models import build_backbone
from cl_core.models.heads import MLP
from cl_core.models.multicrop import check_multicrop, forward_by_resolution


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of a probability vector."""
    return -(p * p.clamp_min(1e-12).log()).sum()


@register("swav")
class SwAV(Method):
    """Backbone f, projection head g, L2-normalised embeddings z = g(f(x)) / ||.||, and
    K prototypes C (a bias-free Linear whose rows are kept on the unit sphere).

    Each step: scores z . c_k for every view; codes of the 2 global views by
    Sinkhorn-Knopp over the global batch (no gradient; with the queue, over the batch
    plus stored embeddings); the loss predicts each global view's code from every other
    view (:func:`~cl_core.losses.swav.swapped_prediction_loss`). The prototypes are
    renormalised after every optimizer step and get no update for the first
    ``freeze_prototypes_steps`` steps.

    Args:
        backbone: name for :func:`cl_core.models.build_backbone`; ``backbone_args`` its
            keyword arguments.
        gather_distributed: Sinkhorn marginals over all workers and a queue filled from
            all workers; False gives the single-process codes.
        hidden_dim, proj_dim: widths of the projection head ``MLP([F, hidden, proj])``.
        num_prototypes: K.
        temperature: T of the prediction softmax.
        epsilon, sinkhorn_iterations: Sinkhorn's regularisation and iteration count.
        freeze_prototypes_steps: optimizer steps during which the prototypes' gradient is
            dropped (SwAV freezes them for the first epoch: 313 iterations at batch 4096
            on ImageNet; set it to one epoch of your data).
        queue_length: stored global-view embeddings per global view used in the codes
            (0: no queue). The queue is written from step ``queue_start_step`` on and read
            once it is full; it holds embeddings of the whole global batch (gathered).
        queue_start_step: the optimizer step from which the queue is written.
    """

    # the sweep's default space (sweep.space unset): the prototype softmax temperature around SwAV's 0.1
    sweep_space: ClassVar[dict[str, list[Any]]] = {"temperature": [0.05, 0.1, 0.2]}

    view_kind = "multi_crop"

    queue: torch.Tensor
    queue_ptr: torch.Tensor
    queue_filled: torch.Tensor

    global_bn = True  # main_swav.py: --sync_bn pytorch (default)

    def __init__(
        self,
        backbone: str = "small_cnn",
        *,
        backbone_args: dict | None = None,
        gather_distributed: bool = True,
        hidden_dim: int = 2048,  # SwAV [0] App. A.1: 2-layer MLP head, hidden 2048
        proj_dim: int = 128,  # SwAV [0] App. A.1: 128-d output
        num_prototypes: int = 3000,  # SwAV [0] Sec. 4 / App. A.1: K = 3000 on ImageNet
        temperature: float = 0.1,  # SwAV [0] App. A.1: tau = 0.1
        epsilon: float = 0.05,  # SwAV [0] App. A.1: epsilon = 0.05
        sinkhorn_iterations: int = 3,  # SwAV [0] Sec. 3.1: 3 iterations suffice
        freeze_prototypes_steps: int = 313,  # SwAV [0] App. A.1: first epoch (313 its at batch 4096)
        queue_length: int = 0,  # SwAV [0] Sec. 3.1 'small batches' (~3K; 3840 at batch 256), none at batch 4096
        queue_start_step: int = 75060,  # SwAV code: queue from epoch 15 at batch 256 (15 x 5004 its)
    ) -> None:
        super().__init__()
        check_int("hidden_dim", hidden_dim)
        check_int("proj_dim", proj_dim)
        self.num_prototypes = check_int("num_prototypes", num_prototypes, minimum=2)
        self.temperature = check_positive("temperature", temperature)
        self.epsilon = check_positive("epsilon", epsilon)
        self.sinkhorn_iterations = check_int("sinkhorn_iterations", sinkhorn_iterations)
        self.freeze_prototypes_steps = check_int("freeze_prototypes_steps", freeze_prototypes_steps, minimum=0)
        self.queue_length = check_int("queue_length", queue_length, minimum=0)
        self.queue_start_step = check_int("queue_start_step", queue_start_step, minimum=0)
        self.gather_distributed = gather_distributed

        self.backbone, self.feat_dim = build_backbone(backbone, **(backbone_args or {}))
        self.projector = MLP([self.feat_dim, hidden_dim, proj_dim])
        self.prototypes = nn.Linear(proj_dim, num_prototypes, bias=False)
        self.normalize_prototypes()
        # one queue per global view (their codes are computed separately); zeros until written
        self.register_buffer("queue", torch.zeros(2, self.queue_length, proj_dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Put every prototype back on the unit sphere (SwAV [0] Sec. 3.1, App. A.1)."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def embed(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Unit-norm embeddings of all views, in view order: (len(views) * N, proj_dim)."""
        return F.normalize(self.projector(forward_by_resolution(self.backbone, views)).float(), dim=1)

    def scores(self, z: torch.Tensor) -> torch.Tensor:
        """Prototype scores ``z C^T`` in float32 with autocast off: Sinkhorn exponentiates
        them divided by epsilon (0.05), where bf16's rounding would move the codes by
        percents."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self.prototypes(z.float())

    @torch.no_grad()
    def codes(self, scores: torch.Tensor) -> torch.Tensor:
        """Codes (2, N, K) of the 2 global views from their scores (2, N, K); with a full
        queue, the stored embeddings of each view join its Sinkhorn problem."""
        use_queue = self.queue_length > 0 and int(self.queue_filled) >= self.queue_length
        out = []
        for i in range(2):
            extra = self.scores(self.queue[i]) if use_queue else None
            out.append(
                sinkhorn(
                    scores[i],
                    self.epsilon,
                    self.sinkhorn_iterations,
                    extra=extra,
                    gather_distributed=self.gather_distributed,
                )
            )
        return torch.stack(out)

    @torch.no_grad()
    def _enqueue(self, z_global: torch.Tensor) -> None:
        """Write this step's global-view embeddings (2, N, D) of the whole global batch."""
        if self.gather_distributed:
            z_global = torch.stack([distributed.gather_nograd(z_global[i]) for i in range(2)])
        z_global = z_global.to(self.queue.dtype)
        n = z_global.shape[1]
        if n >= self.queue_length:
            self.queue.copy_(z_global[:, n - self.queue_length :])
            self.queue_ptr.zero_()
        else:
            idx = (self.queue_ptr + torch.arange(n, device=self.queue.device)) % self.queue_length
            self.queue[:, idx] = z_global
            self.queue_ptr.copy_((self.queue_ptr + n) % self.queue_length)
        self.queue_filled.copy_(torch.clamp(self.queue_filled + n, max=self.queue_length))

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        n = check_multicrop(views, "swav")
        z = self.embed(views)  # (V * N, D), unit norm
        scores = self.scores(z).reshape(len(views), n, self.num_prototypes)  # (V, N, K), float32
        q = self.codes(scores[:2].detach())  # (2, N, K), rows sum to 1
        loss = swapped_prediction_loss(scores, q, self.temperature)
        if self.training and self.queue_length > 0 and getattr(self, "progress_step", 0) >= self.queue_start_step:
            # after the codes: this batch's embeddings serve the following steps only
            self._enqueue(z[: 2 * n].detach().reshape(2, n, -1))
        with torch.no_grad():
            p = F.softmax(scores / self.temperature, dim=-1)
            metrics = {
                "train/loss": loss.detach(),
                # prototype usage: entropy of the mean code and of the mean prediction, in units of
                # log K (1: every prototype used equally; near 0: collapse onto a few prototypes)
                "train/code_entropy": _entropy(q.mean(dim=(0, 1))) / math.log(self.num_prototypes),
                "train/pred_entropy": _entropy(p.mean(dim=(0, 1))) / math.log(self.num_prototypes),
            }
        return StepOutput(loss=loss, metrics=metrics)

    # ---- hooks -------------------------------------------------------------------
    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        if step < self.freeze_prototypes_steps:
            # no update at all (no momentum, no weight decay) while frozen, as in SwAV's code
            self.prototypes.weight.grad = None

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        self.normalize_prototypes()  # the prototypes of the next step are unit vectors again

    @classmethod
    def smoke_kwargs(cls) -> dict:
        return {
            **super().smoke_kwargs(),
            "hidden_dim": 32,
            "proj_dim": 16,
            "num_prototypes": 16,
            "freeze_prototypes_steps": 1,
            "queue_length": 16,
            "queue_start_step": 0,
        }
