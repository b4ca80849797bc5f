"""Barlow Twins and VICReg: the losses against loop references and analytic cases, and
two gloo processes with batch B each == one process with 2B (loss and gradients).

BYOL and SimSiam have no gathered loss (per-sample losses); the same two-process check
shows that for them DDP's gradient averaging alone gives the global-batch result.
"""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cl_core.losses.barlow_twins import BarlowTwinsLoss, off_diagonal, standardize
from cl_core.losses.vicreg import VICRegLoss, covariance_term, variance_term
from cl_core.methods import get_method
from cl_core.methods.base import Method
from cl_core.models.heads import MLP
from cl_core.models.momentum import momentum_copy
from tests.gloo import run_workers

# ---- loop references -------------------------------------------------------------------


def barlow_reference(za: torch.Tensor, zb: torch.Tensor, lambd: float, eps: float = 1e-5) -> float:
    """Eq. 1-2 entry by entry, on batch-standardised columns (biased variance + eps)."""
    za, zb = za.double().tolist(), zb.double().tolist()
    n, d = len(za), len(za[0])

    def column(z, j):
        col = [z[b][j] for b in range(n)]
        mean = sum(col) / n
        var = sum((v - mean) ** 2 for v in col) / n
        return [(v - mean) / math.sqrt(var + eps) for v in col]

    a = [column(za, j) for j in range(d)]
    b = [column(zb, j) for j in range(d)]
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[i][k] * b[j][k] for k in range(n)) / n
            loss += (1 - c_ij) ** 2 if i == j else lambd * c_ij**2
    return loss


def vicreg_reference(
    za: torch.Tensor, zb: torch.Tensor, lam: float, mu: float, nu: float, gamma: float, eps: float
) -> float:
    za, zb = za.double().tolist(), zb.double().tolist()
    n, d = len(za), len(za[0])
    inv = sum((za[b][j] - zb[b][j]) ** 2 for b in range(n) for j in range(d)) / (n * d)

    def var_and_cov(z):
        means = [sum(z[b][j] for b in range(n)) / n for j in range(d)]
        v = 0.0
        for j in range(d):
            var = sum((z[b][j] - means[j]) ** 2 for b in range(n)) / (n - 1)
            v += max(0.0, gamma - math.sqrt(var + eps))
        c = 0.0
        for i in range(d):
            for j in range(d):
                if i != j:
                    cov = sum((z[b][i] - means[i]) * (z[b][j] - means[j]) for b in range(n)) / (n - 1)
                    c += cov**2
        return v / d, c / d

    va, ca = var_and_cov(za)
    vb, cb = var_and_cov(zb)
    return lam * inv + mu * (va + vb) / 2 + nu * (ca + cb)


# ---- Barlow Twins ----------------------------------------------------------------------


@pytest.mark.parametrize("n,d,lambd", [(2, 3, 0.0051), (5, 4, 0.1), (9, 6, 1.0), (4, 7, 0.0)])
def test_barlow_twins_matches_loop_reference(n, d, lambd):
    g = torch.Generator().manual_seed(n * 10 + d)
    za, zb = 3 * torch.randn(n, d, generator=g) + 1, torch.randn(n, d, generator=g)
    assert BarlowTwinsLoss(lambd)(za, zb).loss.item() == pytest.approx(barlow_reference(za, zb, lambd), rel=1e-5)


def test_barlow_twins_decorrelated_identical_embeddings_give_zero():
    h = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]])  # zero-mean orthogonal columns
    z = 2.5 * h + 7.0  # scale and shift are standardised away
    terms = BarlowTwinsLoss(0.0051, eps=0.0)(z, z)
    assert terms.loss.item() == pytest.approx(0.0, abs=1e-10)
    assert BarlowTwinsLoss(0.0051)(z, z).loss.item() == pytest.approx(0.0, abs=1e-8)  # batch norm's eps
    assert terms.diag_mean.item() == pytest.approx(1.0)
    anti = BarlowTwinsLoss(0.0051, eps=0.0)(z, -z)  # C = -I
    assert anti.on_diag.item() == pytest.approx(4.0 * 3) and anti.off_diag.item() == pytest.approx(0.0, abs=1e-10)


def test_barlow_twins_fully_redundant_dimensions():
    x = torch.tensor([[1.0], [-1.0], [2.0], [-2.0]])
    z = x.repeat(1, 5)  # 5 identical dimensions: C is all ones
    terms = BarlowTwinsLoss(0.5, eps=0.0)(z, z)
    assert terms.on_diag.item() == pytest.approx(0.0, abs=1e-10)
    assert terms.off_diag.item() == pytest.approx(20.0)
    assert terms.loss.item() == pytest.approx(10.0)


def test_the_official_gradient_on_w_workers_is_one_over_w_of_the_global_loss_gradient():
    """What the module docstring says of the official code on W workers: each worker's
    loss is the global loss of the all-reduced C, but the all_reduce passes no gradient,
    so worker k differentiates only its own slice's part of C (the synchronised batch
    norm still couples the slices); DDP averages the W gradients."""
    w, n, d, lambd = 2, 6, 4, 0.3
    g = torch.Generator().manual_seed(11)
    z0, z1 = (
        torch.randn(w * n, d, generator=g, requires_grad=True),
        torch.randn(w * n, d, generator=g, requires_grad=True),
    )
    (ours0, ours1) = torch.autograd.grad(BarlowTwinsLoss(lambd, gather_distributed=False)(z0, z1).loss, [z0, z1])
    a, b = standardize(z0), standardize(z1)  # SyncBatchNorm over the global batch
    official0, official1 = torch.zeros_like(z0), torch.zeros_like(z1)
    for k in range(w):
        parts = [a[j * n : (j + 1) * n].T @ b[j * n : (j + 1) * n] / (w * n) for j in range(w)]
        c = sum(p if j == k else p.detach() for j, p in enumerate(parts))  # all_reduce: no gradient from the others
        loss_k = (1 - torch.diagonal(c)).pow(2).sum() + lambd * off_diagonal(c).pow(2).sum()
        g0, g1 = torch.autograd.grad(loss_k, [z0, z1], retain_graph=True)
        official0, official1 = official0 + g0 / w, official1 + g1 / w  # DDP's average
    torch.testing.assert_close(official0, ours0 / w)
    torch.testing.assert_close(official1, ours1 / w)


def test_standardize_and_off_diagonal():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(10, 4, generator=g) * 3 + 2
    bn = nn.BatchNorm1d(4, affine=False).train()
    torch.testing.assert_close(standardize(z), bn(z))
    m = torch.arange(16.0).reshape(4, 4)
    torch.testing.assert_close(off_diagonal(m), m[~torch.eye(4, dtype=torch.bool)])


def test_barlow_twins_bad_arguments():
    with pytest.raises(ValueError, match="^lambd"):
        get_method("barlow_twins")(lambd=-1.0, **get_method("barlow_twins").smoke_kwargs())
    with pytest.raises(ValueError, match="at least 2"):
        BarlowTwinsLoss()(torch.randn(1, 3), torch.randn(1, 3))


def test_barlow_twins_projector_follows_the_paper():
    with torch.device("meta"):  # full width without the cost of initialising it
        m = get_method("barlow_twins")()
    kinds = [type(x).__name__ for x in m.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [x.out_features for x in m.projector if isinstance(x, nn.Linear)] == [8192, 8192, 8192]
    assert m.projector[-1].bias is None and m.criterion.lambd == 0.0051


# ---- VICReg ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,d,w",
    [(2, 3, (25.0, 25.0, 1.0, 1.0, 1e-4)), (6, 5, (1.0, 2.0, 3.0, 1.0, 1e-4)), (8, 4, (0.5, 1.0, 2.0, 2.0, 1e-2))],
)
def test_vicreg_matches_loop_reference(n, d, w):
    g = torch.Generator().manual_seed(n + d)
    za, zb = 0.7 * torch.randn(n, d, generator=g), 1.5 * torch.randn(n, d, generator=g) + 0.3
    lam, mu, nu, gamma, eps = w
    terms = VICRegLoss(lam, mu, nu, gamma=gamma, eps=eps)(za, zb)
    assert terms.loss.item() == pytest.approx(vicreg_reference(za, zb, lam, mu, nu, gamma, eps), rel=1e-5)


def official_vicreg(x: torch.Tensor, y: torch.Tensor, sim: float = 25.0, std: float = 25.0, cov: float = 1.0):
    """The loss as the official main_vicreg.py computes it on one process (its forward
    after the projector), re-derived step by step."""
    repr_loss = F.mse_loss(x, y)
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    std_x, std_y = torch.sqrt(x.var(dim=0) + 0.0001), torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    n, d = x.shape
    cov_x, cov_y = (x.T @ x) / (n - 1), (y.T @ y) / (n - 1)
    off = ~torch.eye(d, dtype=torch.bool)
    cov_loss = cov_x[off].pow(2).sum() / d + cov_y[off].pow(2).sum() / d
    return sim * repr_loss + std * std_loss + cov * cov_loss


def test_vicreg_is_the_official_loss_at_the_official_weights():
    g = torch.Generator().manual_seed(3)
    x, y = 0.3 * torch.randn(16, 8, generator=g), 0.5 * torch.randn(16, 8, generator=g) + 0.2
    xs, ys = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    xo, yo = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    ours, official = VICRegLoss(gather_distributed=False)(xs, ys).loss, official_vicreg(xo, yo)
    assert ours.item() == pytest.approx(official.item(), rel=1e-6)
    ours.backward()
    official.backward()
    assert torch.allclose(xs.grad, xo.grad, atol=1e-7) and torch.allclose(ys.grad, yo.grad, atol=1e-7)
    # the paper's Eq. 6 as printed (the two views' v summed) is mu = 50
    eq6 = VICRegLoss(25.0, 50.0, 1.0, gather_distributed=False)(x, y).loss
    assert eq6.item() == pytest.approx(official_vicreg(x, y, std=50.0).item(), rel=1e-6)


def test_vicreg_constant_embeddings():
    z = torch.full((5, 4), 3.0)
    eps = 1e-4
    assert variance_term(z, 1.0, eps).item() == pytest.approx(1.0 - math.sqrt(eps))
    assert covariance_term(z).item() == 0.0
    terms = VICRegLoss()(z, z)
    assert terms.invariance.item() == 0.0
    assert terms.variance.item() == pytest.approx(1.0 - math.sqrt(eps))  # the mean of the two views' v
    assert terms.loss.item() == pytest.approx(25 * (1.0 - math.sqrt(eps)))


def test_vicreg_spread_decorrelated_embeddings_have_no_variance_or_covariance_cost():
    h = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]])  # unbiased variance 4/3 > 1
    assert variance_term(h).item() == 0.0
    assert covariance_term(h).item() == pytest.approx(0.0, abs=1e-12)
    shifted = h + 0.5
    assert VICRegLoss()(h, shifted).invariance.item() == pytest.approx(0.25)


def test_vicreg_bad_arguments():
    cls = get_method("vicreg")
    for kw, name in (
        ({"invariance_weight": -1.0}, "invariance_weight"),
        ({"variance_weight": float("nan")}, "variance_weight"),
        ({"covariance_weight": -0.5}, "covariance_weight"),
        ({"gamma": 0.0}, "gamma"),
        ({"eps": -1e-4}, "eps"),
        ({"proj_dim": 0}, "proj_dim"),
    ):
        with pytest.raises(ValueError, match=f"^{name}"):
            cls(**{**cls.smoke_kwargs(), **kw})


def test_vicreg_defaults_follow_the_paper():
    with torch.device("meta"):
        m = get_method("vicreg")()
    c = m.criterion
    assert (c.invariance_weight, c.variance_weight, c.covariance_weight, c.gamma, c.eps) == (25.0, 25.0, 1.0, 1.0, 1e-4)
    assert [x.out_features for x in m.projector if isinstance(x, nn.Linear)] == [8192, 8192, 8192]


# ---- two gloo processes x B == one process x 2B -------------------------------------------

B, WORLD, SIZE, FEAT = 5, 2, 4, 12
NAMES = ("barlow_twins", "vicreg", "byol", "simsiam")


def _toy_method(name: str, gather: bool = True) -> Method:
    """The method with BN-free toy modules (per-worker batch norm would differ from one
    process's), so the only cross-worker coupling left is the loss's."""
    cls = get_method(name)
    torch.manual_seed(0)
    m = cls(gather_distributed=gather, **cls.smoke_kwargs())
    m.backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, FEAT), nn.ReLU())
    if name == "byol":
        m.projector = MLP([FEAT, 16, 8], norm=False)
        m.predictor = MLP([8, 16, 8], norm=False)
        m.target_backbone, m.target_projector = momentum_copy(m.backbone), momentum_copy(m.projector)
        with torch.no_grad():  # a target that differs from the online network
            for p in m.target_projector.parameters():
                p.mul_(0.5)
    elif name == "simsiam":
        m.projector = MLP([FEAT, 16, 16], norm=False)
        m.predictor = MLP([16, 4, 16], norm=False)
    else:  # bias-free output layer as in the methods (a bias is standardised away anyway)
        m.projector = MLP([FEAT, 16, 16], norm=False)
        m.projector[-1] = nn.Linear(16, 16, bias=False)
    return m


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(WORLD * B, 3, SIZE, SIZE, generator=g) for _ in range(2)]


def _loss_and_grads(model: nn.Module, method: Method, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    out = model(views)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in method.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads


def _worker(rank: int, world: int) -> dict:
    views = [v[rank * B : (rank + 1) * B] for v in _data()]
    res: dict = {}
    for name in NAMES:
        method = _toy_method(name)
        loss, grads = _loss_and_grads(nn.parallel.DistributedDataParallel(method), method, views)
        dist.all_reduce(loss)  # the mean over workers of each worker's loss
        res[name] = {"loss": (loss / world).item(), "grads": grads}
    with torch.no_grad():  # without gathering, each worker's statistics are its own
        res["barlow_twins_local"] = _toy_method("barlow_twins", gather=False)(views).loss.item()
        res["vicreg_local"] = _toy_method("vicreg", gather=False)(views).loss.item()
    return res


@pytest.fixture(scope="module")
def two_process_results() -> list[dict]:
    return run_workers(_worker, WORLD)  # once for the whole file


@pytest.mark.parametrize("name", NAMES)
def test_two_gloo_processes_equal_one_process_with_the_global_batch(name, two_process_results):
    method = _toy_method(name)
    loss, ref_grads = _loss_and_grads(method, method, _data())
    for rank in range(WORLD):
        res = two_process_results[rank][name]
        assert res["loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert res["grads"].keys() == ref_grads.keys()
        for k, g in res["grads"].items():
            torch.testing.assert_close(g, ref_grads[k], rtol=1e-4, atol=1e-6, msg=f"{name}: gradient of {k}")


@pytest.mark.parametrize("name", ["barlow_twins", "vicreg"])
def test_gathering_changes_the_statistics(name, two_process_results):
    with torch.no_grad():
        global_loss = _toy_method(name)(_data()).loss.item()
    local = two_process_results[0][f"{name}_local"]
    assert local != pytest.approx(global_loss, rel=1e-3)
