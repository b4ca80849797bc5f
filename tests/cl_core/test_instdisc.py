"""InstDisc: NCE and InfoNCE against loops over samples and negatives, the fixed
normaliser Z, the bank update, index checks, and two gloo processes against one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cl_core.losses.nce import bank_info_nce_loss, estimate_partition, nce_loss
from cl_core.methods.instdisc import InstDisc
from tests.gloo import run_workers

NUM_SAMPLES, T = 20, 0.07


def _method(seed: int = 0, **kw) -> InstDisc:
    torch.manual_seed(seed)
    args = {**InstDisc.smoke_kwargs(), "num_samples": NUM_SAMPLES, "temperature": T, "gather_distributed": False, **kw}
    return InstDisc(**args)


def _batch(n: int = 6, seed: int = 1) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 12, 12, generator=g)
    index = torch.randperm(NUM_SAMPLES, generator=g)[:n]
    negatives = torch.randint(0, NUM_SAMPLES, (n, 5), generator=g)
    return [x], index, negatives


def nce_reference(v, bank, index, negatives, t, z, n) -> float:
    """Eq. 5-6 of InstDisc one sample and one noise sample at a time."""
    m = negatives.shape[1]
    pn = 1.0 / n
    total = 0.0
    for i in range(len(v)):
        p = math.exp(float(v[i] @ bank[index[i]]) / t) / z
        term = -math.log(p / (p + m * pn))
        for j in negatives[i].tolist():
            q = math.exp(float(v[i] @ bank[j]) / t) / z
            term -= math.log(1 - q / (q + m * pn))
        total += term
    return total / len(v)


def infonce_reference(v, bank, index, negatives, t) -> float:
    total = 0.0
    for i in range(len(v)):
        pos = math.exp(float(v[i] @ bank[index[i]]) / t)
        den = pos + sum(math.exp(float(v[i] @ bank[j]) / t) for j in negatives[i].tolist())
        total += -math.log(pos / den)
    return total / len(v)


def z_reference(v, bank, negatives, t, n) -> float:
    vals = [math.exp(float(v[i] @ bank[j]) / t) for i in range(len(v)) for j in negatives[i].tolist()]
    return n * sum(vals) / len(vals)


# ---- the loss functions ------------------------------------------------------------


@pytest.mark.parametrize("t,z,n", [(0.07, 300.0, 1000), (0.5, 5.0, 10), (1.0, 50.0, 40)])
def test_nce_loss_matches_loop(t, z, n):
    g = torch.Generator().manual_seed(2)
    v = F.normalize(torch.randn(5, 4, generator=g), dim=1).double()
    bank = F.normalize(torch.randn(n, 4, generator=g), dim=1).double()
    index = torch.randint(0, n, (5,), generator=g)
    negatives = torch.randint(0, n, (5, 7), generator=g)
    pos, neg = (v * bank[index]).sum(1), torch.einsum("nd,nkd->nk", v, bank[negatives])
    loss, pos_prob = nce_loss(pos, neg, temperature=t, partition=z, num_samples=n)
    assert loss.item() == pytest.approx(nce_reference(v, bank, index, negatives, t, z, n), rel=1e-5)
    p = (pos / t).exp() / z
    assert pos_prob.item() == pytest.approx((p / (p + 7 / n)).mean().item(), rel=1e-5)
    assert estimate_partition(neg, t, n).item() == pytest.approx(z_reference(v, bank, negatives, t, n), rel=1e-5)


def test_nce_loss_is_finite_for_extreme_probabilities():
    pos = torch.tensor([1.0, -1.0])
    neg = torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    loss, _ = nce_loss(pos, neg, temperature=0.01, partition=1e30, num_samples=10**6)
    assert torch.isfinite(loss)


def test_info_nce_loss_matches_loop():
    g = torch.Generator().manual_seed(3)
    pos, neg = torch.rand(4, generator=g) * 2 - 1, torch.rand(4, 6, generator=g) * 2 - 1
    loss, pos_prob = bank_info_nce_loss(pos, neg, temperature=0.2)
    ref = (
        sum(
            -math.log(math.exp(pos[i] / 0.2) / (math.exp(pos[i] / 0.2) + sum(math.exp(s / 0.2) for s in neg[i])))
            for i in range(4)
        )
        / 4
    )
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    probs = torch.softmax(torch.cat([pos[:, None], neg], 1) / 0.2, dim=1)[:, 0]
    assert pos_prob.item() == pytest.approx(probs.mean().item(), rel=1e-5)


# ---- the method --------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["nce", "infonce"])
def test_method_matches_loop_reference_with_given_negatives(loss):
    m = _method(loss=loss).train()
    views, index, negatives = _batch()
    bank = m.memory.bank.clone().double()
    out = m(views, index=index, negatives=negatives)
    with torch.no_grad():
        v = m.embed(views[0]).double()  # train-mode batch statistics of the same batch
    if loss == "nce":
        z = z_reference(v, bank, negatives, T, NUM_SAMPLES)
        assert m.partition.item() == pytest.approx(z, rel=1e-5)
        ref = nce_reference(v, bank, index, negatives, T, z, NUM_SAMPLES)
    else:
        assert m.partition.item() == 0.0  # InfoNCE needs no normaliser
        ref = infonce_reference(v, bank, index, negatives, T)
    assert out.loss.item() == pytest.approx(ref, rel=1e-5)
    assert set(out.metrics) == {"train/loss", "train/pos_prob", "train/pos_sim"}
    cos = float((v * bank[index]).sum(1).mean())
    assert out.metrics["train/pos_sim"].item() == pytest.approx(cos, rel=1e-5, abs=1e-6)


def test_partition_is_estimated_once_then_fixed():
    m = _method().train()
    views, index, negatives = _batch(seed=1)
    m(views, index=index, negatives=negatives)
    z1 = m.partition.clone()
    assert z1 > 0 and "partition" in m.state_dict()
    views2, index2, negatives2 = _batch(seed=2)
    bank = m.memory.bank.clone().double()
    out = m(views2, index=index2, negatives=negatives2)  # a different batch and bank: Z stays
    assert torch.equal(m.partition, z1)
    with torch.no_grad():
        v = m.embed(views2[0]).double()
    assert out.loss.item() == pytest.approx(
        nce_reference(v, bank, index2, negatives2, T, z1.item(), NUM_SAMPLES), rel=1e-5
    )
    fresh = _method(seed=5)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.partition, z1)


def test_eval_mode_changes_no_state():
    m = _method().eval()
    views, index, negatives = _batch()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m(views, index=index, negatives=negatives)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("momentum", [0.5, 0.0, 0.9])
def test_bank_update_formula_at_batch_indices_only(momentum):
    m = _method(bank_momentum=momentum).train()
    views, index, negatives = _batch()
    old = m.memory.bank.clone()
    m(views, index=index, negatives=negatives)
    with torch.no_grad():
        v = m.embed(views[0])
    new = m.memory.bank
    torch.testing.assert_close(new[index], F.normalize(momentum * old[index] + (1 - momentum) * v, dim=1))
    rest = torch.ones(NUM_SAMPLES, dtype=torch.bool)
    rest[index] = False
    assert torch.equal(new[rest], old[rest])
    torch.testing.assert_close(new.norm(dim=1), torch.ones(NUM_SAMPLES))


def test_loss_uses_the_bank_from_before_the_update():
    m = _method(loss="infonce").train()
    views, index, negatives = _batch()
    bank = m.memory.bank.clone()
    out = m(views, index=index, negatives=negatives)
    with torch.no_grad():
        v = m.embed(views[0]).double()
    assert out.loss.item() == pytest.approx(infonce_reference(v, bank.double(), index, negatives, T), rel=1e-5)
    assert not torch.equal(m.memory.bank, bank)


def test_drawn_negatives_are_uniform_over_the_other_samples():
    m = _method(num_negatives=4000)
    index = torch.tensor([0, 7, NUM_SAMPLES - 1])
    torch.manual_seed(0)
    neg = m.draw_negatives(index)
    assert neg.shape == (3, 4000) and neg.min() >= 0 and neg.max() < NUM_SAMPLES
    for row, i in zip(neg, index.tolist(), strict=True):
        assert not (row == i).any()
        counts = torch.bincount(row, minlength=NUM_SAMPLES).float()
        counts = torch.cat([counts[:i], counts[i + 1 :]])
        assert counts.min() > 0.6 * 4000 / (NUM_SAMPLES - 1) and counts.max() < 1.4 * 4000 / (NUM_SAMPLES - 1)


def test_forward_draws_negatives_from_torch_generator():
    views, index, _ = _batch()
    losses = []
    for _ in range(2):
        m = _method(loss="infonce").train()
        torch.manual_seed(11)
        losses.append(m(views, index=index).loss.item())
    assert losses[0] == losses[1]


def test_bad_indices_give_clear_errors():
    m = _method()
    views, index, negatives = _batch()
    with pytest.raises(ValueError, match=f"memory bank of {NUM_SAMPLES} entries got sample index {NUM_SAMPLES}"):
        m(views, index=torch.tensor([0, 1, 2, 3, 4, NUM_SAMPLES]))
    with pytest.raises(ValueError, match="does not number its samples"):
        m(views, index=torch.tensor([0, 1, -1, 3, 4, 5]))
    with pytest.raises(ValueError, match="needs index"):
        m(views)
    with pytest.raises(ValueError, match="index must be 6 integers"):
        m(views, index=index[:5])
    with pytest.raises(ValueError, match="memory bank"):
        m(views, index=index, negatives=negatives + NUM_SAMPLES)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"loss": "softmax"}, "loss"),
        ({"temperature": 0.0}, "temperature"),
        ({"num_negatives": 0}, "num_negatives"),
        ({"bank_momentum": 1.0}, "bank_momentum"),
        ({"num_samples": 1}, "num_samples"),
        ({"proj_dim": 0}, "proj_dim"),
    ],
)
def test_hyperparameters_are_validated(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _method(**kwargs)


def test_paper_defaults_and_structure():
    from cl_core.methods import get_method, method_params

    assert get_method("instdisc") is InstDisc
    assert method_params("instdisc") == {
        "loss": "nce",
        "temperature": 0.07,
        "num_negatives": 4096,
        "bank_momentum": 0.5,
        "proj_dim": 128,
    }
    assert InstDisc.needs_index and InstDisc.view_kind == "single" and not InstDisc.uses_labels
    m = InstDisc(num_samples=30, backbone_args={"width": 4})
    assert m.memory.bank.shape == (30, 128) and m.proj.out_features == 128


# ---- two gloo processes x B == one process x 2B ----------------------------------------

B, WORLD, K = 4, 2, 6


def _grads(params) -> list[torch.Tensor]:
    """Copies of the gradients, every parameter having one."""
    out = []
    for p in params:
        assert p.grad is not None
        out.append(p.grad.clone())
    return out


def _toy_method(loss: str) -> InstDisc:
    """The smoke instance with a BN-free backbone, so a sample's feature does not depend on
    the rest of its batch."""
    m = _method(loss=loss, gather_distributed=True)
    torch.manual_seed(1)
    m.backbone = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(3 * 3 * 3, m.feat_dim), nn.ReLU())
    return m.train()


def _global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(WORLD * B, 3, 12, 12, generator=g)
    index = torch.randperm(NUM_SAMPLES, generator=g)[: WORLD * B]
    negatives = torch.randint(0, NUM_SAMPLES, (WORLD * B, K), generator=g)
    return x, index, negatives


def _run(model: nn.Module, method: InstDisc, sl: slice) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x, index, negatives = _global_batch()
    loss = model([x[sl]], index=index[sl], negatives=negatives[sl]).loss
    loss.backward()
    return loss.detach(), _grads(p for p in method.parameters() if p.requires_grad)


def _worker(rank: int, world: int) -> dict:
    results = {}
    for loss_kind in ("nce", "infonce"):
        method = _toy_method(loss_kind)
        model = nn.parallel.DistributedDataParallel(method)  # averages the gradients over ranks
        loss, grads = _run(model, method, slice(rank * B, (rank + 1) * B))
        dist.all_reduce(loss)
        results[loss_kind] = {
            "loss": (loss / world).item(),
            "grads": grads,
            "bank": method.memory.bank.clone(),
            "partition": method.partition.clone(),
        }
    return results


def test_two_gloo_processes_equal_one_process_with_global_batch():
    results = run_workers(_worker, WORLD)
    x, index, _ = _global_batch()
    for loss_kind in ("nce", "infonce"):
        method = _toy_method(loss_kind)
        initial = method.memory.bank.clone()
        loss, grads = _run(method, method, slice(None))
        for rank in range(WORLD):
            r = results[rank][loss_kind]
            assert r["loss"] == pytest.approx(loss.item(), rel=1e-5), loss_kind
            for g, ref in zip(r["grads"], grads, strict=True):
                torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
            # both ranks' features landed at their indices in every rank's bank, as one process
            # updating with the concatenated batch
            torch.testing.assert_close(r["bank"], method.memory.bank)
            torch.testing.assert_close(r["partition"], method.partition)
        assert torch.equal(results[0][loss_kind]["bank"], results[1][loss_kind]["bank"])
        with torch.no_grad():
            v = method.embed(x)
        torch.testing.assert_close(method.memory.bank[index], F.normalize(0.5 * initial[index] + 0.5 * v, dim=1))
