"""SimCSE: Eq. 1 against a loop reference and a hand value, the encoder's dropout noise
and padding mask, the method's wiring, two gloo workers == one worker with the global
batch, and a short training run on the pydoc corpus that improves alignment."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cl_core.data.text import TextTransform
from cl_core.losses.simcse import SimCSELoss
from cl_core.methods import get_method
from cl_core.methods.simcse import SimCSE
from cl_core.text.corpus import python_docs_sentences
from cl_core.text.encoder import TextTransformer
from cl_core.text.tokenizer import CLS, PAD, SEP, train_bpe
from tests.gloo import run_workers

B, WORLD, VOCAB, L = 4, 2, 50, 12


def slow_simcse(h: torch.Tensor, h_pos: torch.Tensor, t: float) -> torch.Tensor:
    """Eq. 1 of SimCSE, one anchor at a time, in float64."""
    h, h_pos = h.double(), h_pos.double()
    total = torch.zeros((), dtype=torch.float64)
    for i in range(len(h)):
        num = torch.exp(F.cosine_similarity(h[i], h_pos[i], dim=0) / t)
        den = sum(torch.exp(F.cosine_similarity(h[i], h_pos[j], dim=0) / t) for j in range(len(h)))
        total = total - torch.log(num / den)
    return total / len(h)


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return SimCSE.example_batch(n, L, generator=g)["views"][0].clamp(max=VOCAB - 1)


def _method(dropout: float = 0.1, **kw) -> SimCSE:
    torch.manual_seed(0)
    return SimCSE(vocab_size=VOCAB, max_len=L, dim=16, depth=2, heads=2, dropout=dropout, temperature=0.1, **kw)


# ---- the loss -----------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.05, 0.5])
def test_loss_matches_loop_reference(t):
    g = torch.Generator().manual_seed(0)
    h, hp = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    got = SimCSELoss(t, gather_distributed=False)(h, hp)
    torch.testing.assert_close(got.double(), slow_simcse(h, hp, t), rtol=1e-5, atol=1e-6)


def test_loss_hand_value():
    # h = (e1, e2); h+ = (e1, (e1 + e2)/sqrt 2); T = 0.5
    # anchor 0: cos to h+ = (1, 1/sqrt2); anchor 1: (0, 1/sqrt2); its positive is the second
    h = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    hp = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    c = 1 / math.sqrt(2)
    l0 = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + math.exp(c / 0.5)))
    l1 = -math.log(math.exp(c / 0.5) / (math.exp(0.0) + math.exp(c / 0.5)))
    got = SimCSELoss(0.5)(h, hp)
    assert got.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # one-directional with the other pass as negatives only: not NT-Xent's symmetric loss
    assert SimCSELoss(0.5)(hp, h).item() != pytest.approx(got.item(), rel=1e-3)


def test_loss_checks():
    with pytest.raises(ValueError, match="temperature"):
        SimCSELoss(0.0)
    with pytest.raises(ValueError, match="equal shape"):
        SimCSELoss()(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="at least 2"):
        SimCSELoss()(torch.randn(1, 4), torch.randn(1, 4))


# ---- the encoder ----------------------------------------------------------------------


def test_dropout_makes_two_passes_differ_in_train_mode_and_agree_in_eval_mode():
    torch.manual_seed(0)
    enc = TextTransformer(VOCAB, dim=16, depth=2, heads=2, max_len=L, dropout=0.1)
    ids = _ids(6)
    enc.train()
    a, b = enc(ids), enc(ids)
    assert a.shape == (6, 16) and not torch.allclose(a, b)
    enc.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc(ids), enc(ids))
    torch.manual_seed(0)
    no_drop = TextTransformer(VOCAB, dim=16, depth=2, heads=2, max_len=L, dropout=0.0).train()
    torch.testing.assert_close(no_drop(ids), no_drop(ids))


def test_padding_is_masked_and_lengths_are_checked():
    torch.manual_seed(0)
    enc = TextTransformer(VOCAB, dim=16, depth=2, heads=2, max_len=L + 4, dropout=0.1).eval()
    ids = _ids(5)
    longer = torch.cat([ids, torch.full((5, 4), PAD)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(enc(longer), enc(ids), rtol=1e-5, atol=1e-5)
        other_pad = ids.clone()
        last = (ids != PAD).sum(1) - 1  # [SEP]
        assert (ids[torch.arange(5), last] == SEP).all()
        other_pad[0, last[0]] = 7  # a real token changes the sentence's embedding
        assert not torch.allclose(enc(other_pad)[0], enc(ids)[0])
    with pytest.raises(ValueError, match="max_len"):
        enc(torch.ones(2, L + 5, dtype=torch.long))
    with pytest.raises(ValueError, match="heads"):
        TextTransformer(VOCAB, dim=10, heads=3)


# ---- the method -----------------------------------------------------------------------


def test_forward_is_eq1_on_the_mlp_over_two_dropout_passes():
    m = _method().train()
    ids = _ids(6)
    torch.manual_seed(5)
    out = m([ids])
    torch.manual_seed(5)
    z = m.mlp(m.backbone(torch.cat([ids, ids])))
    torch.testing.assert_close(out.loss.double(), slow_simcse(z[:6], z[6:], 0.1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(z[:6], z[6:])  # the two passes differ only by dropout
    assert set(out.metrics) == {"train/loss", "train/pos_acc", "train/pos_sim", "train/neg_sim", "train/emb_std"}
    # without dropout both passes are equal: cosine 1 with the positive
    out0 = _method(dropout=0.0).train()([ids])
    assert out0.metrics["train/pos_sim"].item() == pytest.approx(1.0, abs=1e-5)


def test_encoder_is_cls_without_the_training_mlp():
    m = _method().eval()
    ids = _ids(3)
    enc = m.encoder()
    assert enc is m.backbone and m.feat_dim == 16
    with torch.no_grad():
        assert enc(ids).shape == (3, 16)
    both = _method(pooler="cls_mlp").eval()
    with torch.no_grad():
        torch.testing.assert_close(both.encoder()(ids), both.mlp(both.backbone(ids)))
    plain = _method(pooler="cls")
    assert not hasattr(plain, "mlp") and plain.encoder() is plain.backbone


def test_constructor_checks_and_backbone_args():
    with pytest.raises(ValueError, match="text encoder.*'resnet18'"):
        SimCSE("resnet18")
    bad: list[tuple[dict, str]] = [
        ({"temperature": 0}, "temperature"),
        ({"dropout": 1.0}, "dropout"),
        ({"heads": 3}, "heads"),
        ({"pooler": "avg"}, "pooler"),
        ({"vocab_size": 2}, "vocab_size"),
        ({"max_len": 1}, "max_len"),
    ]
    for kw, name in bad:
        with pytest.raises(ValueError, match=name):
            SimCSE(**{**SimCSE.smoke_kwargs(), **kw})
    m = SimCSE(
        **{**SimCSE.smoke_kwargs(), "backbone_args": {"dim": 8, "heads": 2, "width": 4}}
    )  # sizes win; width ignored
    assert m.feat_dim == 8 and m.backbone.dim == 8
    assert get_method("simcse") is SimCSE and SimCSE.view_kind == "text"


def test_example_batch_is_framed_and_padded():
    ids = SimCSE.example_batch(6, 16, generator=torch.Generator().manual_seed(0))["views"][0]
    assert ids.shape == (6, 16) and ids.dtype == torch.long
    lengths = (ids != PAD).sum(1)
    assert (ids[:, 0] == CLS).all() and (ids[torch.arange(6), lengths - 1] == SEP).all()
    assert all((row[n:] == PAD).all() for row, n in zip(ids, lengths.tolist(), strict=True))


# ---- two gloo workers ---------------------------------------------------------------------


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(6, 5)


def _vectors() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(WORLD * B, 6, generator=g), torch.randn(WORLD * B, 6, generator=g)


def _mean(x: torch.Tensor) -> float:
    y = x.detach().clone()
    dist.all_reduce(y)
    return (y / WORLD).item()


def _worker(rank: int, world: int) -> dict:
    sl = slice(rank * B, (rank + 1) * B)
    # the loss alone, on distinct positives
    lin = nn.parallel.DistributedDataParallel(_linear())
    x0, x1 = _vectors()
    loss = SimCSELoss(0.1)(lin(x0[sl]), lin(x1[sl]))
    loss.backward()
    local = SimCSELoss(0.1, gather_distributed=False)(lin(x0[sl]), lin(x1[sl]))
    res = {
        "loss": _mean(loss),
        "grads": [p.grad.clone() for p in lin.parameters() if p.grad is not None],
        "local": _mean(local),
    }
    # the whole method without dropout (both passes equal)
    method = nn.parallel.DistributedDataParallel(_method(dropout=0.0).train())
    step = method([_ids(world * B)[sl]])
    step.loss.backward()
    res |= {
        "m_loss": _mean(step.loss),
        "m_grads": {k: p.grad.clone() for k, p in method.module.named_parameters() if p.grad is not None},
    }
    return res


@pytest.fixture(scope="module")
def gloo_results() -> list[dict]:
    return run_workers(_worker, WORLD)  # once for the whole file


def test_two_gloo_workers_equal_one_worker_with_the_global_batch(gloo_results):
    lin = _linear()
    x0, x1 = _vectors()
    loss = SimCSELoss(0.1)(lin(x0), lin(x1))
    loss.backward()
    method = _method(dropout=0.0).train()
    step = method([_ids(WORLD * B)])
    step.loss.backward()
    for rank in range(WORLD):
        r = gloo_results[rank]
        assert r["loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert r["local"] < r["loss"]  # each worker alone has fewer negatives
        for g, p in zip(r["grads"], lin.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
        assert r["m_loss"] == pytest.approx(step.loss.item(), rel=1e-5)
        for k, p in method.named_parameters():
            torch.testing.assert_close(r["m_grads"][k], p.grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {k}")


# ---- a short training run ------------------------------------------------------------------


def _drop_word(s: str, rng: random.Random) -> str:
    words = s.split()
    del words[rng.randrange(len(words))]
    return " ".join(words)


@torch.no_grad()
def _alignment_gap(method: SimCSE, tf: TextTransform, sentences: list[str]) -> float:
    """Mean cosine of a sentence and its copy with one word dropped, minus the mean
    cosine of random pairs of sentences (eval-mode embeddings)."""
    rng = random.Random(0)
    enc = method.encoder().eval()
    a = F.normalize(enc(tf.batch(sentences)), dim=1)
    b = F.normalize(enc(tf.batch([_drop_word(s, rng) for s in sentences])), dim=1)
    perm = list(range(len(sentences)))
    rng.shuffle(perm)
    method.train()
    return ((a * b).sum(1).mean() - (a * a[perm]).sum(1).mean()).item()


def test_short_training_on_the_pydoc_corpus_improves_alignment():
    sentences = python_docs_sentences(500)
    train, held_out = sentences[:400], sentences[400:]
    tf = TextTransform(train_bpe(train, 800), 32)
    torch.manual_seed(0)
    m = SimCSE(vocab_size=tf.tokenizer.vocab_size, max_len=32, dim=48, depth=2, heads=4, gather_distributed=False)
    before = _alignment_gap(m, tf, held_out)
    ids = tf.batch(train)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        x = ids[torch.randint(0, len(train), (48,), generator=g)]
        x = x[:, : int((x != PAD).sum(1).max())]  # drop all-padding columns
        out = m([x])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = _alignment_gap(m, tf, held_out)
    # random init: every sentence looks alike; trained: copies stay close, others spread
    assert after > before + 0.15, (before, after)
    assert out.metrics["train/pos_acc"] > 0.5  # the positive is found among 47 negatives
