import math

import pytest
import torch
from torch import nn

from cl_core.downstream.distill import DistillObjective, distillation_loss


def _reference(student: list[list[float]], teacher: list[list[float]], t: float) -> float:
    """-sum_y softmax(t/T) log softmax(s/T), averaged over rows, with plain math."""
    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        te = [math.exp(v / t) for v in t_row]
        p = [v / sum(te) for v in te]
        log_z = math.log(sum(math.exp(v / t) for v in s_row))
        total += -sum(pi * (si / t - log_z) for pi, si in zip(p, s_row, strict=True))
    return total / len(student)


def test_hand_computed_value_at_temperature_one():
    # teacher uniform over 2 classes, student logits (0, ln 3): log softmax = (ln 1/4, ln 3/4)
    s = torch.tensor([[0.0, math.log(3.0)]])
    t = torch.tensor([[5.0, 5.0]])
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert distillation_loss(s, t, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_temperature_scales_both_distributions():
    # at T = 2 the student's logits (0, 2 ln 3) become (0, ln 3): the same value as above
    s = torch.tensor([[0.0, 2 * math.log(3.0)]])
    t = torch.tensor([[1.0, 1.0]])
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert distillation_loss(s, t, 2.0).item() == pytest.approx(expected, rel=1e-6)
    # a sharp teacher at low T is one-hot: the loss is the student's cross-entropy at T
    s = torch.tensor([[1.0, 0.0, -1.0]])
    t = torch.tensor([[0.0, 3.0, 0.0]])
    ce = -torch.log_softmax(s / 0.01, dim=1)[0, 1].item()
    assert distillation_loss(s, t, 0.01).item() == pytest.approx(ce, rel=1e-4)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0, 4.0])
def test_matches_slow_reference(temperature):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3
    assert distillation_loss(s, t, temperature).item() == pytest.approx(
        _reference(s.tolist(), t.tolist(), temperature), rel=1e-5
    )


def test_minimum_is_at_the_teacher_and_teacher_gets_no_gradient():
    t = torch.randn(4, 3, requires_grad=True)
    s = t.detach().clone().requires_grad_(True)
    loss = distillation_loss(s, t, 0.5)
    loss.backward()
    assert t.grad is None
    assert s.grad.abs().max() < 1e-6  # the gradient (p_s - p_t) / T vanishes at s = t


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), 0.0)
    with pytest.raises(ValueError, match="must predict the same classes"):
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 3), 1.0)


def test_objective_keeps_the_teacher_frozen_in_eval_mode():
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4))
    student = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    obj = DistillObjective(student, teacher, temperature=0.1, alpha=0.5)
    obj.train()
    assert not teacher.training and student.training
    assert all(not p.requires_grad for p in teacher.parameters())
    before = teacher[2].running_mean.clone()
    x = torch.randn(8, 3, 2, 2)
    out = obj([x], torch.full((8,), -1), ([x], torch.arange(8) % 4))
    out.loss.backward()
    assert torch.equal(teacher[2].running_mean, before)  # eval mode: BN statistics untouched
    assert "train/labeled_ce" in out.metrics
    assert out.loss.item() == pytest.approx(
        out.metrics["train/distill_loss"].item() + 0.5 * out.metrics["train/labeled_ce"].item()
    )


def test_a_self_distilled_student_can_start_from_the_teachers_or_the_pretrained_encoder():
    """``distill.init``: the student's backbone is a copy of the start's (its linear layer
    stays new); a student of another architecture is a one-line error naming the fix."""
    from cl_core.downstream import build_classifier, classifier_from_pretrained
    from cl_core.methods import get_method
    from pipelines.config import DistillConfig
    from pipelines.stages.distill import check_init, init_student, student_spec
    from pipelines.stages.finetune import teacher_spec

    torch.manual_seed(0)
    method = get_method("simclr")(
        backbone="small_cnn", backbone_args={"width": 8, "in_channels": 1}, gather_distributed=False
    )
    record = {"method": "simclr", "kwargs": {"backbone": "small_cnn", "backbone_args": {"width": 8, "in_channels": 1}}}
    t_spec = teacher_spec(record, 10, 1)
    teacher = classifier_from_pretrained(method, t_spec)
    for src in (teacher.backbone, method.encoder()):
        student = build_classifier(student_spec(t_spec, 10, DistillConfig()))
        fc = student.fc.weight.clone()
        check_init(DistillConfig(init="teacher"), student, src, "the teacher")
        init_student(student, src)
        assert all(
            torch.equal(a, b)
            for a, b in zip(student.backbone.state_dict().values(), src.state_dict().values(), strict=True)
        )
        assert torch.equal(student.fc.weight, fc)
    small = DistillConfig(init="teacher", student_width=4)
    student = build_classifier(student_spec(t_spec, 10, small))
    with pytest.raises(
        ValueError,
        match=r"distill.init: 'teacher' starts the student from the teacher, whose "
        r"architecture differs .* set distill.init=scratch",
    ):
        check_init(small, student, teacher.backbone, "the teacher")
