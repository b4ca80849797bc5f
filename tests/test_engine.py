"""The training loop in one process: metrics, checkpoint state, exact resume."""

import pytest
import torch

from cl_core.augment import SimCLRTransform
from cl_core.data import shards as S
from cl_core.data.reader import ShardStream
from cl_core.data.sources import npz_source
from cl_core.engine import LoopConfig, NonFiniteLossError, PretrainLoop
from cl_core.methods import SimCLR
from tests.test_shards import write_set


@pytest.fixture
def train_shards(npz_file, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    m = write_set(npz_source(npz_file), out, per_shard=6, min_shards=3)
    return S.shard_urls(out, m, "train")


def _loop(train_shards, epochs=2, lr_base=0.3):
    urls, counts = train_shards
    torch.manual_seed(0)
    method = SimCLR("small_cnn", backbone_args={"width": 4}, proj_dim=8, temperature=0.5)
    stream = ShardStream(urls, counts, transform=SimCLRTransform(8), batch_size=8, rank=0, world_size=1,
                         loader_workers=0, shuffle_buffer=10, seed=0)
    cfg = LoopConfig(epochs=epochs, batch_size_per_worker=8, optimizer="lars", lr_base=lr_base, warmup_epochs=1,
                     loader_workers=0)
    return PretrainLoop(method, method, stream, cfg, torch.device("cpu"))


def test_loop_reports_each_epoch_with_state(train_shards):
    loop = _loop(train_shards)
    reports = []
    history = loop.run(lambda m, s: reports.append((m, s)), evaluate=lambda enc: {"val/x": 1.0})
    assert [m["epoch"] for m, _ in reports] == [1.0, 2.0] and history == [m for m, _ in reports]
    m, state = reports[-1]
    assert m["step"] == 2 * loop.steps_per_epoch and m["epoch/unique_samples"] == sum(train_shards[1])
    assert m["val/x"] == 1.0 and m["train/images_per_sec"] > 0
    assert set(state) == {"model", "optimizer", "scheduler", "epoch", "step", "torch_rng"}
    assert state["scheduler"]["total_steps"] == 2 * loop.steps_per_epoch


def test_resume_from_state_equals_uninterrupted_run(train_shards, tmp_path):
    straight = _loop(train_shards)
    straight.run(lambda m, s: None)

    # train one epoch, checkpoint through torch.save/torch.load(weights_only=True), resume in a new loop
    one = _loop(train_shards)
    one._epoch(lambda m, s: torch.save(s, tmp_path / "state.pt"), None, None)
    resumed = _loop(train_shards)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed.epoch == 1 and resumed.step == one.steps_per_epoch
    resumed.run(lambda m, s: None)
    for a, b in zip(straight.method.state_dict().values(), resumed.method.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_non_finite_loss_stops_with_the_step(train_shards):
    loop = _loop(train_shards, lr_base=1e30)
    with pytest.raises(NonFiniteLossError, match="at step"):
        loop.run(lambda m, s: None)


STATEFUL = ["moco", "byol", "dino", "swav", "instdisc", "cmc"]  # EMA weights, queues, centers, prototypes, banks


def _method_loop(name, train_shards):
    import inspect

    from cl_core.methods import get_method
    from pipelines.config import ViewsConfig
    from pipelines.stages.pretrain import view_transform

    urls, counts = train_shards
    cls = get_method(name)
    kwargs = cls.smoke_kwargs()
    if "num_samples" in inspect.signature(cls.__init__).parameters:
        kwargs["num_samples"] = sum(counts)
    if name == "swav":
        kwargs["queue_length"], kwargs["queue_start_step"] = 16, 2  # the queue starts mid-run
    if name == "cmc":
        kwargs["objective"] = "memory_bank"
    torch.manual_seed(0)
    method = cls(**kwargs, gather_distributed=False)
    views = ViewsConfig(image_size=8, crop_min_scale=0.3, local_views=2, local_image_size=4)
    stream = ShardStream(urls, counts, transform=view_transform(name, views), batch_size=8, rank=0, world_size=1,
                         loader_workers=0, shuffle_buffer=10, seed=0)
    cfg = LoopConfig(epochs=2, batch_size_per_worker=8, optimizer="sgd", lr_base=0.3, warmup_epochs=1,
                     loader_workers=0)
    return PretrainLoop(method, method, stream, cfg, torch.device("cpu"))


@pytest.mark.parametrize("name", STATEFUL)
def test_stateful_methods_resume_exactly_through_the_loop(name, train_shards, tmp_path):
    """Checkpoint after epoch 1 (torch.save / weights_only load), resume in a fresh loop:
    every parameter and buffer (EMA weights, queue, center, prototypes, bank) equals the
    uninterrupted run's."""
    straight = _method_loop(name, train_shards)
    straight.run(lambda m, s: None)
    one = _method_loop(name, train_shards)
    one._epoch(lambda m, s: torch.save(s, tmp_path / "state.pt"), None, None)
    torch.manual_seed(123)  # the resumed loop must not depend on the process's RNG state
    resumed = _method_loop(name, train_shards)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    resumed.run(lambda m, s: None)
    ref = straight.method.state_dict()
    for k, v in resumed.method.state_dict().items():
        torch.testing.assert_close(v, ref[k], msg=f"{name}: {k}")
