"""Memory-bank objectives of instance discrimination [0]: noise-contrastive estimation of
the non-parametric softmax with a fixed normaliser, and its softmax (InfoNCE [1]) form.

Both take the cosine similarities of each sample's feature v with its own bank entry
(the positive) and with m bank entries drawn as negatives.

- [0] Wu et al., Unsupervised Feature Learning via Non-Parametric Instance
  Discrimination, CVPR 2018, https://arxiv.org/abs/1805.01978 (Sec. 3.2, Eq. 5-7)
- [1] van den Oord et al., Representation Learning with Contrastive Predictive Coding,
  2018, https://arxiv.org/abs/1807.03748
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def estimate_partition(neg_sim: torch.Tensor, temperature: float, num_samples: int) -> torch.Tensor:
    """Monte Carlo estimate of Z = sum_j exp(v_j.v / T) over the n = ``num_samples`` bank
    entries from uniformly drawn ones (Eq. 7 of [0]): n times the mean of exp(s / T) over
    every sample and negative of ``neg_sim`` (N, m). A detached scalar."""
    return (neg_sim.detach().float() / temperature).exp().mean() * num_samples


def nce_loss(
    pos_sim: torch.Tensor,
    neg_sim: torch.Tensor,
    *,
    temperature: float,
    partition: torch.Tensor | float,
    num_samples: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NCE of [0] (Eq. 5-6) with noise distribution P_n = 1/n, n = ``num_samples``.

    P(i|v) = exp(s_i / T) / Z with the fixed normaliser Z = ``partition``; a sample is
    from the data with posterior h(i, v) = P(i|v) / (P(i|v) + m P_n). Per sample the loss
    is -log h(positive) - sum over the m negatives of log(1 - h(negative)), averaged over
    the batch. Computed in log space (softplus) so small P(i|v) do not underflow.

    Args:
        pos_sim: (N,) cosine similarity of each v with its own bank entry.
        neg_sim: (N, m) with the m noise entries.

    Returns:
        (loss, mean h of the positives) -- the second detached.
    """
    m = neg_sim.shape[1]
    log_z = torch.log(torch.as_tensor(partition, dtype=torch.float32, device=pos_sim.device))
    log_m_pn = math.log(m / num_samples)  # log(m * P_n)
    a_pos = pos_sim.float() / temperature - log_z  # log P(i|v)
    a_neg = neg_sim.float() / temperature - log_z
    # -log h = log(1 + m P_n / P) = softplus(log m P_n - log P); -log(1 - h) = softplus(log P - log m P_n)
    loss = (F.softplus(log_m_pn - a_pos) + F.softplus(a_neg - log_m_pn).sum(1)).mean()
    pos_prob = torch.sigmoid(a_pos - log_m_pn).mean()  # h(i, v) of the positives
    return loss, pos_prob.detach()


def bank_info_nce_loss(
    pos_sim: torch.Tensor, neg_sim: torch.Tensor, *, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of a softmax over [positive, m negatives] at temperature T.

    Returns:
        (loss, mean softmax probability of the positive) -- the second detached.
    """
    logits = torch.cat([pos_sim[:, None], neg_sim], dim=1).float() / temperature  # (N, 1 + m)
    log_p = F.log_softmax(logits, dim=1)[:, 0]
    return -log_p.mean(), log_p.detach().exp().mean()
