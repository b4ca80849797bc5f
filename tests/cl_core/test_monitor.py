"""The kNN monitor streams its bank from the shards: the same val top-1 as the whole
split held in memory (digits), a bounded bank, and one-line config errors."""

from __future__ import annotations

import pytest
import torch

from cl_core.augment import EvalTransform
from cl_core.data import shards as S
from cl_core.data.reader import load_split, sample_pipeline
from cl_core.data.sources import digits_source
from cl_core.evaluate import extract_features, knn_top1, stream_features
from cl_core.methods import get_method
from cl_core.monitor import KnnMonitor
from pipelines.config import ConfigError, load_config
from tests.cl_core.test_shards import write_set
from tests.gloo import run_workers


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    manifest = write_set(digits_source(), out, per_shard=256, min_shards=2)
    return {s: S.shard_urls(out, manifest, s)[0] for s in ("train", "val")}


def _encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return get_method("simclr")(backbone_args={"width": 8}, gather_distributed=False).encoder()


def test_streamed_features_are_the_in_memory_ones(digits_shards):
    tf, enc = EvalTransform(16), _encoder()
    x, y = load_split(digits_shards["train"], tf)
    f, labels = stream_features(enc, sample_pipeline(digits_shards["train"]), tf, batch_size=512)
    assert torch.equal(labels, y)
    assert torch.equal(f, extract_features(enc, x, batch_size=512))  # same batches: the same bits
    assert enc.training  # the mode it was in


def test_the_monitor_gives_the_whole_split_result_and_bounds_its_bank(digits_shards):
    tf, enc = EvalTransform(16), _encoder()
    (bx, by), (vx, vy) = load_split(digits_shards["train"], tf), load_split(digits_shards["val"], tf)
    whole = knn_top1(extract_features(enc, bx), by, extract_features(enc, vx), vy, k=20, temperature=0.07)
    monitor = KnnMonitor(
        digits_shards["train"], digits_shards["val"], tf, k=20, temperature=0.07, max_bank=10_000, max_val=10_000
    )
    assert monitor(enc) == whole  # digits' 1,078 training images are under the default bound
    small = KnnMonitor(
        digits_shards["train"], digits_shards["val"], tf, k=20, temperature=0.07, max_bank=100, max_val=50
    )
    fb, yb = small.features(enc, small.bank_urls, small.max_bank, None)
    assert fb.shape[0] == 100 and torch.equal(yb, by[:100])
    bounded = knn_top1(
        extract_features(enc, bx[:100]), by[:100], extract_features(enc, vx[:50]), vy[:50], k=20, temperature=0.07
    )
    assert small(enc) == bounded


def _monitor_worker(rank: int, world: int, urls: dict, max_bank: int, max_val: int):
    monitor = KnnMonitor(
        urls["train"], urls["val"], EvalTransform(16), k=20, temperature=0.07, max_bank=max_bank, max_val=max_val
    )
    return monitor(_encoder()), monitor.features(_encoder(), urls["train"], max_bank, None)


@pytest.mark.parametrize("max_bank,max_val", [(10_000, 10_000), (100, 2)])
def test_ranks_share_the_monitor_and_get_the_single_process_result(digits_shards, max_bank, max_val):
    """3 gloo ranks: each encodes every third sample; gathered in shard order, the bank
    and the val top-1 are the single process's (uneven parts, a rank with no val sample)."""
    tf, enc = EvalTransform(16), _encoder()
    alone = KnnMonitor(
        digits_shards["train"], digits_shards["val"], tf, k=20, temperature=0.07, max_bank=max_bank, max_val=max_val
    )
    expected = alone(enc)
    fb, yb = alone.features(enc, alone.bank_urls, max_bank, None)
    for top1, (f, y) in run_workers(_monitor_worker, 3, digits_shards, max_bank, max_val):
        assert top1 == pytest.approx(expected, abs=1e-9)
        assert torch.equal(y, yb)
        torch.testing.assert_close(f, fb, rtol=1e-4, atol=1e-5)


def test_the_sweep_needs_the_monitor():
    with pytest.raises(ConfigError, match=r"pretrain\.monitor\.enabled: false, but the sweep ranks"):
        load_config("default", ["pretrain.monitor.enabled=false", "sweep.enabled=true"])
    cfg = load_config("default", ["pretrain.monitor.enabled=false", "sweep.enabled=false"])
    assert not cfg.pretrain.monitor.enabled and cfg.pretrain.monitor.max_bank == 10_000
    with pytest.raises(ConfigError, match=r"pretrain\.monitor\.max_bank"):
        load_config("default", ["pretrain.monitor.max_bank=0"])
