"""SwAV: Sinkhorn codes and the swapped prediction loss against slow loop references,
prototype normalisation and freezing, the queue, and two gloo processes with batch B
each == one process with 2B (codes, loss, gradients, queue)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cl_core.losses.swav import sinkhorn, swapped_prediction_loss
from cl_core.methods.swav import SwAV
from cl_core.models.heads import MLP
from tests.gloo import run_workers

K, D = 6, 8


def _unit(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def _scores(n: int, seed: int = 0) -> torch.Tensor:
    """Cosine scores of n unit embeddings against K unit prototypes."""
    g = torch.Generator().manual_seed(seed)
    return _unit(n, D, g) @ _unit(K, D, g).T


def _sinkhorn_loop(
    scores: torch.Tensor, epsilon: float, iterations: int, extra: torch.Tensor | None = None
) -> torch.Tensor:
    """The algorithm element by element in float64: Q = exp(S/eps)^T, Q /= sum(Q); then
    `iterations` times: each row to 1/K, each column to 1/B; codes = B * Q^T."""
    rows = scores.double().tolist() + ([] if extra is None else extra.double().tolist())
    b, k = len(rows), len(rows[0])
    q = [[math.exp(rows[j][i] / epsilon) for j in range(b)] for i in range(k)]
    total = sum(sum(r) for r in q)
    q = [[x / total for x in r] for r in q]
    for _ in range(iterations):
        for i in range(k):
            r = sum(q[i])
            q[i] = [x / r / k for x in q[i]]
        for j in range(b):
            c = sum(q[i][j] for i in range(k))
            for i in range(k):
                q[i][j] = q[i][j] / c / b
    return torch.tensor([[q[i][j] * b for i in range(k)] for j in range(scores.shape[0])], dtype=torch.float64)


# ---- Sinkhorn -------------------------------------------------------------------------


@pytest.mark.parametrize("iterations", [1, 3])
@pytest.mark.parametrize("with_extra", [False, True])
def test_sinkhorn_matches_loop_reference(iterations, with_extra):
    s = _scores(7)
    extra = _scores(5, seed=1) if with_extra else None
    got = sinkhorn(s, 0.05, iterations, extra=extra)
    ref = _sinkhorn_loop(s, 0.05, iterations, extra)
    assert got.shape == (7, K) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)


def test_sinkhorn_marginals():
    s = _scores(64)
    for iterations, tol in [(3, 0.5), (100, 1e-4)]:
        q = sinkhorn(s, 0.05, iterations)
        torch.testing.assert_close(q.sum(dim=1), torch.ones(64))  # each sample's code sums to 1
        assert (q >= 0).all()
        usage = q.sum(dim=0) / 64  # prototype marginal, ~1/K
        assert (usage * K - 1).abs().max() < tol, (iterations, usage)
    # more iterations get closer to the equipartition
    u3, u10 = (sinkhorn(s, 0.05, n).sum(0) / 64 * K - 1 for n in (3, 10))
    assert u10.abs().max() < u3.abs().max()


def test_sinkhorn_with_extra_equals_concatenated_columns_and_is_stable():
    s, e = _scores(5), _scores(9, seed=2)
    torch.testing.assert_close(sinkhorn(s, 0.05, 3, extra=e), sinkhorn(torch.cat([s, e]), 0.05, 3)[:5])
    # the max shift keeps exp() finite for scores far from [-1, 1]
    assert torch.isfinite(sinkhorn(s * 1000, 0.05, 3)).all()
    torch.testing.assert_close(sinkhorn(s + 50.0, 0.05, 3), sinkhorn(s, 0.05, 3))


# ---- swapped prediction ---------------------------------------------------------------


def _swapped_loop(scores: torch.Tensor, codes: torch.Tensor, t: float) -> float:
    v, b, k = scores.shape
    total = 0.0
    for i in range(codes.shape[0]):
        sub = 0.0
        for w in range(v):
            if w == i:
                continue
            for n in range(b):
                logits = [float(scores[w, n, j]) / t for j in range(k)]
                lse = math.log(sum(math.exp(x) for x in logits))
                sub -= sum(float(codes[i, n, j]) * (logits[j] - lse) for j in range(k)) / b
        total += sub / (v - 1)
    return total / codes.shape[0]


@pytest.mark.parametrize("n_views", [2, 4])
def test_swapped_loss_matches_loop_reference(n_views):
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(n_views, 3, 5, generator=g)
    codes = torch.softmax(torch.randn(2, 3, 5, generator=g), dim=-1)
    got = swapped_prediction_loss(scores, codes, 0.1)
    assert got.item() == pytest.approx(_swapped_loop(scores, codes, 0.1), rel=1e-5)


def _views(n: int, seed: int, n_local: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(n, 3, 8, 8, generator=g) for _ in range(n_local)
    ]


def _small(**kw) -> SwAV:
    torch.manual_seed(0)
    return SwAV(gather_distributed=False, **{**SwAV.smoke_kwargs(), "queue_length": 0, **kw})


def test_forward_is_the_swapped_loss_of_the_sinkhorn_codes():
    m = _small()
    views = _views(6, 0)
    with torch.no_grad():
        z = m.embed(views)
        scores = m.prototypes(z).reshape(4, 6, -1)
        q = torch.stack([sinkhorn(scores[i], m.epsilon, 3) for i in range(2)])
        ref = swapped_prediction_loss(scores, q, m.temperature)
    out = m(views)
    torch.testing.assert_close(out.loss, ref)
    assert 0 < out.metrics["train/code_entropy"] <= 1 and 0 < out.metrics["train/pred_entropy"] <= 1
    assert torch.isfinite(m(_views(6, 1, n_local=0)).loss)  # no local views: the two globals predict each other


def test_prototype_scores_are_float32_under_bf16_autocast():
    m = _small()
    g = torch.Generator().manual_seed(2)
    z = F.normalize(torch.randn(16, m.prototypes.in_features, generator=g), dim=1)
    exact = z @ m.prototypes.weight.T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = m.scores(z)
        rounded = m.prototypes(z)  # what autocast alone would give
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, exact)
    assert (rounded.float() - exact).abs().max() > 1e-4  # bf16 would have moved them
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(_views(6, 0))
    assert torch.isfinite(out.loss)


def test_prototypes_normalised_frozen_then_trained():
    m = _small(freeze_prototypes_steps=2)
    torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(m.num_prototypes))
    opt = torch.optim.SGD(m.param_groups(1e-4), lr=0.5, momentum=0.9)
    for step in range(4):
        before = m.prototypes.weight.detach().clone()
        m.set_progress(step, 4)
        loss = m(_views(6, step)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert m.prototypes.weight.grad is not None and m.prototypes.weight.grad.abs().sum() > 0
        m.before_optimizer_step(step, 4)
        assert (m.prototypes.weight.grad is None) == (step < 2)
        opt.step()
        m.after_optimizer_step(step, 4)
        if step < 2:
            torch.testing.assert_close(m.prototypes.weight, before)  # frozen: unchanged
        else:
            assert not torch.allclose(m.prototypes.weight, before)  # trained afterwards
        torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(m.num_prototypes))


def test_queue_written_from_start_step_and_read_once_full():
    n, length = 4, 8
    m = _small(queue_length=length, queue_start_step=1)
    opt = torch.optim.SGD(m.param_groups(0.0), lr=0.1)
    filled = []
    for step in range(4):
        views = _views(n, 10 + step)
        m.set_progress(step, 4)
        with torch.no_grad():
            z = m.embed(views)[: 2 * n].reshape(2, n, -1)
            scores = m.prototypes(m.embed(views)).reshape(4, n, -1)
            full = int(m.queue_filled) >= length
            extra = [m.prototypes(m.queue[i]) if full else None for i in range(2)]
            q = torch.stack([sinkhorn(scores[i], m.epsilon, 3, extra=extra[i]) for i in range(2)])
            ref = swapped_prediction_loss(scores, q, m.temperature)
        ptr = int(m.queue_ptr)
        out = m(views)
        torch.testing.assert_close(out.loss, ref)  # codes with the queue only once it is full (step 3)
        filled.append(int(m.queue_filled))
        if step >= 1:  # this batch's global embeddings were written at the pointer
            slots = (ptr + torch.arange(n)) % length
            torch.testing.assert_close(m.queue[:, slots], z)
        opt.zero_grad()
        out.loss.backward()
        m.before_optimizer_step(step, 4)
        opt.step()
        m.after_optimizer_step(step, 4)
    assert filled == [0, 4, 8, 8]
    m.eval()
    m(_views(n, 99))
    assert int(m.queue_ptr) == 4 and int(m.queue_filled) == 8  # evaluation leaves the queue alone


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_prototypes": 1}, "num_prototypes"),
        ({"temperature": 0.0}, "temperature"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"sinkhorn_iterations": 0}, "sinkhorn_iterations"),
        ({"queue_length": -1}, "queue_length"),
        ({"freeze_prototypes_steps": 1.5}, "freeze_prototypes_steps"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SwAV(**kwargs)


def test_multicrop_views_checked():
    m = _small()
    with pytest.raises(ValueError, match="at least the 2 global views"):
        m([torch.randn(4, 3, 16, 16)])
    with pytest.raises(ValueError, match="same shape"):
        m([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 8, 8)])


# ---- two gloo processes ---------------------------------------------------------------

B, WORLD, STEPS = 4, 2, 3


def _toy_swav() -> SwAV:
    """SwAV with a conv encoder and a projection head without batch norm, so the
    per-worker forward passes equal one pass over the global batch."""
    torch.manual_seed(0)
    m = SwAV(
        "small_cnn",
        backbone_args={"width": 2},
        hidden_dim=16,
        proj_dim=D,
        num_prototypes=K,
        freeze_prototypes_steps=1,
        queue_length=2 * B * WORLD,
        queue_start_step=0,
    )
    m.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    m.feat_dim = 4
    m.projector = MLP([4, 16, D], norm=False)
    return m


def _run_toy(model: nn.Module, method: SwAV, rows: slice) -> dict:
    opt = torch.optim.SGD(method.param_groups(1e-4), lr=0.5, momentum=0.9)
    losses, grads = [], []
    for step in range(STEPS):
        views = [v[rows] for v in _views(B * WORLD, 100 + step)]
        method.set_progress(step, STEPS)
        loss = model(views).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        method.before_optimizer_step(step, STEPS)
        grads.append([None if p.grad is None else p.grad.clone() for p in method.parameters()])
        opt.step()
        method.after_optimizer_step(step, STEPS)
        mean = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        losses.append(mean.item())
    return {"losses": losses, "grads": grads, "state": {k: v.clone() for k, v in method.state_dict().items()}}


def _scores_global() -> tuple[torch.Tensor, torch.Tensor]:
    return _scores(2 * B, seed=5), _scores(3, seed=6)


def _worker(rank: int, world: int) -> dict:
    rows = slice(rank * B, (rank + 1) * B)
    s, e = _scores_global()
    res = {
        "codes": sinkhorn(s[rows], 0.05, 3),
        "codes_extra": sinkhorn(s[rows], 0.05, 3, extra=e),
        "codes_local": sinkhorn(s[rows], 0.05, 3, gather_distributed=False),
    }
    method = _toy_swav()
    res.update(_run_toy(nn.parallel.DistributedDataParallel(method), method, rows))
    return res


@pytest.fixture(scope="module")
def two_process_results() -> list[dict]:
    return run_workers(_worker, WORLD)  # once for the whole file


def test_sinkhorn_two_processes_equal_one_process_with_global_batch(two_process_results):
    s, e = _scores_global()
    ref, ref_extra = sinkhorn(s, 0.05, 3), sinkhorn(s, 0.05, 3, extra=e)
    for rank in range(WORLD):
        rows = slice(rank * B, (rank + 1) * B)
        r = two_process_results[rank]
        torch.testing.assert_close(r["codes"], ref[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["codes_extra"], ref_extra[rows], rtol=1e-5, atol=1e-6)
        # without gathering each worker solves its own half: different codes
        assert not torch.allclose(r["codes_local"], ref[rows], atol=1e-4)


def test_swav_two_processes_equal_one_process_with_global_batch(two_process_results):
    method = _toy_swav()
    ref = _run_toy(method, method, slice(None))
    names = [n for n, _ in method.named_parameters()]
    for rank in range(WORLD):
        r = two_process_results[rank]
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        for step in range(STEPS):
            for name, g, g_ref in zip(names, r["grads"][step], ref["grads"][step], strict=True):
                if g_ref is None:
                    assert g is None, f"step {step}: {name}"
                else:
                    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6, msg=f"step {step}: {name}")
        # the queue holds the whole global batch's embeddings, in the same order
        for k, v in ref["state"].items():
            torch.testing.assert_close(r["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert int(ref["state"]["queue_filled"]) == 2 * B * WORLD
