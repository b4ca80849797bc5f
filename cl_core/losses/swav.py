"""SwAV's online codes (Sinkhorn-Knopp) and its swapped prediction loss [0].

- [0] Caron et al., Unsupervised Learning of Visual Features by Contrasting Cluster
  Assignments, 2020, https://arxiv.org/abs/2006.09882 (Sec. 3.1, Eq. 2-3; App. A.1
  for the distributed Sinkhorn and the queue)
- [1] Cuturi, Sinkhorn Distances: Lightspeed Computation of Optimal Transport, 2013,
  https://arxiv.org/abs/1306.0895
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cl_core import distributed


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    *,
    extra: torch.Tensor | None = None,
    gather_distributed: bool = True,
) -> torch.Tensor:
    """Equipartitioned soft codes of a batch over K prototypes (SwAV [0] Eq. 3).

    Starting from ``Q = exp(scores / epsilon)`` (K prototypes x B samples), each
    iteration rescales the rows so that every prototype holds 1/K of the mass, then the
    columns so that every sample holds 1/B. ``B`` is the global batch: with
    ``gather_distributed`` on W workers the row sums (and the total) are all-reduced,
    so W workers with B/W samples each compute the same codes as one worker with the
    whole batch, while only K numbers per iteration cross the network.

    Args:
        scores: (B_local, K) prototype scores z . c of this worker's samples.
        epsilon: entropic regularisation (smaller: sharper codes).
        iterations: Sinkhorn iterations (SwAV: 3).
        extra: optional (L, K) scores of samples every worker holds identically (SwAV's
            queue of past embeddings, gathered from all workers): they take part in the
            marginals once (no all-reduce), and their codes are dropped.
        gather_distributed: all-reduce the marginals over workers.

    Returns:
        (B_local, K) float32 codes, each row summing to 1 (the paper's ``Q * B``).
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn: expected (B, K) scores, got shape {tuple(scores.shape)}")
    if extra is not None and (extra.dim() != 2 or extra.shape[1] != scores.shape[1]):
        raise ValueError(f"sinkhorn: extra scores must be (L, {scores.shape[1]}), got {tuple(extra.shape)}")
    reduce = gather_distributed and distributed.world_size() > 1
    s = scores.detach().float()
    e = extra.detach().float() if extra is not None else s.new_zeros(0, s.shape[1])
    k = s.shape[1]
    n_total = s.shape[0] * (distributed.world_size() if reduce else 1) + e.shape[0]

    # a constant shift common to all workers: it cancels in the first normalisation and keeps
    # exp() finite for any scale of scores
    shift = torch.cat([s.flatten(), e.flatten()]).max() if s.numel() + e.numel() else s.new_zeros(())
    if reduce:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    q = torch.exp((s - shift) / epsilon).T  # (K, B_local)
    qe = torch.exp((e - shift) / epsilon).T  # (K, L)

    def row_sums(dim: int | None) -> torch.Tensor:
        local = q.sum() if dim is None else q.sum(dim=1)
        if reduce:
            distributed.all_reduce_sum_(local)
        return local + (qe.sum() if dim is None else qe.sum(dim=1))

    tiny = torch.finfo(q.dtype).tiny
    total = row_sums(None).clamp_min(tiny)
    q, qe = q / total, qe / total
    for _ in range(iterations):
        r = (row_sums(1).clamp_min(tiny) * k)[:, None]  # every prototype gets 1/K of the mass
        q, qe = q / r, qe / r
        q = q / (q.sum(dim=0, keepdim=True).clamp_min(tiny) * n_total)  # every sample 1/B
        qe = qe / (qe.sum(dim=0, keepdim=True).clamp_min(tiny) * n_total)
    return (q * n_total).T.contiguous()


def swapped_prediction_loss(scores: torch.Tensor, codes: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SwAV's swapped prediction [0, Eq. 1-2] over multi-crop views.

    For every view ``i`` with a code (the first ``A`` views, the global ones) and every
    other view ``v != i`` (all ``V`` views, local ones included), the cross entropy
    ``-sum_k q_i^k log softmax(scores_v / T)^k``, averaged over the batch; the loss
    averages over the ``V - 1`` predicting views of each code, then over the ``A``
    codes (as SwAV's code does).

    Args:
        scores: (V, B, K) prototype scores of every view (gradients flow through them).
        codes: (A, B, K) codes of the first A views (no gradient), A <= V.
        temperature: T of the prediction softmax.
    """
    if scores.dim() != 3 or codes.dim() != 3 or codes.shape[1:] != scores.shape[1:]:
        raise ValueError(
            f"swapped_prediction_loss: expected (V, B, K) scores and (A, B, K) codes, got "
            f"{tuple(scores.shape)} and {tuple(codes.shape)}"
        )
    v, b, _ = scores.shape
    a = codes.shape[0]
    if not 1 <= a <= v or v < 2:
        raise ValueError(f"swapped_prediction_loss: needs >= 2 views and 1..V codes, got V={v}, A={a}")
    log_p = F.log_softmax(scores.float() / temperature, dim=-1)  # (V, B, K)
    # ce[i, w] = mean_b -sum_k q_i log p_w: one contraction over (b, k)
    with torch.autocast(log_p.device.type, enabled=False):  # float32 even under bf16 autocast
        ce = -torch.einsum("abk,vbk->av", codes.float(), log_p) / b  # (A, V)
    mask = torch.ones(a, v, dtype=torch.bool, device=ce.device)
    mask[torch.arange(a), torch.arange(a)] = False  # a code is never predicted from its own view
    return (ce * mask).sum() / mask.sum()
