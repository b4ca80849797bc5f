"""Supervised contrastive loss, the L_out form of SupCon [0].

- [0] Khosla et al., Supervised Contrastive Learning, NeurIPS 2020,
  https://arxiv.org/abs/2004.11362 (Eq. 2)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cl_core import distributed


class SupConLoss(nn.Module):
    """SupCon's L_out over every view of a labeled batch.

    With V views of N local samples there are VN anchors (all views are anchors, SupCon's
    "multiviewed batch"). For anchor i, A(i) is every other sample of the batch and P(i)
    the samples of A(i) with the anchor's label (its other views included). The loss is
    the mean over anchors of

        -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / T) / sum_{a in A(i)} exp(z_i.z_a / T) )

    on L2-normalised z. Eq. 2 of [0] sums over anchors; the mean only rescales it by the
    batch size. An anchor without any positive (possible only with V = 1: a label seen once)
    contributes 0 and still counts in the mean over all anchors, as in the authors'
    released code (``mask_pos_pairs`` set to 1 where it is 0); a batch where no anchor of
    any worker has a positive is an error (there is nothing to learn from it).

    With ``gather_distributed`` on W workers, local anchors are compared with the keys and
    labels of all workers (an autograd-correct all_gather for the keys), each anchor's own
    column found by the rank offset, so W workers with N samples each give the loss and
    gradients of one worker with WN samples.

    With all labels distinct and V = 2 this is NT-Xent (SimCLR).

    Args:
        temperature: T > 0 (SupCon [0]: 0.1).
        base_temperature: if set, the loss is multiplied by ``T / base_temperature`` (the
            scaling of the authors' released code, base 0.07); None (default) keeps Eq. 2
            unscaled.
        gather_distributed: keys and labels from all workers when a process group is
            initialised.
    """

    def __init__(
        self, temperature: float = 0.1, base_temperature: float | None = None, gather_distributed: bool = True
    ) -> None:
        super().__init__()
        for name, value in (("temperature", temperature), ("base_temperature", base_temperature)):
            if name == "base_temperature" and value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"SupConLoss: {name} must be a finite number > 0, got {value!r}")
        self.temperature = float(temperature)
        self.base_temperature = None if base_temperature is None else float(base_temperature)
        self.gather_distributed = gather_distributed

    def forward(self, views: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """``views``: V >= 1 tensors (N, D), view v of sample n at row n; ``labels``: (N,) ints."""
        if len(views) < 1 or any(v.dim() != 2 or v.shape != views[0].shape for v in views):
            raise ValueError(
                f"SupConLoss: expected V >= 1 tensors (N, D) of equal shape, got {[tuple(v.shape) for v in views]}"
            )
        n, n_views = views[0].shape[0], len(views)
        if labels.shape != (n,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"SupConLoss: labels must be integers of shape ({n},), got {labels.dtype} {tuple(labels.shape)}"
            )
        z = [F.normalize(v.float(), dim=1) for v in views]
        gathered = self.gather_distributed and distributed.world_size() > 1
        if gathered:
            keys_per_view = [distributed.gather(zv) for zv in z]  # V x (WN, D)
            key_labels = distributed.gather_nograd(labels)  # (WN,)
            r = distributed.rank()
        else:
            keys_per_view, key_labels, r = z, labels, 0
        wn = key_labels.shape[0]
        if n_views * wn < 2:
            raise ValueError("SupConLoss: needs at least 2 samples (views x batch) to have a denominator")

        dev = z[0].device
        anchors = torch.cat(z)  # (VN, D), view-major
        keys = torch.cat(keys_per_view)  # (VWN, D), view-major
        with torch.autocast(dev.type, enabled=False):  # float32 logits under bf16 autocast
            logits = anchors @ keys.T / self.temperature  # (VN, VWN), one matmul
        rows = torch.arange(n_views * n, device=dev)
        # anchor (v, j) is key column v * WN + r * N + j
        self_col = (
            torch.arange(n_views, device=dev)[:, None] * wn + r * n + torch.arange(n, device=dev)[None, :]
        ).reshape(-1)
        logits = logits.index_put((rows, self_col), torch.tensor(float("-inf"), device=dev))  # A(i) excludes i
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)

        positive = labels.repeat(n_views)[:, None] == key_labels.repeat(n_views)[None, :]  # (VN, VWN)
        positive = positive.index_put((rows, self_col), torch.tensor(False, device=dev))
        n_pos = positive.sum(1)
        per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(1) / n_pos.clamp(min=1)  # 0 without positives
        if n_views == 1:  # with two views or more every anchor has its other views as positives
            valid = (n_pos > 0).float().sum()
            total = distributed.all_reduce_sum_(valid.clone()) if gathered else valid
            if not total > 0:
                raise ValueError(
                    "SupConLoss: no anchor has a positive (every label appears once and there is one "
                    "view); use two views or batches with repeated labels"
                )
        loss = per_anchor.mean()  # every worker has N anchors: DDP's mean over workers is the global mean
        if self.base_temperature is not None:
            loss = loss * (self.temperature / self.base_temperature)
        return loss
