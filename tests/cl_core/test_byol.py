"""BYOL: the normalised MSE, the symmetrised loss, the EMA schedule and stop-gradient."""

import inspect

import pytest
import torch
import torch.nn.functional as F

from cl_core import distributed
from cl_core.losses.byol import byol_loss, normalized_mse
from cl_core.methods import get_method
from cl_core.methods.byol import BYOL


def _small(**kw) -> BYOL:
    torch.manual_seed(0)
    return BYOL(**{**BYOL.smoke_kwargs(), **kw})


def _views(n: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 16, 16, generator=g), torch.randn(n, 3, 16, 16, generator=g)]


def test_two_minus_two_cos_is_the_mse_of_the_normalised_vectors():
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    ref = ((p / p.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)) ** 2).sum(dim=1)
    torch.testing.assert_close(normalized_mse(p, z), ref)
    torch.testing.assert_close(normalized_mse(3 * p, 0.2 * z), ref)  # scale-free


def test_hand_values():
    a = torch.tensor([[1.0, 2.0, -1.0]])
    b = torch.tensor([[2.0, -1.0, 0.0]])  # orthogonal to a
    assert normalized_mse(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert normalized_mse(a, -a).item() == pytest.approx(4.0)
    assert normalized_mse(a, b).item() == pytest.approx(2.0)


def test_symmetrised_loss_is_the_sum_of_both_directions():
    g = torch.Generator().manual_seed(1)
    p0, p1, t0, t1 = (torch.randn(5, 4, generator=g) for _ in range(4))
    expected = (normalized_mse(p0, t1) + normalized_mse(p1, t0)).mean()
    torch.testing.assert_close(byol_loss(p0, p1, t0, t1), expected)
    # view 0 predicts view 1's target perfectly, view 1 predicts the opposite of view 0's
    assert byol_loss(t1, -t0, t0, t1).item() == pytest.approx(4.0)


def test_architecture_defaults_follow_the_paper():
    with torch.device("meta"):  # full width without the cost of initialising it
        m = get_method("byol")()
    defaults = {k: v.default for k, v in inspect.signature(BYOL.__init__).parameters.items()}
    assert (defaults["proj_hidden_dim"], defaults["proj_dim"], defaults["tau_base"]) == (4096, 256, 0.996)
    lin = [mod for mod in m.projector if isinstance(mod, torch.nn.Linear)]
    assert [(x.in_features, x.out_features) for x in lin] == [(m.feat_dim, 4096), (4096, 256)]
    lin = [mod for mod in m.predictor if isinstance(mod, torch.nn.Linear)]
    assert [(x.in_features, x.out_features) for x in lin] == [(256, 4096), (4096, 256)]
    assert isinstance(m.projector[1], torch.nn.BatchNorm1d) and isinstance(m.projector[2], torch.nn.ReLU)


def test_tau_schedule_start_middle_end():
    m = _small()
    assert m.tau(0, 100) == pytest.approx(0.996)
    assert m.tau(50, 100) == pytest.approx(0.998)
    assert m.tau(100, 100) == pytest.approx(1.0)
    for step, tau in ((0, 0.996), (50, 0.998), (100, 1.0)):  # the logged tau follows set_progress
        m.set_progress(step, 100)
        with torch.no_grad():
            out = m(_views())
        assert out.metrics["train/tau"].item() == pytest.approx(tau, abs=1e-7)


@pytest.mark.parametrize("step,tau", [(0, 0.996), (50, 0.998), (100, 1.0)])
def test_after_optimizer_step_applies_that_tau(step, tau):
    m = _small()
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)  # online != target
    before = [p.clone() for p in m.target_backbone.parameters()]
    m.after_optimizer_step(step, 100)
    for t, b, o in zip(m.target_backbone.parameters(), before, m.backbone.parameters(), strict=True):
        torch.testing.assert_close(t, tau * b + (1 - tau) * o)


def test_target_starts_as_a_copy_and_is_returned_as_momentum_target():
    m = _small()
    assert m.momentum_targets() == [m.target_backbone, m.target_projector]
    for t, o in zip(m.target_projector.parameters(), m.projector.parameters(), strict=True):
        assert torch.equal(t, o) and not t.requires_grad


def test_stop_gradient_in_the_loss():
    g = torch.Generator().manual_seed(2)
    p0, p1, t0, t1 = (torch.randn(4, 3, generator=g).requires_grad_() for _ in range(4))
    byol_loss(p0, p1, t0, t1).backward()
    assert t0.grad is None and t1.grad is None
    assert p0.grad.abs().sum() > 0 and p1.grad.abs().sum() > 0


def test_no_gradient_reaches_the_target_network():
    m = _small().train()
    for t in m.momentum_targets():  # even if the target were trainable, nothing flows into it
        for p in t.parameters():
            p.requires_grad_(True)
    m(_views()).loss.backward()
    assert all(p.grad is None for t in m.momentum_targets() for p in t.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.predictor.parameters())


def test_the_loss_is_per_sample_and_gathers_nothing(monkeypatch):
    def fail(x):
        raise AssertionError("BYOL must not gather")

    monkeypatch.setattr(distributed, "gather", fail)
    monkeypatch.setattr(distributed, "gather_nograd", fail)
    out = _small(gather_distributed=True)(_views())
    assert torch.isfinite(out.loss)
    assert out.metrics["train/cos_sim"].item() == pytest.approx(1 - out.loss.item() / 4, abs=1e-6)


def test_cos_sim_metric():
    m = _small().eval()
    x = _views(4)
    with torch.no_grad():
        out = m(x)
        p0 = m.predictor(m.projector(m.backbone(x[0])))
        p1 = m.predictor(m.projector(m.backbone(x[1])))
        t0 = m.target_projector(m.target_backbone(x[0]))
        t1 = m.target_projector(m.target_backbone(x[1]))
    cos = (F.cosine_similarity(p0, t1).mean() + F.cosine_similarity(p1, t0).mean()) / 2
    assert out.metrics["train/cos_sim"].item() == pytest.approx(cos.item(), abs=1e-5)


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"tau_base": 1.0}, "tau_base"),
        ({"tau_base": -0.1}, "tau_base"),
        ({"proj_dim": 0}, "proj_dim"),
        ({"proj_hidden_dim": 2.5}, "proj_hidden_dim"),
    ],
)
def test_bad_hyperparameters_raise(kw, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        BYOL(**{**BYOL.smoke_kwargs(), **kw})
