"""MoCo v1/v2 and MoCo v3: InfoNCE against loop references, EMA and momentum schedule,
the queue, the frozen ViT patch projection, and two gloo processes against one process
with the global batch (queue filling, gathered loss and gradients, shuffling BN)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl_core.losses.infonce import gathered_infonce, queue_infonce
from cl_core.methods.moco import MoCo
from cl_core.methods.mocov3 import MoCoV3
from cl_core.models.momentum import cosine_momentum
from cl_core.models.shuffle_bn import shuffled_forward
from tests.gloo import run_workers

WORLD, B, SIZE = 2, 4, 16  # processes, samples per process, image side
SHUFFLE_SEED = 5  # its permutation of the 2B global batch sends samples of both ranks to rank 0


def _moco(**kw) -> MoCo:
    torch.manual_seed(0)
    return MoCo(gather_distributed=kw.pop("gather_distributed", True), **{**MoCo.smoke_kwargs(), **kw})


def _mocov3(**kw) -> MoCoV3:
    torch.manual_seed(0)
    return MoCoV3(gather_distributed=kw.pop("gather_distributed", True), **{**MoCoV3.smoke_kwargs(), **kw})


def _views(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randn(n, 3, SIZE, SIZE, generator=g)]


# ---- InfoNCE with a queue ---------------------------------------------------------------


def _queue_reference(q, k, queue, t) -> float:
    """-log(exp(q.k+/T) / (exp(q.k+/T) + sum_j exp(q.queue_j/T))), one query at a time."""
    q, k = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    total = 0.0
    for i in range(len(q)):
        pos = math.exp(float(q[i] @ k[i]) / t)
        neg = sum(math.exp(float(q[i] @ queue[j].double()) / t) for j in range(len(queue)))
        total += -math.log(pos / (pos + neg))
    return total / len(q)


@pytest.mark.parametrize("n,d,k,t", [(1, 2, 1, 1.0), (4, 8, 16, 0.07), (7, 5, 3, 0.2), (3, 16, 40, 0.5)])
def test_queue_infonce_matches_loop_reference(n, d, k, t):
    g = torch.Generator().manual_seed(n * 100 + k)
    q, key = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    queue = F.normalize(torch.randn(k, d, generator=g), dim=1)
    out = queue_infonce(q, key, queue, t)
    assert out.loss.item() == pytest.approx(_queue_reference(q, key, queue, t), rel=1e-5)


def test_queue_infonce_hand_computed():
    # T = 0.5; query 0 = e1 (unnormalised), key e1, queue [e2, -e1]: logits [2, 0, -2]
    # query 1 = e2, key e1: logits [0, 2, 0] -> the positive is not the arg-max
    q = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    out = queue_infonce(q, k, queue, 0.5)
    l0 = math.log(1 + math.exp(-2) + math.exp(-4))
    l1 = math.log(2 + math.exp(2))
    assert out.loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    assert out.top1.item() == 0.5


def test_queue_infonce_gradient_reaches_the_query_only():
    q, k = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4)
    queue_infonce(q, k, F.normalize(torch.randn(5, 4), dim=1), 0.2).loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_infonce_rejects_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        queue_infonce(torch.randn(2, 3), torch.randn(2, 3), torch.randn(4, 3), 0.0)
    with pytest.raises(ValueError, match="queue"):
        queue_infonce(torch.randn(2, 3), torch.randn(2, 3), torch.randn(4, 5), 0.2)
    with pytest.raises(ValueError, match="shape"):
        gathered_infonce(torch.randn(2, 3), torch.randn(3, 3), 0.2)


# ---- MoCo: EMA, schedule, queue ---------------------------------------------------------


@pytest.mark.parametrize("build,step", [(_moco, 0), (_mocov3, 3)])
def test_ema_update_after_one_step(build, step):
    method = build(gather_distributed=False).train()
    online = [method.backbone, method.head] if isinstance(method, MoCo) else [method.backbone, method.projector]
    targets = method.momentum_targets()
    k0 = [[p.detach().clone() for p in t.parameters()] for t in targets]
    opt = torch.optim.SGD(method.param_groups(0.0), lr=0.5)
    out = method(_views(8))
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    q1 = [[p.detach().clone() for p in o.parameters()] for o in online]
    method.after_optimizer_step(step, 10)
    m = method.momentum_at(step, 10)
    assert m == (0.999 if isinstance(method, MoCo) else cosine_momentum(0.99, step, 10))
    moved = False
    for t, k_before, q_after in zip(targets, k0, q1, strict=True):
        for p, k, q in zip(t.parameters(), k_before, q_after, strict=True):
            torch.testing.assert_close(p, m * k + (1 - m) * q, rtol=1e-6, atol=1e-7)
            moved |= not torch.equal(p, k)
    assert moved


def test_cosine_momentum_schedule_values():
    for method in (_moco(momentum=0.99, momentum_schedule="cosine"), _mocov3()):
        assert method.momentum_at(0, 100) == pytest.approx(0.99)
        assert method.momentum_at(25, 100) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
        assert method.momentum_at(50, 100) == pytest.approx(0.995)
        assert method.momentum_at(100, 100) == pytest.approx(1.0)
    constant = _moco(momentum=0.99)
    assert [constant.momentum_at(s, 100) for s in (0, 50, 100)] == [0.99, 0.99, 0.99]
    # at the end of the schedule (m = 1) the target stays where it is
    method = _mocov3(gather_distributed=False)
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.key_backbone.parameters()]
    method.after_optimizer_step(100, 100)
    assert all(torch.equal(a, b) for a, b in zip(method.key_backbone.parameters(), before, strict=True))


def _keys_eval(method: MoCo, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(method.key_head(method.key_backbone(x)), dim=1)


@pytest.mark.parametrize("gather_distributed", [True, False])
def test_queue_pointer_wraps_around(gather_distributed):
    method = _moco(queue_size=12, gather_distributed=gather_distributed).eval()
    initial = method.queue.queue.clone()
    a, b = _views(8, seed=1), _views(8, seed=2)
    ka = _keys_eval(method, a[1])
    with torch.no_grad():
        qa = method.head(method.backbone(a[0]))
        out = method(a)
    # the loss used the queue from before this step's enqueue
    torch.testing.assert_close(out.loss, queue_infonce(qa, ka, initial, method.temperature).loss)
    assert int(method.queue.ptr) == 8
    torch.testing.assert_close(method.queue.queue[:8], ka)
    torch.testing.assert_close(method.queue.queue[8:], initial[8:])
    kb = _keys_eval(method, b[1])
    with torch.no_grad():
        method(b)
    assert int(method.queue.ptr) == 4  # 8 + 8 = 16 = 12 + 4
    torch.testing.assert_close(method.queue.queue[8:], kb[:4])
    torch.testing.assert_close(method.queue.queue[:4], kb[4:])
    torch.testing.assert_close(method.queue.queue[4:8], ka[4:])


def test_symmetric_moco_enqueues_both_views_and_averages_both_directions():
    method = _moco(queue_size=40, symmetric=True).eval()
    initial = method.queue.queue.clone()
    v = _views(8)
    with torch.no_grad():
        k0, k1 = _keys_eval(method, v[0]), _keys_eval(method, v[1])
        q0, q1 = method.head(method.backbone(v[0])), method.head(method.backbone(v[1]))
        out = method(v)
    expected = (queue_infonce(q0, k1, initial, 0.2).loss + queue_infonce(q1, k0, initial, 0.2).loss) / 2
    torch.testing.assert_close(out.loss, expected)
    assert int(method.queue.ptr) == 16
    torch.testing.assert_close(method.queue.queue[:16], torch.cat([k1, k0]))


def test_moco_versions_and_defaults():
    v1, v2 = _moco(version=1), _moco(version=2)
    assert v1.temperature == 0.07 and v2.temperature == 0.2
    assert [type(m) for m in v1.head] == [nn.Linear]
    assert [type(m) for m in v2.head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert v2.head[0].out_features == v2.feat_dim and v2.head[0].bias is not None
    assert _moco(version=1, temperature=0.3).temperature == 0.3
    full = MoCo()
    assert (full.queue.size, full.momentum, full.head[-1].out_features, full.shuffle_bn) == (65536, 0.999, 128, True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"version": 3}, "version"),
        ({"temperature": -1.0}, "temperature"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum_schedule": "linear"}, "momentum_schedule"),
        ({"queue_size": 0}, "queue_size"),
        ({"proj_dim": 0}, "proj_dim"),
    ],
)
def test_moco_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _moco(**kwargs)


def test_single_process_shuffle_is_transparent():
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)).train()
    x = torch.randn(10, 5)
    torch.manual_seed(3)
    torch.testing.assert_close(shuffled_forward(bn, x), bn(x).detach())  # BN statistics are order-free


# ---- MoCo v3 ----------------------------------------------------------------------------


def _ctr_reference(q, k, t) -> float:
    """2T * mean_i -log(exp(q_i.k_i/T) / sum_j exp(q_i.k_j/T)), one query at a time."""
    q, k = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    total = 0.0
    for i in range(len(q)):
        den = sum(math.exp(float(q[i] @ k[j]) / t) for j in range(len(k)))
        total += -(float(q[i] @ k[i]) / t - math.log(den))
    return 2 * t * total / len(q)


@pytest.mark.parametrize("temperature", [None, 0.2])
def test_mocov3_loss_matches_loop_reference(temperature):
    method = _mocov3(gather_distributed=False, temperature=temperature).train()
    t = 1.0 if temperature is None else temperature  # a CNN backbone: the ResNet default 1.0
    assert method.temperature == t
    x1, x2 = _views(6)
    out = method([x1, x2])
    with torch.no_grad():  # train-mode BN: the same batch gives the same outputs again
        q1, q2 = method._query(x1), method._query(x2)
        k1, k2 = method._key(x1), method._key(x2)
    expected = _ctr_reference(q1, k2, t) + _ctr_reference(q2, k1, t)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)

    def top1(q: torch.Tensor, k: torch.Tensor) -> float:
        return (q @ F.normalize(k, dim=1).T).argmax(1).eq(torch.arange(len(q))).float().mean().item()

    assert out.metrics["train/pos_top1"].item() == pytest.approx((top1(q1, k2) + top1(q2, k1)) / 2)


def test_mocov3_heads_follow_the_paper():
    cnn = _mocov3(hidden_dim=32, proj_dim=16)
    linears = [m for m in cnn.projector if isinstance(m, nn.Linear)]
    assert len(linears) == 2 and all(m.bias is None for m in linears)
    last_bn = cnn.projector[-1]
    assert isinstance(last_bn, nn.BatchNorm1d) and not last_bn.affine
    # the released builders: a CNN's predictor ends with a bias-free Linear, a ViT's with the affine-free BN
    kinds = [type(m).__name__ for m in cnn.predictor]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert all(m.bias is None for m in cnn.predictor if isinstance(m, nn.Linear))
    vit = _mocov3(
        hidden_dim=32, proj_dim=16, backbone="vit_tiny", backbone_args={"image_size": SIZE, "patch_size": 4, "depth": 1}
    )
    assert isinstance(vit.predictor[-1], nn.BatchNorm1d) and not vit.predictor[-1].affine
    assert sum(isinstance(m, nn.Linear) for m in vit.predictor) == 2
    assert not hasattr(cnn, "key_predictor") and len(cnn.momentum_targets()) == 2
    full = MoCoV3()
    assert (full.predictor[0].out_features, full.predictor[-1].out_features, full.momentum) == (4096, 256, 0.99)
    with pytest.raises(ValueError, match="momentum_schedule"):
        _mocov3(momentum_schedule="step")
    with pytest.raises(ValueError, match="proj_layers"):
        _mocov3(proj_layers=0)


def test_mocov3_vit_runs_and_patch_embed_stays_frozen():
    vit_args = {"image_size": SIZE, "patch_size": 4, "depth": 1}
    method = _mocov3(gather_distributed=False, backbone="vit_tiny", backbone_args=vit_args).train()
    assert method.temperature == 0.2
    assert sum(isinstance(m, nn.Linear) for m in method.projector) == 3
    frozen = list(method.backbone.patch_embed.parameters())
    assert frozen and all(not p.requires_grad for p in frozen)
    in_opt = {id(p) for g in method.param_groups(0.0) for p in g["params"]}
    assert not any(id(p) in in_opt for p in frozen)
    patch0 = [p.clone() for p in frozen]
    key_patch0 = [p.clone() for p in method.key_backbone.patch_embed.parameters()]
    blocks0 = [p.clone() for p in method.backbone.blocks.parameters()]
    opt = torch.optim.SGD(method.param_groups(0.0), lr=0.5)
    for step in range(2):
        out = method(_views(4, seed=step))
        assert torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        assert all(p.grad is None for p in frozen)
        opt.step()
        method.after_optimizer_step(step, 2)
    assert all(torch.equal(a, b) for a, b in zip(method.backbone.patch_embed.parameters(), patch0, strict=True))
    for a, b in zip(method.key_backbone.patch_embed.parameters(), key_patch0, strict=True):
        torch.testing.assert_close(a, b)  # the EMA of a constant up to rounding
    assert any(not torch.equal(a, b) for a, b in zip(method.backbone.blocks.parameters(), blocks0, strict=True))
    # unfrozen on request; the option is ignored for CNN backbones
    unfrozen = _mocov3(backbone="vit_tiny", backbone_args=vit_args, freeze_patch_embed=False)
    assert all(p.requires_grad for p in unfrozen.backbone.patch_embed.parameters())
    assert not _mocov3().freeze_patch_embed


# ---- two gloo processes -----------------------------------------------------------------


MOCO_CONFIGS = [{}, {"symmetric": True, "version": 1}]


def _grads(method: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in method.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n} got no gradient"
            out[n] = p.grad.detach().clone()
    return out


def _worker(rank: int, world: int) -> dict:
    mine = slice(rank * B, (rank + 1) * B)
    res: dict = {}
    # (a) MoCo: queue filling, loss and gradients (eval mode: BN statistics do not depend on the split)
    for i, cfg in enumerate(MOCO_CONFIGS):
        method = _moco(**cfg).eval()
        views = [v[mine] for v in _views(world * B)]
        local_keys = _keys_eval(method, views[1])
        model = nn.parallel.DistributedDataParallel(method)
        step = model(views)
        step.loss.backward()
        res[f"moco{i}"] = {
            "loss": step.loss.item(),
            "grads": _grads(method),
            "queue": method.queue.queue.clone(),
            "ptr": int(method.queue.ptr),
            "local_keys": local_keys,
        }
    # (b) MoCo v3: gathered loss and gradients
    method3 = _mocov3().eval()
    model3 = nn.parallel.DistributedDataParallel(method3)
    step = model3([v[mine] for v in _views(world * B)])
    step.loss.backward()
    res["mocov3"] = {"loss": step.loss.item(), "grads": _grads(method3)}
    # (c) shuffling BN: train-mode key encoder, keys of this rank's samples
    method = _moco().train()
    torch.manual_seed(SHUFFLE_SEED)
    res["shuffle"] = method.keys(_views(world * B)[1][mine])
    return res


@pytest.fixture(scope="module")
def two_process_results() -> list[dict]:
    return run_workers(_worker, WORLD)  # once for the whole file


@pytest.mark.parametrize("i", range(len(MOCO_CONFIGS)))
def test_two_processes_fill_the_queue_like_one_process(two_process_results, i):
    ref = _moco(**MOCO_CONFIGS[i]).eval()
    views = _views(WORLD * B)
    step = ref(views)
    step.loss.backward()
    ref_grads = _grads(ref)
    r0, r1 = two_process_results[0][f"moco{i}"], two_process_results[1][f"moco{i}"]
    torch.testing.assert_close(r0["queue"], r1["queue"], rtol=0, atol=0)  # every rank holds the same queue
    torch.testing.assert_close(r0["queue"], ref.queue.queue)  # == one process enqueuing the global batch
    assert r0["ptr"] == r1["ptr"] == int(ref.queue.ptr)
    # rank 0's keys, then rank 1's
    torch.testing.assert_close(r0["queue"][: WORLD * B], torch.cat([r0["local_keys"], r1["local_keys"]]))
    assert (r0["loss"] + r1["loss"]) / WORLD == pytest.approx(step.loss.item(), rel=1e-5)
    for n, g in ref_grads.items():
        for r in (r0, r1):
            torch.testing.assert_close(r["grads"][n], g, rtol=1e-4, atol=1e-6, msg=f"gradient of {n}")


def test_mocov3_two_processes_equal_one_process_with_global_batch(two_process_results):
    ref = _mocov3().eval()
    views = _views(WORLD * B)
    step = ref(views)
    step.loss.backward()
    r0, r1 = two_process_results[0]["mocov3"], two_process_results[1]["mocov3"]
    assert (r0["loss"] + r1["loss"]) / WORLD == pytest.approx(step.loss.item(), rel=1e-5)
    for n, g in _grads(ref).items():
        for r in (r0, r1):
            torch.testing.assert_close(r["grads"][n], g, rtol=1e-4, atol=1e-6, msg=f"gradient of {n}")
    # the check can fail: per-rank negatives only would give another loss
    with torch.no_grad():
        local = [_mocov3().eval()([v[s] for v in views]).loss.item() for s in (slice(0, B), slice(B, 2 * B))]
    assert sum(local) / WORLD != pytest.approx(step.loss.item(), rel=1e-3)


def test_shuffle_bn_across_two_processes(two_process_results):
    method = _moco().train()
    x = _views(WORLD * B)[1]
    torch.manual_seed(SHUFFLE_SEED)
    perm = torch.randperm(WORLD * B)  # the permutation rank 0 drew and broadcast
    assert perm[:B].lt(B).any() and perm[:B].ge(B).any(), "the permutation should mix the ranks' samples"
    with torch.no_grad():
        # the key encoder on each rank's chunk of the permuted global batch (train-mode BN per chunk)
        y = torch.cat([method._key_encoder(x[perm[c * B : (c + 1) * B]]) for c in range(WORLD)])
    expected = F.normalize(y[torch.argsort(perm)], dim=1)  # sample i's key sits at row argsort(perm)[i]
    got = torch.cat([two_process_results[r]["shuffle"] for r in range(WORLD)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # a wrong unshuffle, no unshuffle, or no shuffle (per-rank BN) all give other keys
    for wrong in (
        F.normalize(y[perm], dim=1),
        F.normalize(y, dim=1),
        torch.cat([_keys_eval(method.train(), x[c * B : (c + 1) * B]) for c in range(WORLD)]),
    ):
        assert not torch.allclose(got, wrong, atol=1e-3)
