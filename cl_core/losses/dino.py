"""DINO's self-distillation loss with a centered, sharpened teacher [0].

- [0] Caron et al., Emerging Properties in Self-Supervised Vision Transformers, 2021,
  https://arxiv.org/abs/2104.14294 (Sec. 3.1, Eq. 2-4 and Algorithm 1)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cl_core import distributed


def dino_loss(
    student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, student_temp: float, teacher_temp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross entropy between the teacher's and the student's distributions over view pairs.

    For every teacher (global) view ``a`` and every student view ``b != a``, the mean
    over the batch of ``H(P_t^a, P_s^b) = -sum_k P_t^a log P_s^b`` with
    ``P_t = softmax((t - center) / teacher_temp)`` (centering and sharpening, no
    gradient) and ``log P_s = log_softmax(s / student_temp)``; the loss averages over
    the pairs. The teacher's views are the first ``A`` student views.

    Args:
        student: (V, B, K) student outputs of all views.
        teacher: (A, B, K) teacher outputs of the A global views, A <= V.
        center: (K,) or (1, K) running center of the teacher outputs.

    Returns:
        ``(loss, teacher_probs)`` with teacher_probs (A, B, K) (for diagnostics).
    """
    if student.dim() != 3 or teacher.dim() != 3 or teacher.shape[1:] != student.shape[1:]:
        raise ValueError(
            f"dino_loss: expected (V, B, K) student and (A, B, K) teacher outputs, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    v, b, _ = student.shape
    a = teacher.shape[0]
    if not 1 <= a <= v or v < 2:
        raise ValueError(f"dino_loss: needs >= 2 student views and 1..V teacher views, got V={v}, A={a}")
    with torch.autocast(student.device.type, enabled=False):  # float32 even under bf16 autocast
        p_t = F.softmax((teacher.detach().float() - center.float().reshape(1, 1, -1)) / teacher_temp, dim=-1)
        log_p_s = F.log_softmax(student.float() / student_temp, dim=-1)
        ce = -torch.einsum("abk,vbk->av", p_t, log_p_s) / b  # (A, V): one contraction over (b, k)
    mask = torch.ones(a, v, dtype=torch.bool, device=ce.device)
    mask[torch.arange(a), torch.arange(a)] = False  # a view is never its own target
    return (ce * mask).sum() / mask.sum(), p_t


@torch.no_grad()
def batch_center(teacher: torch.Tensor, gather_distributed: bool = True) -> torch.Tensor:
    """Mean (K,) of the teacher outputs ``teacher`` (..., K) over the global batch: the
    sums and counts are all-reduced over workers with ``gather_distributed``."""
    t = teacher.detach().float().reshape(-1, teacher.shape[-1])
    sums = torch.cat([t.sum(dim=0), t.new_full((1,), float(t.shape[0]))])  # K sums and the row count
    if gather_distributed:
        distributed.all_reduce_sum_(sums)  # one all-reduce for both
    return sums[:-1] / sums[-1]
