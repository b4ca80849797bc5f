"""Knowledge distillation of a fine-tuned teacher into a student (SimCLRv2 [0], Sec. 2).

The student is trained on unlabeled images to match the teacher's temperature-scaled
class distribution:

    L_distill = - sum_x sum_y P_T(y | x; tau) log P_S(y | x; tau),
    P(y | x; tau) = softmax(logits(x) / tau)

optionally plus ``alpha`` times cross-entropy on the labeled subset. The teacher's
prediction is a constant (no gradient). SimCLRv2 uses tau = 0.1 to self-distill and
tau = 1.0 to distill a big teacher into a smaller student.

- [0] Chen et al., Big Self-Supervised Models are Strong Semi-Supervised Learners,
  2020, https://arxiv.org/abs/2006.10029 (Eq. 2 and 3)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl_core.methods.base import Method, StepOutput


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the batch of the cross-entropy between the teacher's and the student's
    softmax at ``temperature`` (no tau^2 factor: Eq. 2 of SimCLRv2)."""
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: the two models must predict the same classes"
        )
    target = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    return -(target * log_p).sum(dim=1).mean()


class DistillObjective(Method):
    """Student trained to match a frozen teacher on the same augmented view, plus
    ``alpha`` x cross-entropy on a labeled batch when one is given (``aux``).

    The teacher is kept in eval mode (BatchNorm running statistics, no dropout) whatever
    mode the objective is put in, and its parameters never require gradients.
    """

    uses_labels = True  # the loop passes (views, labels, aux); the unlabeled labels are ignored

    def __init__(self, student: nn.Module, teacher: nn.Module, *, temperature: float, alpha: float = 0.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        self.student, self.teacher = student, teacher
        self.feat_dim = getattr(student, "feat_dim", 0)
        self.temperature, self.alpha = temperature, alpha
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def encoder(self) -> nn.Module:
        return getattr(self.student, "backbone", self.student)

    def compile_targets(self) -> list[nn.Module]:
        return [self.student, self.teacher]

    def train(self, mode: bool = True) -> DistillObjective:
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(
        self,
        views: list[torch.Tensor],
        labels: torch.Tensor | None = None,
        aux: tuple[list[torch.Tensor], torch.Tensor] | None = None,
    ) -> StepOutput:
        (x,) = views
        with torch.no_grad():
            t = self.teacher(x)
        s = self.student(x)
        loss = distillation_loss(s, t, self.temperature)
        metrics = {
            "train/distill_loss": loss.detach(),
            "train/agreement": (s.argmax(1) == t.argmax(1)).float().mean().detach(),
        }
        if self.alpha > 0 and aux is not None:
            (xl,), yl = aux
            ce = F.cross_entropy(self.student(xl).float(), yl)
            loss = loss + self.alpha * ce
            metrics["train/labeled_ce"] = ce.detach()
        metrics["train/loss"] = loss.detach()
        return StepOutput(loss=loss, metrics=metrics)
