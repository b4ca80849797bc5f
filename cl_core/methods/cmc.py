"""CMC: Contrastive Multiview Coding [0], with the L / ab split of CIE Lab as the views.

The data stream gives one augmented RGB image per sample (ImageNet-normalised). The
method undoes the normalisation, converts to CIE L*a*b* (D65) and rescales every channel
from its sRGB-gamut range to [-1, 1] (:mod:`cl_core.models.color`, as CMC's code
normalises its Lab images), then splits the channels into groups (default L and ab).
Each group has its own encoder, a linear projection to 128 dims and L2 normalisation;
the loss contrasts the groups' embeddings of the same image against those of other
images, in both directions. With more than two groups it is CMC's full graph: the sum
over all ordered pairs of groups.

Two objectives: ``in_batch`` (negatives: the other images of the global batch, gathered
from all workers with gradient) and ``memory_bank`` (CMC's setup: one memory bank per
view holding an EMA of every training image's embedding; positives and ``num_negatives``
random negatives are read from the other view's bank, which is then updated with the
batch's embeddings; needs the sample index and the structural ``num_samples``). CMC
itself trains with the bank; ``in_batch`` is the default here because it needs neither
the index nor the split's size. The bank is always filled with the embeddings of every
worker (so all workers hold the same bank), whatever ``gather_distributed`` says.

- [0] Tian, Krishnan, Isola. Contrastive Multiview Coding, 2019,
  https://arxiv.org/abs/1906.05849 (the two-view and full-graph losses, the memory bank;
  the L / ab views of its ImageNet experiments)
- [1] Wu et al., Unsupervised Feature Learning via Non-Parametric Instance
  Discrimination, 2018, https://arxiv.org/abs/1805.01978 (memory bank, Eq. 8)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from cl_core.errors import HyperparameterError
from cl_core.losses.multiview_nce import CrossViewInfoNCE, bank_infonce
from cl_core.methods.base import (
    Method,
    StepOutput,
    check_int,
    check_momentum,
    check_positive,
    register,
)
from cl_core.models import build_backbone
from cl_core.models.color import NormalizedRGBToLab
from cl_core.models.memory import MemoryBank

OBJECTIVES = ("in_batch", "memory_bank")


def validate_channel_split(split: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """At least two non-empty, disjoint groups of Lab channel indices (0 = L, 1 = a, 2 = b)."""
    example = "e.g. [[0], [1, 2]] for L and ab"
    if isinstance(split, (str, bytes)) or not isinstance(split, Sequence) or len(split) < 2:
        raise HyperparameterError(
            "channel_split", f"must be a list of at least 2 channel groups, {example}; got {split!r}"
        )
    groups = []
    for g in split:
        if isinstance(g, (str, bytes)) or not isinstance(g, Sequence) or len(g) == 0:
            raise HyperparameterError(
                "channel_split", f"every group must be a non-empty list of channel indices, {example}; got {split!r}"
            )
        for c in g:
            if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c <= 2:
                raise HyperparameterError(
                    "channel_split", f"channel indices must be integers in 0..2 (L, a, b), got {c!r} in {split!r}"
                )
        groups.append(tuple(g))
    flat = [c for g in groups for c in g]
    if len(flat) != len(set(flat)):
        raise HyperparameterError("channel_split", f"groups must be disjoint (no channel twice), got {split!r}")
    return tuple(groups)


class LabViewEncoder(nn.Module):
    """Normalised RGB images -> scaled Lab -> one encoder per channel group.

    ``views(x)`` gives the list of per-group features; ``forward(x)`` their
    concatenation (N, sum of the groups' feature dims), CMC's image representation.
    """

    def __init__(
        self, encoders: Sequence[nn.Module], groups: Sequence[Sequence[int]], feat_dims: Sequence[int]
    ) -> None:
        super().__init__()
        self.to_lab = NormalizedRGBToLab()
        self.encoders = nn.ModuleList(encoders)
        self.groups = [list(g) for g in groups]
        self.feat_dims = list(feat_dims)

    def views(self, x: torch.Tensor) -> list[torch.Tensor]:
        lab = self.to_lab(x)
        return [enc(lab[:, g]) for enc, g in zip(self.encoders, self.groups, strict=True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.views(x), dim=1)


@register("cmc")
class CMC(Method):
    """One encoder per Lab channel group, linear projections to ``proj_dim`` (L2-normalised),
    cross-view InfoNCE summed over both directions of every pair of groups.

    Args:
        backbone: name for :func:`cl_core.models.build_backbone`, used for every group;
            ``backbone_args`` its keyword arguments (``in_channels`` is set per group).
        gather_distributed: in-batch negatives from all workers.
        num_samples: training-split size (filled by the pipeline); required by the
            ``memory_bank`` objective.
        channel_split: groups of Lab channel indices (0 = L, 1 = a, 2 = b), one view each.
        proj_dim: embedding dim after the linear projection.
        temperature: softmax temperature of the contrastive loss.
        objective: ``in_batch`` or ``memory_bank``.
        num_negatives: bank entries drawn per anchor (``memory_bank``).
        bank_momentum: m of the bank update ``v <- normalize(m v + (1 - m) z)``.
    """

    # the sweep's default space (sweep.space unset): around CMC's 0.07
    sweep_space: ClassVar[dict[str, list[Any]]] = {"temperature": [0.05, 0.07, 0.1]}

    view_kind = "single"
    backbone: LabViewEncoder

    def __init__(
        self,
        backbone: str = "small_cnn",
        *,
        backbone_args: dict | None = None,
        gather_distributed: bool = True,
        num_samples: int | None = None,
        channel_split: Sequence[Sequence[int]] = ((0,), (1, 2)),  # CMC [0] ImageNet experiments: L and ab of Lab
        proj_dim: int = 128,  # CMC [0]: 128-d embeddings (linear layer, then L2 norm)
        temperature: float = 0.07,  # CMC [0] official code: nce_t = 0.07 for ImageNet (0.1 for STL-10)
        objective: str = "in_batch",  # CMC [0] uses "memory_bank"; in_batch needs no num_samples
        num_negatives: int = 4096,  # CMC [0] official code default nce_k (its ImageNet runs: 16384)
        bank_momentum: float = 0.5,  # CMC [0] official code: nce_m = 0.5 (InstDisc [1] Eq. 8)
    ) -> None:
        super().__init__()
        self.groups = validate_channel_split(channel_split)
        if objective not in OBJECTIVES:
            raise HyperparameterError("objective", f"must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        self.objective = objective
        self.temperature = check_positive("temperature", temperature)
        self.proj_dim = check_int("proj_dim", proj_dim)
        self.num_negatives = check_int("num_negatives", num_negatives)
        self.bank_momentum = check_momentum("bank_momentum", bank_momentum)
        # the engine reads needs_index from the instance: only the bank objective needs the sample index
        self.needs_index = objective == "memory_bank"
        if self.needs_index:
            self.num_samples = check_int("num_samples", num_samples if num_samples is not None else 0, minimum=2)

        encoders, dims = [], []
        for g in self.groups:
            enc, dim = build_backbone(backbone, **{**(backbone_args or {}), "in_channels": len(g)})
            encoders.append(enc)
            dims.append(dim)
        self.backbone = LabViewEncoder(encoders, self.groups, dims)
        self.feat_dim = sum(dims)
        self.heads = nn.ModuleList(nn.Linear(d, proj_dim) for d in dims)
        self.criterion = CrossViewInfoNCE(self.temperature, gather_distributed=gather_distributed)
        self.banks = (
            nn.ModuleList(MemoryBank(self.num_samples, proj_dim) for _ in self.groups)
            if self.needs_index
            else nn.ModuleList()
        )

    def _bank(self, view: int) -> MemoryBank:
        return cast(MemoryBank, self.banks[view])

    def embed(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-group L2-normalised embeddings (float32), each (N, proj_dim)."""
        return [F.normalize(head(h).float(), dim=1) for head, h in zip(self.heads, self.backbone.views(x), strict=True)]

    def forward(self, views: list[torch.Tensor], index: torch.Tensor | None = None) -> StepOutput:
        (x,) = views  # (N, 3, H, W), ImageNet-normalised RGB
        z = self.embed(x)
        n = x.shape[0]
        pairs = list(itertools.permutations(range(len(z)), 2))  # both directions of every pair of views
        if self.objective == "memory_bank":
            if index is None:
                raise ValueError("cmc: the memory_bank objective needs each sample's index (forward(views, index=...))")
            self._bank(0).check_index(index)
            # one random draw of bank rows per step, shared by the views' banks (as CMC's code)
            neg_idx = torch.randint(0, self.num_samples, (n, self.num_negatives), device=x.device)
            results = {
                (i, j): bank_infonce(z[i], self._bank(j)(index), self._bank(j)(neg_idx), self.temperature)
                for i, j in pairs
            }
            if self.training:  # after the loss has read the banks: write this batch's embeddings
                for v, zv in enumerate(z):
                    self._bank(v).update(index, zv.detach(), self.bank_momentum)
        else:
            results = {(i, j): self.criterion(z[i], z[j]) for i, j in pairs}
        loss = torch.stack(
            [r[0] for r in results.values()]
        ).sum()  # CMC [0]: L(V1, V2) = L^{V1,V2} + L^{V2,V1}, summed over pairs
        metrics = {f"train/loss_v{i}_v{j}": r[0].detach() for (i, j), r in results.items()}
        metrics["train/acc"] = torch.stack([r[1] for r in results.values()]).mean()
        metrics["train/z_std"] = torch.stack([zv.detach().std(dim=0).mean() for zv in z]).mean()
        return StepOutput(loss=loss, metrics={"train/loss": loss.detach(), **metrics})

    @classmethod
    def smoke_kwargs(cls) -> dict:
        return {**super().smoke_kwargs(), "proj_dim": 8, "objective": "in_batch"}
