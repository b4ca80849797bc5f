"""InstDisc: instance discrimination with a memory bank [0].

Every training image is its own class. The bank holds one 128-d unit vector per image;
an image's feature is pulled towards its own bank entry and pushed from m entries drawn
uniformly from the bank, by noise-contrastive estimation of the non-parametric softmax
(the paper's objective) or by a softmax over the same entries (InfoNCE [1]).

- [0] Wu et al., Unsupervised Feature Learning via Non-Parametric Instance
  Discrimination, CVPR 2018, https://arxiv.org/abs/1805.01978
- [1] van den Oord et al., Representation Learning with Contrastive Predictive Coding,
  2018, https://arxiv.org/abs/1807.03748
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cl_core import distributed
from cl_core.errors import HyperparameterError
from cl_core.losses.nce import bank_info_nce_loss, estimate_partition, nce_loss
from cl_core.methods.base import (
    Method,
    StepOutput,
    check_int,
    check_momentum,
    check_positive,
    register,
)
from cl_core.models import build_backbone
from cl_core.models.memory import MemoryBank

LOSSES = ("nce", "infonce")


@register("instdisc")
class InstDisc(Method):
    """Encoder f, linear projection to ``proj_dim``, L2 norm: v = normalize(W f(x)), one
    augmented view per image; a memory bank of ``num_samples`` entries is the other side.

    Per step: for each sample i of the batch, the positive is its bank entry v_i and the
    negatives are ``num_negatives`` entries drawn uniformly from the other n - 1 entries
    (a draw in [0, n - 1) moved past i, so a sample is never its own negative). After the
    loss, the bank entries of the batch (gathered from all workers) move to
    ``normalize(m * v_i + (1 - m) * v)`` (no gradient).

    NCE's normaliser Z is estimated once, from the first training batch (averaged over
    workers), and kept fixed in the ``partition`` buffer (0 until then), as in [0].

    Args:
        backbone: name for :func:`cl_core.models.build_backbone`; ``backbone_args`` its
            keyword arguments.
        gather_distributed: bank updates with every worker's (index, feature) pairs and Z
            averaged over workers; False keeps each worker's bank to itself.
        num_samples: the training split's size n (one bank entry per sample).
        loss: ``nce`` (the paper's) or ``infonce``.
        temperature: T of exp(v_i.v / T).
        num_negatives: m, entries drawn per sample.
        bank_momentum: m of the bank update.
        proj_dim: dim of v.
    """

    # the sweep's default space (sweep.space unset): around InstDisc's 0.07
    sweep_space: ClassVar[dict[str, list[Any]]] = {"temperature": [0.05, 0.07, 0.1]}

    view_kind = "single"
    needs_index = True
    partition: torch.Tensor

    def __init__(
        self,
        backbone: str = "small_cnn",
        *,
        backbone_args: dict | None = None,
        gather_distributed: bool = True,
        num_samples: int,
        loss: str = "nce",  # InstDisc [0] Sec. 3.2: NCE; "infonce" [1] is the softmax over the same entries
        temperature: float = 0.07,  # InstDisc [0] Sec. 4: tau = 0.07
        num_negatives: int = 4096,  # InstDisc [0] Sec. 4: m = 4096
        bank_momentum: float = 0.5,  # InstDisc [0] Sec. 3.3 proximal update; 0.5 in the authors' code
        proj_dim: int = 128,  # InstDisc [0] Sec. 3.1 and 4: 128-d features
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise HyperparameterError("loss", f"must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.num_samples = check_int("num_samples", num_samples, minimum=2)
        self.loss_kind = loss
        self.temperature = check_positive("temperature", temperature)
        self.num_negatives = check_int("num_negatives", num_negatives)
        self.bank_momentum = check_momentum("bank_momentum", bank_momentum)
        self.gather_distributed = gather_distributed
        self.backbone, self.feat_dim = build_backbone(backbone, **(backbone_args or {}))
        self.proj = nn.Linear(self.feat_dim, check_int("proj_dim", proj_dim))
        self.memory = MemoryBank(num_samples, proj_dim)
        self.register_buffer("partition", torch.zeros(()))  # NCE's Z; 0: not estimated yet

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """v = normalize(W f(x)), float32: (N, C, H, W) -> (N, proj_dim)."""
        return F.normalize(self.proj(self.backbone(x)).float(), dim=1)

    def draw_negatives(self, index: torch.Tensor) -> torch.Tensor:
        """(N, num_negatives) indices, uniform over the bank without each row's own index."""
        neg = torch.randint(0, self.num_samples - 1, (index.shape[0], self.num_negatives), device=index.device)
        return neg + (neg >= index[:, None]).long()

    def _check_index(self, index: torch.Tensor | None, n: int) -> torch.Tensor:
        if index is None:
            raise ValueError("instdisc: forward needs index= (each sample's position in the training split)")
        if index.shape != (n,) or index.dtype.is_floating_point or index.dtype == torch.bool:
            raise ValueError(f"instdisc: index must be {n} integers, got {index.dtype} {tuple(index.shape)}")
        if n and int(index.min()) < 0:
            raise ValueError(
                "instdisc: sample index -1: the training stream does not number its samples "
                "(it needs the shard manifest's counts)"
            )
        self.memory.check_index(index)  # >= num_samples: a bank of the wrong size
        return index

    def forward(
        self,
        views: list[torch.Tensor],
        index: torch.Tensor | None = None,  # type: ignore[override]
        negatives: torch.Tensor | None = None,
    ) -> StepOutput:
        """``views``: one (N, C, H, W) view; ``index``: (N,) positions in the training split;
        ``negatives``: (N, k) bank indices to use instead of random draws (tests)."""
        (x,) = views
        index = self._check_index(index, x.shape[0])
        if negatives is None:
            negatives = self.draw_negatives(index)
        elif negatives.dim() != 2 or negatives.shape[0] != x.shape[0]:
            raise ValueError(f"instdisc: negatives must be ({x.shape[0]}, k), got {tuple(negatives.shape)}")
        else:
            self.memory.check_index(negatives)
        v = self.embed(x)  # (N, D)
        with torch.autocast(v.device.type, enabled=False):  # similarities in float32 under bf16 autocast
            pos_sim = (v * self.memory(index)).sum(1)  # (N,)
            neg_sim = torch.einsum("nd,nkd->nk", v, self.memory(negatives))  # (N, k)
            if self.loss_kind == "nce":
                loss, pos_prob = nce_loss(
                    pos_sim,
                    neg_sim,
                    temperature=self.temperature,
                    partition=self._partition(neg_sim),
                    num_samples=self.num_samples,
                )
            else:
                loss, pos_prob = bank_info_nce_loss(pos_sim, neg_sim, temperature=self.temperature)
        if self.training:  # after the loss: this step's positives are the entries from before it
            self._update_bank(index, v.detach())
        return StepOutput(
            loss=loss,
            metrics={"train/loss": loss.detach(), "train/pos_prob": pos_prob, "train/pos_sim": pos_sim.detach().mean()},
        )

    @torch.no_grad()
    def _partition(self, neg_sim: torch.Tensor) -> torch.Tensor:
        """Z: the stored estimate, or (first batch) a new one, stored in training mode."""
        if self.partition > 0:
            return self.partition
        z = estimate_partition(neg_sim, self.temperature, self.num_samples)
        if self.gather_distributed:
            z = distributed.all_reduce_mean(z)
        if self.training:
            self.partition.copy_(z)
        return z

    @torch.no_grad()
    def _update_bank(self, index: torch.Tensor, v: torch.Tensor) -> None:
        self.memory.update(index, v, self.bank_momentum, gather=self.gather_distributed)

    @classmethod
    def smoke_kwargs(cls) -> dict:
        return {**super().smoke_kwargs(), "num_samples": 64, "num_negatives": 16, "proj_dim": 8}
