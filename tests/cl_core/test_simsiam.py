"""SimSiam: the negative cosine with stop-gradient, the heads, and the predictor's
fixed learning rate."""

import inspect

import pytest
import torch
import torch.nn.functional as F

from cl_core import distributed
from cl_core.losses.simsiam import negative_cosine, simsiam_loss
from cl_core.methods.simsiam import SimSiam
from cl_core.optim import build_optimizer, set_lr


def _small(**kw) -> SimSiam:
    torch.manual_seed(0)
    return SimSiam(**{**SimSiam.smoke_kwargs(), **kw})


def _views(n: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 16, 16, generator=g), torch.randn(n, 3, 16, 16, generator=g)]


def test_negative_cosine_hand_values():
    a = torch.tensor([[1.0, 2.0, -1.0]])
    b = torch.tensor([[2.0, -1.0, 0.0]])
    assert negative_cosine(a, 5 * a).item() == pytest.approx(-1.0)
    assert negative_cosine(a, -a).item() == pytest.approx(1.0)
    assert negative_cosine(a, b).item() == pytest.approx(0.0, abs=1e-7)


def test_symmetrised_loss_against_the_formula():
    g = torch.Generator().manual_seed(0)
    p0, p1, z0, z1 = (torch.randn(5, 4, generator=g) for _ in range(4))
    expected = -0.5 * F.cosine_similarity(p0, z1).mean() - 0.5 * F.cosine_similarity(p1, z0).mean()
    torch.testing.assert_close(simsiam_loss(p0, p1, z0, z1), expected)


def test_no_gradient_through_the_z_branch():
    g = torch.Generator().manual_seed(1)
    p0, p1, z0, z1 = (torch.randn(4, 3, generator=g).requires_grad_() for _ in range(4))
    simsiam_loss(p0, p1, z0, z1).backward()
    assert z0.grad is None and z1.grad is None
    assert p0.grad.abs().sum() > 0 and p1.grad.abs().sum() > 0
    # with p = z (identity predictor), z0 gets only the gradient of its own prediction term
    z0 = torch.randn(4, 3, generator=g, requires_grad=True)
    z1 = torch.randn(4, 3, generator=g, requires_grad=True)
    (grad,) = torch.autograd.grad(simsiam_loss(z0, z1, z0, z1), z0)
    (ref,) = torch.autograd.grad(-0.5 * F.cosine_similarity(z0, z1.detach()).mean(), z0)
    torch.testing.assert_close(grad, ref)


def test_heads_follow_the_paper():
    with torch.device("meta"):  # full width without the cost of initialising it
        m = SimSiam("resnet50")
        r18 = SimSiam("resnet18")
        wide = SimSiam("resnet18", proj_hidden_dim=1024)
    defaults = {k: v.default for k, v in inspect.signature(SimSiam.__init__).parameters.items()}
    assert defaults["proj_dim"] == 2048 and defaults["pred_hidden_dim"] == 512 and defaults["proj_hidden_dim"] is None
    kinds = [type(x).__name__ for x in m.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    # the official builder: hidden layers as wide as the backbone's features, output 2048
    assert [x.out_features for x in m.projector if isinstance(x, torch.nn.Linear)] == [2048, 2048, 2048]
    assert [x.out_features for x in r18.projector if isinstance(x, torch.nn.Linear)] == [512, 512, 2048]
    assert [x.out_features for x in wide.projector if isinstance(x, torch.nn.Linear)] == [1024, 1024, 2048]
    kinds = [type(x).__name__ for x in m.predictor]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert (m.predictor[0].in_features, m.predictor[0].out_features, m.predictor[3].out_features) == (2048, 512, 2048)
    assert m.momentum_targets() == []


def test_predictor_groups_carry_fixed_lr_and_keep_the_split():
    m = _small()
    groups = m.param_groups(1e-4)
    pred = {id(p) for p in m.predictor.parameters()}
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in m.parameters() if p.requires_grad)  # each exactly once
    for g in groups:
        assert all((id(p) in pred) == g["fixed_lr"] for p in g["params"])
        assert all((p.ndim <= 1) == g["lars_exclude"] for p in g["params"])
        assert g["weight_decay"] == (0.0 if g["lars_exclude"] else 1e-4)
    assert sum(len(g["params"]) for g in groups if g["fixed_lr"]) == len(pred)


@pytest.mark.parametrize("optimizer", ["sgd", "lars", "adamw"])
def test_set_lr_keeps_the_predictor_at_peak(optimizer):
    m = _small()
    opt = build_optimizer(optimizer, m.param_groups(1e-4), 0.1, weight_decay=1e-4)
    set_lr(opt, 0.003, peak_lr=0.1)
    for g in opt.param_groups:
        assert g["lr"] == (0.1 if g["fixed_lr"] else 0.003)
    assert any(g["fixed_lr"] for g in opt.param_groups) and any(not g["fixed_lr"] for g in opt.param_groups)


def test_z_std_metric_is_the_std_of_the_normalised_projection():
    m = _small().eval()
    x = _views(8)
    with torch.no_grad():
        out = m(x)
        z = F.normalize(m.projector(m.backbone(x[0])), dim=1)
    assert out.metrics["train/z_std"].item() == pytest.approx(z.std(dim=0).mean().item(), rel=1e-5)


def test_the_loss_is_per_sample_and_gathers_nothing(monkeypatch):
    def fail(x):
        raise AssertionError("SimSiam must not gather")

    monkeypatch.setattr(distributed, "gather", fail)
    monkeypatch.setattr(distributed, "gather_nograd", fail)
    out = _small()(_views())
    assert torch.isfinite(out.loss) and -1 <= out.loss.item() <= 1


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"proj_dim": 0}, "proj_dim"),
        ({"pred_hidden_dim": -3}, "pred_hidden_dim"),
        ({"proj_hidden_dim": 0}, "proj_hidden_dim"),
    ],
)
def test_bad_hyperparameters_raise(kw, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        SimSiam(**{**SimSiam.smoke_kwargs(), **kw})
