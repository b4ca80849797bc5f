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
