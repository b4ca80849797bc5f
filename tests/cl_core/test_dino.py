"""DINO: the loss against a loop over view pairs, centering and sharpening, the teacher
EMA, the weight-normalised last layer and its freezing, ResNet/ViT backbones with local
crops, and two gloo processes with batch B each == one process with 2B (center, loss,
gradients, teacher)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from cl_core.losses.dino import batch_center, dino_loss
from cl_core.methods.dino import DINO
from cl_core.models.dino_head import DINOHead
from cl_core.models.momentum import cosine_momentum, momentum_copy
from tests.gloo import run_workers


def _views(n: int, seed: int, n_local: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(n, 3, 8, 8, generator=g) for _ in range(n_local)
    ]


def _small(**kw) -> DINO:
    torch.manual_seed(0)
    return DINO(gather_distributed=False, **{**DINO.smoke_kwargs(), **kw})


def _teacher_out(m: DINO, views: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return m.teacher_head(m.teacher_backbone(torch.cat(views[:2]))).reshape(2, views[0].shape[0], -1)


def _student_out(m: DINO, views: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        h = (
            torch.cat([m.backbone(torch.cat(views[:2])), m.backbone(torch.cat(views[2:]))])
            if len(views) > 2
            else m.backbone(torch.cat(views))
        )
        return m.head(h).reshape(len(views), views[0].shape[0], -1)


# ---- loss ---------------------------------------------------------------------------


def _dino_loop(s: torch.Tensor, t: torch.Tensor, c: torch.Tensor, ts: float, tt: float) -> float:
    v, b, k = s.shape
    total, pairs = 0.0, 0
    for a in range(t.shape[0]):
        for w in range(v):
            if w == a:
                continue
            ce = 0.0
            for n in range(b):
                tl = [(float(t[a, n, j]) - float(c[j])) / tt for j in range(k)]
                tz = sum(math.exp(x) for x in tl)
                sl = [float(s[w, n, j]) / ts for j in range(k)]
                lse = math.log(sum(math.exp(x) for x in sl))
                ce -= sum(math.exp(tl[j]) / tz * (sl[j] - lse) for j in range(k))
            total += ce / b
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("n_views", [2, 5])
def test_dino_loss_matches_loop_over_view_pairs(n_views):
    g = torch.Generator().manual_seed(0)
    s, t, c = torch.randn(n_views, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g), torch.randn(6, generator=g)
    loss, p_t = dino_loss(s, t, c, 0.1, 0.04)
    assert loss.item() == pytest.approx(_dino_loop(s, t, c, 0.1, 0.04), rel=1e-5)
    torch.testing.assert_close(p_t.sum(-1), torch.ones(2, 3))


def test_forward_is_the_dino_loss_of_student_and_centered_teacher():
    m = _small()
    m.center.copy_(torch.randn(m.out_dim) * 0.1)
    m.set_progress(3, 10)
    views = _views(4, 0)
    s, t = _student_out(m, views), _teacher_out(m, views)
    ref, p_t = dino_loss(s, t, m.center.clone(), m.student_temp, m.teacher_temperature())
    out = m(views)
    torch.testing.assert_close(out.loss, ref)
    h = -(p_t * p_t.log()).sum(-1).mean()
    torch.testing.assert_close(out.metrics["train/teacher_entropy"], h)
    torch.testing.assert_close(out.metrics["train/kl"], ref - h)
    assert out.metrics["train/kl"] >= -1e-6
    assert out.metrics["train/teacher_temp"].item() == pytest.approx(m.teacher_temperature())
    assert out.metrics["train/momentum"].item() == pytest.approx(cosine_momentum(0.996, 3, 10))


def test_head_logits_are_float32_under_bf16_autocast():
    head = DINOHead(8, out_dim=64, hidden_dim=16, bottleneck_dim=8)
    h = torch.randn(12, 8, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(h)
        z = torch.nn.functional.normalize(head.mlp(h).float(), dim=-1)  # the MLP may run in bf16
        rounded = head.last_layer(z)  # what autocast alone would give for the last layer
    exact = head.last_layer(z)  # autocast off: float32
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, exact)
    assert (rounded.float() - exact).abs().max() / 0.04 > 1e-3  # after the teacher temperature


# ---- centering and sharpening ----------------------------------------------------------


def test_center_update_is_ema_of_the_teacher_batch_mean():
    m = _small()
    c0 = torch.randn(m.out_dim)
    m.center.copy_(c0)
    views = _views(4, 1)
    t = _teacher_out(m, views)
    m(views)
    torch.testing.assert_close(m.center, 0.9 * c0 + 0.1 * t.reshape(-1, m.out_dim).mean(0))
    torch.testing.assert_close(batch_center(t), t.reshape(-1, m.out_dim).mean(0))
    m.eval()
    before = m.center.clone()
    m(views)
    torch.testing.assert_close(m.center, before)  # evaluation leaves the center alone


def test_teacher_temperature_schedule():
    m = _small(teacher_temp_warmup=0.3)
    expected = {0: 0.04, 15: 0.055, 29: 0.04 + 0.03 * 29 / 30, 30: 0.07, 80: 0.07, 100: 0.07}
    for step, temp in expected.items():
        m.set_progress(step, 100)
        assert m.teacher_temperature() == pytest.approx(temp)
    m = _small(teacher_temp_warmup=0.0)
    m.set_progress(0, 100)
    assert m.teacher_temperature() == pytest.approx(0.07)
    # the loss sharpens with the current temperature: a colder teacher has lower entropy
    views = _views(4, 2)
    m = _small(teacher_temp_warmup=0.5).eval()
    m.set_progress(0, 10)
    cold = m(views).metrics["train/teacher_entropy"]
    m.set_progress(9, 10)
    warm = m(views).metrics["train/teacher_entropy"]
    assert cold < warm


# ---- teacher, last layer ---------------------------------------------------------------


def test_teacher_is_an_ema_with_cosine_momentum():
    m = _small(freeze_last_layer_steps=0)
    student = dict(m.backbone.named_parameters()) | {f"h.{k}": v for k, v in m.head.named_parameters()}
    teacher = dict(m.teacher_backbone.named_parameters()) | {f"h.{k}": v for k, v in m.teacher_head.named_parameters()}
    assert student.keys() == teacher.keys()  # the EMA covers the same tensors
    assert all(torch.equal(student[k], teacher[k]) for k in student)  # the teacher starts as the student
    assert not any(p.requires_grad for p in teacher.values())
    opt = torch.optim.SGD(m.param_groups(0.0), lr=0.5)
    m.set_progress(2, 10)
    m(_views(4, 3)).loss.backward()
    m.before_optimizer_step(2, 10)
    opt.step()
    t_before = {k: v.clone() for k, v in teacher.items()}
    m.after_optimizer_step(2, 10)
    mom = cosine_momentum(0.996, 2, 10)
    for k in student:
        torch.testing.assert_close(teacher[k], mom * t_before[k] + (1 - mom) * student[k])


def test_last_layer_unit_rows_frozen_then_trained():
    m = _small(freeze_last_layer_steps=2)
    last = m.head.last_layer
    assert [n for n, _ in last.named_parameters()] == ["weight_v"]  # g is the constant 1
    torch.testing.assert_close(last.weight().norm(dim=1), torch.ones(m.out_dim))
    opt = torch.optim.SGD(m.param_groups(1e-4), lr=0.5, momentum=0.9)
    for step in range(4):
        before = last.weight_v.detach().clone()
        m.set_progress(step, 4)
        loss = m(_views(4, step)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert last.weight_v.grad is not None
        m.before_optimizer_step(step, 4)
        assert (last.weight_v.grad is None) == (step < 2)
        opt.step()
        m.after_optimizer_step(step, 4)
        assert torch.equal(last.weight_v, before) == (step < 2)
        torch.testing.assert_close(last.weight().norm(dim=1), torch.ones(m.out_dim))


def test_learned_norm_variant_and_state_dict_round_trip():
    m = _small(norm_last_layer=False)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {"head.last_layer.weight_v", "head.last_layer.weight_g"} <= names
    assert "teacher_head.last_layer.weight_g" in m.state_dict()
    m.head.last_layer.weight_g.data.mul_(2.0)
    n = _small(norm_last_layer=False)
    n.load_state_dict(m.state_dict())
    h = torch.randn(5, m.feat_dim)
    torch.testing.assert_close(n.head(h), m.head(h))
    torch.testing.assert_close(n.head.last_layer.weight().norm(dim=1), torch.full((m.out_dim,), 2.0))


@pytest.mark.parametrize(
    "backbone,args",
    [
        ("vit_tiny", {"image_size": 16, "patch_size": 4, "depth": 1}),
        ("vit_small", {"image_size": 16, "patch_size": 4, "depth": 1}),
        ("resnet18", {}),
        ("small_cnn", {"width": 4}),
    ],
)
def test_backbones_with_local_crops(backbone, args):
    torch.manual_seed(0)
    m = DINO(
        backbone,
        backbone_args=args,
        gather_distributed=False,
        out_dim=32,
        hidden_dim=32,
        bottleneck_dim=16,
        freeze_last_layer_steps=0,
    )
    opt = torch.optim.SGD(m.param_groups(1e-4), lr=0.05)
    views = _views(2, 4, n_local=4)
    m.set_progress(0, 2)
    out = m(views)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    first = m.backbone.patch_embed if backbone.startswith("vit") else next(m.backbone.children())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in first.parameters())
    if backbone.startswith("vit"):
        assert m.backbone.pos_embed.grad is not None  # interpolated for the 8 px crops, still trained
    m.before_optimizer_step(0, 2)
    opt.step()
    m.after_optimizer_step(0, 2)
    assert torch.isfinite(m(views).loss)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"out_dim": 1}, "out_dim"),
        ({"student_temp": 0.0}, "student_temp"),
        ({"teacher_temp_warmup": 1.5}, "teacher_temp_warmup"),
        ({"center_momentum": 1.0}, "center_momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"freeze_last_layer_steps": -1}, "freeze_last_layer_steps"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DINO(**{**DINO.smoke_kwargs(), **kwargs})


# ---- two gloo processes ---------------------------------------------------------------

B, WORLD, STEPS = 3, 2, 2


def _toy_dino(gather_distributed: bool = True) -> DINO:
    """DINO with a conv encoder without batch norm (the head has none), so the per-worker
    passes equal one pass over the global batch."""
    torch.manual_seed(0)
    m = DINO(
        "small_cnn",
        backbone_args={"width": 2},
        gather_distributed=gather_distributed,
        out_dim=16,
        hidden_dim=16,
        bottleneck_dim=8,
        freeze_last_layer_steps=1,
    )
    m.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    m.feat_dim = 4
    m.head = DINOHead(4, 16, 16, 8)
    m.teacher_backbone, m.teacher_head = momentum_copy(m.backbone), momentum_copy(m.head)
    return m


def _run_toy(model: nn.Module, method: DINO, rows: slice) -> dict:
    opt = torch.optim.SGD(method.param_groups(1e-4), lr=0.5, momentum=0.9)
    losses, grads, centers = [], [], []
    for step in range(STEPS):
        views = [v[rows] for v in _views(B * WORLD, 100 + step)]
        method.set_progress(step, STEPS)
        loss = model(views).loss
        centers.append(method.center.clone())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        method.before_optimizer_step(step, STEPS)
        grads.append([None if p.grad is None else p.grad.clone() for p in method.parameters() if p.requires_grad])
        opt.step()
        method.after_optimizer_step(step, STEPS)
        mean = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        losses.append(mean.item())
    return {
        "losses": losses,
        "grads": grads,
        "centers": centers,
        "state": {k: v.clone() for k, v in method.state_dict().items()},
    }


def _worker(rank: int, world: int) -> dict:
    rows = slice(rank * B, (rank + 1) * B)
    method = _toy_dino()
    res = _run_toy(nn.parallel.DistributedDataParallel(method), method, rows)
    local = _toy_dino(gather_distributed=False)
    local([v[rows] for v in _views(B * world, 100)])
    res["local_center"] = local.center.clone()
    return res


@pytest.fixture(scope="module")
def two_process_results() -> list[dict]:
    return run_workers(_worker, WORLD)  # once for the whole file


def test_dino_two_processes_equal_one_process_with_global_batch(two_process_results):
    method = _toy_dino()
    ref = _run_toy(method, method, slice(None))
    for rank in range(WORLD):
        r = two_process_results[rank]
        # the center after one step is the single-process center of the global batch
        torch.testing.assert_close(r["centers"][0], ref["centers"][0], rtol=1e-5, atol=1e-7)
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        for step in range(STEPS):
            for g, g_ref in zip(r["grads"][step], ref["grads"][step], strict=True):
                if g_ref is None:
                    assert g is None
                else:
                    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
        for k, v in ref["state"].items():  # student, teacher (EMA) and center
            torch.testing.assert_close(r["state"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    # without gathering, each worker's center is the mean of its own half
    assert not torch.allclose(two_process_results[0]["local_center"], two_process_results[1]["local_center"])
    torch.testing.assert_close(
        (two_process_results[0]["local_center"] + two_process_results[1]["local_center"]) / 2,
        ref["centers"][0],
        rtol=1e-5,
        atol=1e-7,
    )
