import math

import pytest
import torch
import torch.nn.functional as F

from cl_core.losses import NTXentLoss


def reference(z0: torch.Tensor, z1: torch.Tensor, t: float) -> float:
    """Eq. 1 of SimCLR, one anchor at a time."""
    z = F.normalize(torch.cat([z0, z1]).double(), dim=1)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        num = math.exp(float(z[i] @ z[j]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(num / den)
    return total / n2


@pytest.mark.parametrize("n,d,t", [(2, 3, 0.1), (4, 8, 0.5), (7, 16, 1.0), (16, 32, 0.07), (3, 2, 2.0)])
def test_matches_loop_reference(n, d, t):
    g = torch.Generator().manual_seed(n * 100 + d)
    z0, z1 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    assert NTXentLoss(t)(z0, z1).item() == pytest.approx(reference(z0, z1, t), rel=1e-5)


@pytest.mark.parametrize("n", [2, 5, 32])
def test_all_equal_embeddings_give_log_2n_minus_1(n):
    z = torch.ones(n, 4)
    assert NTXentLoss(0.3)(z, z).item() == pytest.approx(math.log(2 * n - 1), rel=1e-6)


def test_symmetric_in_the_two_views():
    z0, z1 = torch.randn(8, 5), torch.randn(8, 5)
    loss = NTXentLoss(0.2)
    assert loss(z0, z1).item() == pytest.approx(loss(z1, z0).item(), rel=1e-6)


def test_invariant_to_scale_and_pair_order():
    z0, z1 = torch.randn(6, 5), torch.randn(6, 5)
    perm = torch.randperm(6)
    loss = NTXentLoss(0.5)
    assert loss(3 * z0, 0.5 * z1).item() == pytest.approx(loss(z0, z1).item(), rel=1e-5)
    assert loss(z0[perm], z1[perm]).item() == pytest.approx(loss(z0, z1).item(), rel=1e-5)


def test_perfect_alignment_gives_low_loss():
    z = torch.eye(8) * 10
    assert NTXentLoss(0.05)(z, z).item() < 1e-3


def test_gradient_flows_to_both_views():
    z0, z1 = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    NTXentLoss(0.5)(z0, z1).backward()
    assert z0.grad.abs().sum() > 0 and z1.grad.abs().sum() > 0


@pytest.mark.parametrize("t", [0, -0.1, float("nan"), float("inf"), "0.5"])
def test_illegal_temperature_raises(t):
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(t)


def test_illegal_shapes_raise():
    with pytest.raises(ValueError, match="equal shape"):
        NTXentLoss(0.5)(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        NTXentLoss(0.5)(torch.randn(1, 3), torch.randn(1, 3))


def test_without_process_group_gather_flag_changes_nothing():
    z0, z1 = torch.randn(5, 4), torch.randn(5, 4)
    assert NTXentLoss(0.5, gather_distributed=True)(z0, z1).item() == pytest.approx(
        NTXentLoss(0.5, gather_distributed=False)(z0, z1).item()
    )


def simclr_tf_loss(h1: torch.Tensor, h2: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR's TensorFlow contrastive loss re-derived: per direction the cross entropy
    of [logits_ab, logits_aa - masks * LARGE] against the positive's column, averaged
    over the batch, and the two directions added (loss_a + loss_b)."""
    h1, h2 = F.normalize(h1, dim=1), F.normalize(h2, dim=1)
    n = h1.shape[0]
    large = 1e9
    masks = torch.eye(n, dtype=h1.dtype)
    logits_aa = h1 @ h1.T / t - masks * large
    logits_bb = h2 @ h2.T / t - masks * large
    logits_ab, logits_ba = h1 @ h2.T / t, h2 @ h1.T / t
    target = torch.arange(n)
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], dim=1), target)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], dim=1), target)
    return loss_a + loss_b


def _toy(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0, x1 = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    w = torch.randn(4, 5, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    return x0, x1, w, b


def test_the_tf_loss_is_twice_this_one():
    x0, x1, w, _ = _toy()
    z0, z1 = x0 @ w.T, x1 @ w.T
    ours = NTXentLoss(0.5, gather_distributed=False)(z0, z1)
    assert simclr_tf_loss(z0, z1, 0.5).item() == pytest.approx(2 * ours.item(), rel=1e-6)


def _train(loss_fn, opt_name: str, lr: float, wd: float, steps: int):
    from cl_core.optim import build_optimizer

    x0, x1, w0, b0 = _toy()
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    groups = [
        {"params": [w], "weight_decay": wd, "lars_exclude": False},
        {"params": [b], "weight_decay": 0.0, "lars_exclude": True},
    ]
    opt = build_optimizer(opt_name, groups, lr, weight_decay=wd, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(x0 @ w.T + b, x1 @ w.T + b).backward()
        opt.step()
    return w.detach(), b.detach(), w0, b0


def test_the_documented_learning_rate_equivalence_with_the_official_recipe():
    ours = NTXentLoss(0.5, gather_distributed=False)

    def official(z0, z1):
        return simclr_tf_loss(z0, z1, 0.5)

    # SGD: twice the learning rate and half the weight decay give the official steps
    w_tf, b_tf, _, _ = _train(official, "sgd", 0.1, 1e-2, steps=5)
    w_us, b_us, _, _ = _train(ours, "sgd", 0.2, 5e-3, steps=5)
    torch.testing.assert_close(w_us, w_tf)
    torch.testing.assert_close(b_us, b_tf)
    # LARS: the same learning rate and half the weight decay give the official step of an
    # adapted weight; an excluded bias moves half as far
    w_tf, b_tf, w0, b0 = _train(official, "lars", 0.5, 1e-2, steps=1)
    w_us, b_us, _, _ = _train(ours, "lars", 0.5, 5e-3, steps=1)
    torch.testing.assert_close(w_us, w_tf)
    torch.testing.assert_close(b_us - b0, (b_tf - b0) / 2)
