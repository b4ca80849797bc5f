"""SupCon: the loss against a loop over anchors and positives, its reduction to NT-Xent,
the method's label checks, the fine-tune objective, and two gloo processes against one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cl_core.losses import NTXentLoss
from cl_core.losses.supcon import SupConLoss
from tests.gloo import run_workers

# the methods and models are imported inside the tests that use them, so the gloo workers
# (which import this module) load only the loss


def reference(views: list[torch.Tensor], labels: torch.Tensor, t: float) -> float:
    """Eq. 2 of SupCon one anchor and one positive at a time, averaged over all anchors
    (one without a positive counts 0, as in the authors' code)."""
    z = F.normalize(torch.cat(views).double(), dim=1)
    lab = labels.repeat(len(views)).tolist()
    total, anchors = 0.0, 0
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and lab[p] == lab[i]]
        anchors += 1
        if not positives:
            continue
        den = sum(math.exp(float(z[i] @ z[a]) / t) for a in range(len(z)) if a != i)
        total += -sum(math.log(math.exp(float(z[i] @ z[p]) / t) / den) for p in positives) / len(positives)
    return total / anchors


def authors_supcon(views: list[torch.Tensor], labels: torch.Tensor, t: float, base_t: float) -> torch.Tensor:
    """The authors' SupConLoss (contrast_mode 'all') re-derived step by step: features
    (N, V, D), the label mask tiled over views, self-contrast masked out, positives per
    anchor with a zero count set to 1, scaled by T / base_T and averaged over all VN anchors."""
    features = torch.stack([F.normalize(v, dim=1) for v in views], dim=1)
    n, v = features.shape[:2]
    mask = torch.eq(labels.view(-1, 1), labels.view(1, -1)).float()
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    dots = contrast @ contrast.T / t
    logits = dots - dots.max(dim=1, keepdim=True).values.detach()
    mask = mask.repeat(v, v)
    logits_mask = torch.ones_like(mask).scatter(1, torch.arange(n * v).view(-1, 1), 0)
    mask = mask * logits_mask
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
    pairs = mask.sum(1)
    pairs = torch.where(pairs < 1e-6, torch.ones_like(pairs), pairs)
    mean_log_prob_pos = (mask * log_prob).sum(1) / pairs
    return (-(t / base_t) * mean_log_prob_pos).view(v, n).mean()


@pytest.mark.parametrize("n_views", [1, 2, 3])
@pytest.mark.parametrize("base", [None, 0.07])
def test_matches_the_authors_code_singletons_included(n_views, base):
    labels = torch.tensor(LABELS["singletons"])  # with one view, anchors 7, 4 and 2 have no positive
    g = torch.Generator().manual_seed(n_views)
    views = [torch.randn(len(labels), 5, generator=g, dtype=torch.float64) for _ in range(n_views)]
    ours = [v.clone().requires_grad_(True) for v in views]
    theirs = [v.clone().requires_grad_(True) for v in views]
    got = SupConLoss(0.1, base_temperature=base, gather_distributed=False)(ours, labels)
    want = authors_supcon(theirs, labels, 0.1, base or 0.1)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    got.backward()
    want.backward()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-6)


LABELS = {
    "two_classes": [0, 1, 0, 1, 0, 1],
    "all_same": [3, 3, 3, 3, 3],
    "all_distinct": [0, 1, 2, 3, 4, 5, 6],
    "unbalanced": [0, 0, 0, 0, 1, 2, 2, 5],
    "singletons": [7, 1, 1, 4, 9, 9, 9, 2],
}


@pytest.mark.parametrize("t", [0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize(
    "pattern,n_views", [(p, v) for p in sorted(LABELS) for v in (1, 2, 3) if (p, v) != ("all_distinct", 1)]
)  # that one has no positive at all
def test_matches_loop_reference(pattern, t, n_views):
    labels = torch.tensor(LABELS[pattern])
    g = torch.Generator().manual_seed(len(labels) * 10 + n_views)
    views = [torch.randn(len(labels), 5, generator=g) for _ in range(n_views)]
    got = SupConLoss(t)(views, labels).item()
    assert got == pytest.approx(reference(views, labels, t), rel=1e-5)


@pytest.mark.parametrize("t", [0.07, 0.1, 0.5])
def test_distinct_labels_reduce_to_nt_xent(t):
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(9, 6, generator=g, requires_grad=True)
    z1 = torch.randn(9, 6, generator=g, requires_grad=True)
    supcon = SupConLoss(t)([z0, z1], torch.arange(9) * 3 + 1)
    (ga0, ga1) = torch.autograd.grad(supcon, [z0, z1])
    ntxent = NTXentLoss(t)(z0, z1)
    (gb0, gb1) = torch.autograd.grad(ntxent, [z0, z1])
    assert supcon.item() == pytest.approx(ntxent.item(), rel=1e-6)
    torch.testing.assert_close(ga0, gb0)
    torch.testing.assert_close(ga1, gb1)


def test_base_temperature_scales_by_t_over_base():
    views, labels = [torch.randn(6, 4), torch.randn(6, 4)], torch.tensor([0, 0, 1, 1, 2, 2])
    plain = SupConLoss(0.1)(views, labels)
    assert SupConLoss(0.1, base_temperature=0.07)(views, labels).item() == pytest.approx(plain.item() * 0.1 / 0.07)


def test_single_view_without_any_positive_raises():
    with pytest.raises(ValueError, match="no anchor has a positive"):
        SupConLoss(0.1)([torch.randn(4, 3)], torch.arange(4))


def test_positives_pull_same_class_together():
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    aligned = SupConLoss(0.1)([z, z], labels)
    mixed = SupConLoss(0.1)([z, z], torch.tensor([0, 1, 0, 1]))
    assert aligned < mixed


@pytest.mark.parametrize(
    "kwargs", [{"temperature": 0}, {"temperature": float("nan")}, {"temperature": "0.1"}, {"base_temperature": -1.0}]
)
def test_illegal_temperatures_raise(kwargs):
    with pytest.raises(ValueError, match="temperature"):
        SupConLoss(**kwargs)


def test_illegal_shapes_raise():
    with pytest.raises(ValueError, match="equal shape"):
        SupConLoss()([torch.randn(4, 3), torch.randn(5, 3)], torch.arange(4))
    with pytest.raises(ValueError, match="labels"):
        SupConLoss()([torch.randn(4, 3)] * 2, torch.arange(5))
    with pytest.raises(ValueError, match="labels"):
        SupConLoss()([torch.randn(4, 3)] * 2, torch.zeros(4))


# ---- the method --------------------------------------------------------------------


def _method(**kw):
    from cl_core.methods import get_method

    cls = get_method("supcon")
    torch.manual_seed(0)
    return cls(gather_distributed=False, **{**cls.smoke_kwargs(), **kw})


def test_method_loss_is_supcon_of_its_head():
    m = _method().train()
    views = [torch.randn(6, 3, 12, 12), torch.randn(6, 3, 12, 12)]
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    out = m(views, labels, None)
    z = m.head(m.backbone(torch.cat(views)))
    assert out.loss.item() == pytest.approx(reference([z[:6].detach(), z[6:].detach()], labels, 0.1), rel=1e-5)
    assert set(out.metrics) == {"train/loss", "train/z_std"}


def test_method_rejects_unlabeled_samples():
    m = _method()
    views = [torch.randn(4, 3, 12, 12), torch.randn(4, 3, 12, 12)]
    with pytest.raises(ValueError, match="unlabeled"):
        m(views, torch.tensor([0, -1, 1, 0]), None)
    with pytest.raises(ValueError, match="no labels"):
        m(views, None, None)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"proj_dim": 0}, "proj_dim"),
        ({"base_temperature": 0.0}, "base_temperature"),
        ({"head_hidden_dim": -2}, "head_hidden_dim"),
    ],
)
def test_method_validates_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _method(**kwargs)


def test_paper_defaults():
    from cl_core.methods import method_params

    assert method_params("supcon") == {
        "temperature": 0.1,
        "base_temperature": None,
        "head_hidden_dim": None,
        "proj_dim": 128,
    }


# ---- the fine-tune objective ---------------------------------------------------------


def _toy_classifier(d_in: int, classes: int):
    from cl_core.downstream import Classifier

    backbone = nn.Sequential(nn.Flatten(), nn.Linear(d_in, 16), nn.ReLU(), nn.Linear(16, 16))
    return Classifier(backbone, nn.Sequential(), 16, classes)


def test_objective_trains_a_separable_toy_set():
    from cl_core.downstream.supcon_finetune import SupConObjective

    torch.manual_seed(0)
    classes, n = 3, 24
    centers = torch.randn(classes, 1, 2, 4) * 2
    labels = torch.arange(n) % classes
    x = centers[labels] + 0.3 * torch.randn(n, 1, 2, 4)
    objective = SupConObjective(_toy_classifier(8, classes), temperature=0.1, proj_dim=8, gather_distributed=False)
    opt = torch.optim.Adam(objective.parameters(), lr=1e-2)
    history = []
    for _ in range(40):
        views = [x + 0.2 * torch.randn_like(x), x + 0.2 * torch.randn_like(x)]
        out = objective(views, labels, None)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append({k: v.item() for k, v in out.metrics.items()})
    assert set(history[0]) == {"train/loss", "train/supcon", "train/ce", "train/top1"}
    # each anchor's SupCon term is at least log |P(i)| (here 2 * 8 - 1 positives) and the
    # cross-entropy at least 0: measure the loss above that floor
    floor = math.log(2 * n // classes - 1)
    first = sum(h["train/loss"] for h in history[:5]) / 5 - floor
    last = sum(h["train/loss"] for h in history[-5:]) / 5 - floor
    assert history[-1]["train/supcon"] >= floor - 1e-5
    assert last < 0.2 * first
    assert history[-1]["train/top1"] == 1.0
    with torch.no_grad():
        assert (objective.classifier(x).argmax(1) == labels).float().mean() == 1.0


def test_objective_routes_gradients():
    """fc learns from the cross-entropy only; features and head from SupCon only."""
    from cl_core.downstream.supcon_finetune import SupConObjective

    torch.manual_seed(1)
    obj = SupConObjective(_toy_classifier(6, 2), proj_dim=4, gather_distributed=False)
    views, labels = [torch.randn(6, 6), torch.randn(6, 6)], torch.tensor([0, 1, 0, 1, 1, 0])
    obj(views, labels).loss.backward()
    grads = {k: p.grad.clone() for k, p in obj.named_parameters()}
    obj.zero_grad()
    n = 6
    h = obj.classifier.features(torch.cat(views))
    z = obj.head(h)
    SupConLoss(0.1, gather_distributed=False)([z[:n], z[n:]], labels).backward()
    for k, p in obj.named_parameters():
        if k.startswith("classifier.fc."):
            assert p.grad is None
        else:
            torch.testing.assert_close(grads[k], p.grad, msg=k)
    with pytest.raises(ValueError, match="unlabeled"):
        obj(views, torch.tensor([0, 1, -1, 1, 1, 0]))


def test_objective_is_not_a_registered_method():
    from cl_core.downstream.supcon_finetune import SupConObjective
    from cl_core.methods import get_method, known_methods

    assert "supcon" in known_methods()
    assert not any(get_method(k) is SupConObjective for k in known_methods())


# ---- two gloo processes x B == one process x 2B ----------------------------------------

B, D_IN, WORLD = 5, 7, 2
# labels repeat across the two ranks' halves, and the single-view case has singletons
GLOBAL_LABELS = torch.tensor([0, 1, 2, 0, 3, 1, 4, 2, 5, 1])


def _grads(params) -> list[torch.Tensor]:
    """Copies of the gradients, every parameter having one."""
    out = []
    for p in params:
        assert p.grad is not None
        out.append(p.grad.clone())
    return out


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 8), nn.ReLU(), nn.Linear(8, 4))


def _data(n_views: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(WORLD * B, D_IN, generator=g) for _ in range(n_views)]


CASES = [(2, 0.1), (2, 0.5), (1, 0.1), (3, 0.2)]  # (views, temperature)


def _single_process(n_views: int, t: float) -> tuple[float, list[torch.Tensor]]:
    model = _model()
    loss = SupConLoss(t)([model(x) for x in _data(n_views)], GLOBAL_LABELS)
    loss.backward()
    return loss.item(), _grads(model.parameters())


def _worker(rank: int, world: int) -> list[tuple[float, list[torch.Tensor]]]:
    sl = slice(rank * B, (rank + 1) * B)
    results = []
    for n_views, t in CASES:
        model = nn.parallel.DistributedDataParallel(_model())
        views = [model(x[sl]) for x in _data(n_views)]
        loss = SupConLoss(t)(views, GLOBAL_LABELS[sl])
        loss.backward()  # DDP averages the parameter gradients over ranks
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        results.append(((mean_loss / world).item(), _grads(model.parameters())))
    return results


def test_two_gloo_processes_equal_one_process_with_global_batch():
    results = run_workers(_worker, WORLD)
    for case, (n_views, t) in enumerate(CASES):
        ref_loss, ref_grads = _single_process(n_views, t)
        for rank in range(WORLD):
            loss, grads = results[rank][case]
            assert loss == pytest.approx(ref_loss, rel=1e-5), (n_views, t)
            for g, ref in zip(grads, ref_grads, strict=True):
                torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
