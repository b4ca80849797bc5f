import math

import pytest
import torch

from cl_core.optim import LARS, build_optimizer, lr_at, scale_lr


def test_warmup_then_cosine():
    kw = dict(total_steps=100, warmup_steps=10, peak_lr=1.0)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(55, **kw) == pytest.approx(0.5)
    assert lr_at(100, **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(200, **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(55, **kw, final_lr=0.2) == pytest.approx(0.6)
    assert lr_at(0, total_steps=10, warmup_steps=0, peak_lr=2.0) == pytest.approx(2.0)


def test_batch_scaling_rules():
    assert scale_lr(0.3, 4096, "linear") == pytest.approx(4.8)  # SimCLR with LARS
    assert scale_lr(1.2, 4096, "sqrt") == pytest.approx(0.075 * math.sqrt(4096))
    assert scale_lr(0.1, 512, "none") == 0.1
    with pytest.raises(ValueError, match="lr scaling"):
        scale_lr(0.1, 256, "cubic")


def _groups():
    w = torch.nn.Parameter(torch.ones(4, 4))
    b = torch.nn.Parameter(torch.ones(4))
    return (
        w,
        b,
        [
            {"params": [w], "weight_decay": 0.1, "lars_exclude": False},
            {"params": [b], "weight_decay": 0.0, "lars_exclude": True},
        ],
    )


def test_lars_trust_ratio_and_exclusion():
    w, b, groups = _groups()
    opt = LARS(groups, lr=1.0, momentum=0.0, weight_decay=0.1, eta=0.001)
    w.grad = torch.full((4, 4), 2.0)
    b.grad = torch.full((4,), 2.0)
    opt.step()
    g = 2.0 + 0.1 * 1.0  # grad + wd * w
    trust = 0.001 * 4.0 / (g * 4.0)  # eta * ||w|| / ||g||, both over 16 equal entries
    torch.testing.assert_close(w.detach(), torch.full((4, 4), 1 - trust * g))
    torch.testing.assert_close(b.detach(), torch.full((4,), 1 - 2.0))  # plain SGD, no decay


def test_lars_momentum_follows_the_barlow_twins_code_while_the_lr_changes():
    """The docstring's placement: v = m v + trust * g, w -= lr * v (the learning rate
    outside the buffer), re-derived step by step over a changing learning rate; SimCLR's
    TF placement (the learning rate inside the buffer) gives other weights."""
    torch.manual_seed(0)
    w0, grads, lrs, m, wd, eta = (
        torch.randn(3, 5),
        [torch.randn(3, 5) for _ in range(4)],
        [0.1, 0.4, 0.2, 0.05],
        0.9,
        1e-3,
        0.01,
    )
    p = torch.nn.Parameter(w0.clone())
    opt = LARS(
        [{"params": [p], "weight_decay": wd, "lars_exclude": False}], lr=lrs[0], momentum=m, weight_decay=wd, eta=eta
    )
    bt, tf = w0.clone(), w0.clone()
    v_bt, v_tf = torch.zeros_like(w0), torch.zeros_like(w0)
    for g, lr in zip(grads, lrs, strict=True):
        for group in opt.param_groups:
            group["lr"] = lr
        p.grad = g.clone()
        opt.step()
        d_bt, d_tf = g + wd * bt, g + wd * tf
        v_bt = m * v_bt + eta * bt.norm() / d_bt.norm() * d_bt
        bt = bt - lr * v_bt
        v_tf = m * v_tf + lr * eta * tf.norm() / d_tf.norm() * d_tf
        tf = tf - v_tf
    torch.testing.assert_close(p.detach(), bt)
    assert not torch.allclose(p.detach(), tf, atol=1e-6)


def test_build_optimizers():
    for name, cls in [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("lars", LARS)]:
        _, _, groups = _groups()
        opt = build_optimizer(name, groups, 0.1, weight_decay=0.1)
        assert isinstance(opt, cls)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    with pytest.raises(ValueError, match="known: sgd, adamw, lars"):
        build_optimizer("adam", _groups()[2], 0.1, weight_decay=0)
    with pytest.raises(ValueError, match="momentum"):
        LARS(_groups()[2], lr=0.1, momentum=1.0)
