"""The training loop in one process: metrics, checkpoint state, exact resume."""

import math

import pytest
import torch

from cl_core.augment import SimCLRTransform
from cl_core.data import shards as S
from cl_core.data.reader import ShardStream
from cl_core.data.sources import npz_source
from cl_core.engine import LoopConfig, NonFiniteLossError, TrainingLoop
from cl_core.methods import SimCLR
from tests.cl_core.test_shards import write_set


@pytest.fixture
def train_shards(npz_file, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    m = write_set(npz_source(npz_file), out, per_shard=6, min_shards=3)
    return S.shard_urls(out, m, "train")


def _loop(train_shards, epochs=2, lr_base=0.3, device_views=None, **cfg_kw):
    urls, counts = train_shards
    torch.manual_seed(0)
    method = SimCLR("small_cnn", backbone_args={"width": 4}, proj_dim=8, temperature=0.5)
    stream = ShardStream(
        urls,
        counts,
        transform=SimCLRTransform(8, color=device_views is None),
        batch_size=8,
        rank=0,
        world_size=1,
        loader_workers=0,
        shuffle_buffer=10,
        seed=0,
    )
    cfg = LoopConfig(
        epochs=epochs,
        batch_size_per_worker=8,
        optimizer="lars",
        lr_base=lr_base,
        warmup_epochs=1,
        loader_workers=0,
        **cfg_kw,
    )
    return TrainingLoop(method, method, stream, cfg, torch.device("cpu"), view_augment=device_views)


def test_loop_reports_each_epoch_with_state(train_shards):
    loop = _loop(train_shards)
    reports = []
    history = loop.run(lambda m, s: reports.append((m, s)), evaluate=lambda enc: {"val/x": 1.0})
    assert [m["epoch"] for m, _ in reports] == [1.0, 2.0] and history == [m for m, _ in reports]
    m, state = reports[-1]
    assert m["step"] == 2 * loop.steps_per_epoch and m["epoch/unique_samples"] == sum(train_shards[1])
    assert m["val/x"] == 1.0 and m["train/images_per_sec"] > 0
    assert set(state) == {
        "model",
        "optimizer",
        "scheduler",
        "epoch",
        "step",
        "torch_rng",
        "cuda_rng",
        "batch_in_epoch",
        "epoch_sums",
        "epoch_seconds",
    }
    assert state["scheduler"]["total_steps"] == 2 * loop.steps_per_epoch


def test_resume_from_state_equals_uninterrupted_run(train_shards, tmp_path):
    straight = _loop(train_shards)
    straight.run(lambda m, s: None)

    # train one epoch, checkpoint through torch.save/torch.load(weights_only=True), resume in a new loop
    one = _loop(train_shards)
    one._epoch(lambda m, s: torch.save(s, tmp_path / "state.pt"), None, None, None)
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
    from pipelines.stages._pretraining import view_transform

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
    stream = ShardStream(
        urls,
        counts,
        transform=view_transform(name, views),
        batch_size=8,
        rank=0,
        world_size=1,
        loader_workers=0,
        shuffle_buffer=10,
        seed=0,
    )
    cfg = LoopConfig(epochs=2, batch_size_per_worker=8, optimizer="sgd", lr_base=0.3, warmup_epochs=1, loader_workers=0)
    return TrainingLoop(method, method, stream, cfg, torch.device("cpu"))


def _resumed_equals_straight(name, train_shards, path, interrupt) -> None:
    """``interrupt(loop, path)`` trains a loop part way and leaves a checkpoint at
    ``path``; a fresh loop resumed from it ends with every parameter and buffer (EMA
    weights, queue, center, prototypes, bank) equal to the uninterrupted run's."""
    straight = _method_loop(name, train_shards)
    straight.run(lambda m, s: None)
    interrupt(_method_loop(name, train_shards), path)
    torch.manual_seed(123)  # the resumed loop must not depend on the process's RNG state
    resumed = _method_loop(name, train_shards)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    resumed.run(lambda m, s: None)
    ref = straight.method.state_dict()
    for k, v in resumed.method.state_dict().items():
        torch.testing.assert_close(v, ref[k], msg=f"{name}: {k}")


@pytest.mark.parametrize("name", STATEFUL)
def test_stateful_methods_resume_exactly_through_the_loop(name, train_shards, tmp_path):
    """Checkpoint after epoch 1 (torch.save / weights_only load), resume in a fresh loop."""
    _resumed_equals_straight(
        name,
        train_shards,
        tmp_path / "state.pt",
        lambda loop, path: loop._epoch(lambda m, s: torch.save(s, path), None, None, None),
    )


class _Crash(Exception):
    pass


def _crash_after_checkpoint(loop, path, at_step):
    """Run ``loop`` and stop it (as a killed worker would) right after the mid-epoch
    checkpoint at optimizer step ``at_step``, which is saved to ``path``."""

    def checkpoint(position, state):
        torch.save(state, path)
        if loop.step == at_step:
            raise _Crash(position)

    with pytest.raises(_Crash):
        loop.run(lambda m, s: None, checkpoint=checkpoint)


@pytest.mark.parametrize("loader_workers,on_device", [(0, False), (2, False), (2, True)])
def test_mid_epoch_checkpoint_resumes_at_the_next_batch(train_shards, tmp_path, loader_workers, on_device):
    """Checkpoints every 2 steps; a crash after the one at step 3 of epoch 2... resumed in a
    fresh loop gives the uninterrupted run's parameters and per-epoch metrics: the stream
    skips exactly the batches already trained on, in DataLoader order (and the colour
    augmentation on the device draws per step what the straight run drew, and the global
    generator ends where the straight run's did)."""
    import dataclasses

    from cl_core.augment_device import DeviceViews

    def loop_with(**kw):
        loop = _loop(train_shards, device_views=DeviceViews() if on_device else None)
        loop.cfg = dataclasses.replace(loop.cfg, loader_workers=loader_workers, **kw)
        loop.stream.loader_workers = loader_workers
        loop.steps_per_epoch = loop.stream.plan().steps
        return loop

    straight = loop_with()
    reports = []
    straight.run(lambda m, s: reports.append(m))
    straight_rng = torch.get_rng_state()
    steps = straight.steps_per_epoch
    assert steps >= 3, "the shard set should give a few batches per epoch"
    at = steps + 1  # one batch into the second epoch
    crashed = loop_with(checkpoint_every_steps=1)
    _crash_after_checkpoint(crashed, tmp_path / "state.pt", at)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["batch_in_epoch"]) == (1, at, 1)

    torch.manual_seed(7)
    resumed = loop_with()
    resumed.load_state_dict(state)
    assert resumed.position() == f"epoch 2, batch 1 of {steps} (step {at})"
    after = []
    resumed.run(lambda m, s: after.append(m))
    assert resumed.step == straight.step == 2 * steps
    for k, v in straight.method.state_dict().items():
        torch.testing.assert_close(resumed.method.state_dict()[k], v, msg=k)
    # the interrupted epoch's mean loss includes the batch trained before the crash
    assert after[-1]["train/loss"] == pytest.approx(reports[-1]["train/loss"], rel=1e-5)
    # and the global generator (what dropout and the methods' own draws use) where the straight run's
    # ended: starting the resumed epoch's DataLoader drew nothing from it
    assert torch.equal(torch.get_rng_state(), straight_rng)


def test_batches_before_follows_the_dataloader_order():
    """The skip per DataLoader worker equals what a real multi-worker DataLoader makes."""
    from torch.utils.data import DataLoader

    from cl_core.data.reader import batches_before

    order = [(int(w[0]), int(t[0])) for w, t in DataLoader(_Counted([1, 3, 2]), batch_size=2, num_workers=3)]
    assert order == [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1), (1, 2)]
    for k in range(len(order) + 1):
        firsts = [w for w, _ in order[:k]]
        assert batches_before([1, 3, 2], k) == ([firsts.count(j) for j in range(3)], order[k][0] if k < 6 else 0)
    with pytest.raises(ValueError, match="cannot skip 1 more"):
        batches_before([1, 3, 2], 7)


class _Counted(torch.utils.data.IterableDataset):
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        w = torch.utils.data.get_worker_info().id
        for t in range(self.batches[w]):
            yield from [(w, t), (w, t)]


def test_minutes_rule_checkpoints_inside_the_epoch(train_shards, tmp_path):
    loop = _loop(train_shards, epochs=1, checkpoint_every_minutes=1e-9)
    seen = []
    loop.run(lambda m, s: seen.append(("epoch", s["step"])), checkpoint=lambda p, s: seen.append(("mid", s["step"])))
    steps = loop.steps_per_epoch
    # after every step but the last, whose checkpoint is the epoch's
    assert seen == [("mid", i) for i in range(1, steps)] + [("epoch", steps)]


@pytest.mark.parametrize("name", ["moco", "byol", "instdisc"])
def test_stateful_methods_resume_mid_epoch(name, train_shards, tmp_path):
    """EMA weights, queues and banks come back exactly from a checkpoint inside an epoch."""
    import dataclasses

    def interrupt(loop, path):
        loop.cfg = dataclasses.replace(loop.cfg, checkpoint_every_steps=1)
        _crash_after_checkpoint(loop, path, loop.steps_per_epoch + 1)

    _resumed_equals_straight(name, train_shards, tmp_path / "state.pt", interrupt)


def test_bf16_and_channels_last_on_cpu(train_shards):
    """The GPU-path settings also run on CPU: channels_last gives the fp32 NCHW result
    (to float rounding), bf16 autocast trains with a finite loss close to fp32's."""
    from cl_core.engine import device_settings

    runs = {}
    for name, kw in {"fp32": {}, "nhwc": {"channels_last": True}, "bf16": {"precision": "bf16"}}.items():
        loop = _loop(train_shards, epochs=1, **kw)  # the loop derives its device settings from the config
        assert (loop.settings.bf16, loop.settings.channels_last) == (name == "bf16", name == "nhwc")
        loop.settings.prepare(loop.method)  # as the training worker does before DDP
        runs[name] = (loop.run(lambda m, s: None)[-1]["train/loss"], loop.method.state_dict())
    assert (
        device_settings(torch.device("cpu"), channels_last=True)
        .input(torch.zeros(2, 3, 4, 4))
        .is_contiguous(memory_format=torch.channels_last)
    )
    for k, v in runs["fp32"][1].items():
        torch.testing.assert_close(runs["nhwc"][1][k], v, atol=1e-4, rtol=1e-3, msg=k)
    assert runs["bf16"][0] == pytest.approx(runs["fp32"][0], rel=0.05) and runs["bf16"][0] != runs["fp32"][0]


def test_compile_switch_trains_like_eager(train_shards):
    """``compile: true`` compiles the networks in place: the same losses (to float
    rounding), the same state-dict keys, and a kNN pass on the compiled encoder works."""
    runs = {}
    for compiled in (False, True):
        loop = _loop(train_shards, epochs=1, compile=compiled)

        def knn_pass(encoder):  # at the training batch's shape (both views): no second, dynamic-shape compile
            return {"val/n": float(encoder(torch.zeros(16, 3, 8, 8)).shape[0])}

        runs[compiled] = loop.run(lambda m, s: None, evaluate=knn_pass)[-1], loop.state_dict()
        assert (
            hasattr(loop.method.backbone, "_compiled_call_impl")
            and (loop.method.backbone._compiled_call_impl is not None) == compiled
        )
    (eager, eager_state), (comp, comp_state) = runs[False], runs[True]
    assert comp["val/n"] == 16.0
    assert comp["train/loss"] == pytest.approx(eager["train/loss"], rel=1e-4)
    assert list(comp_state["model"]) == list(eager_state["model"])  # checkpoints load either way
    for k, v in eager_state["model"].items():
        torch.testing.assert_close(comp_state["model"][k], v, atol=1e-4, rtol=1e-3, msg=k)


def test_compile_targets_are_the_networks():
    from cl_core.downstream.classifier import build_classifier
    from cl_core.downstream.distill import DistillObjective
    from cl_core.engine import compile_networks
    from cl_core.methods import get_method

    byol = get_method("byol")("small_cnn", backbone_args={"width": 4}, proj_dim=8, proj_hidden_dim=8)
    assert [id(m) for m in byol.compile_targets()] == [id(byol.backbone), *map(id, byol.momentum_targets())]
    student, teacher = (build_classifier({"backbone": "small_cnn", "width": 4, "num_classes": 3}) for _ in range(2))
    distill = DistillObjective(student, teacher, temperature=1.0)
    assert compile_networks(distill) == [student, teacher]


def test_colour_augmentation_on_the_device(train_shards):
    """``augment_on: device``: the loader ships uint8 crops, the loop normalizes and
    jitters them batched; training runs, and the views differ from the loader path's only
    by their colours (same crops: the same per-sample seeds)."""
    from cl_core.augment_device import DeviceViews

    seen = {}

    def spy(views, generator):
        seen["in"] = [v.clone() for v in views]
        seen["out"] = DeviceViews(jitter_prob=1.0)(views, generator)
        return seen["out"]

    loop = _loop(train_shards, epochs=1, device_views=spy)
    metrics = loop.run(lambda m, s: None)[-1]
    assert metrics["train/loss"] > 0 and metrics["step"] == loop.steps_per_epoch
    assert all(v.dtype == torch.uint8 and v.shape[1:] == (3, 8, 8) for v in seen["in"])
    out = seen["out"]
    assert all(v.dtype == torch.float32 for v in out) and not torch.equal(out[0], out[1])
    # every image jittered independently: no two samples share a colour shift from the
    # plainly normalized crop
    from cl_core.augment import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    diff = (out[0] - (seen["in"][0] / 255 - mean) / std).flatten(1).mean(1)
    assert len({round(float(d), 4) for d in diff}) == len(diff)


def _two_rank_draws(rank: int, world: int, urls: list[str], counts: list[int]) -> dict:
    from cl_core.methods import get_method

    torch.manual_seed(0)  # every rank the same seed, as the stages do before building the model
    cls = get_method("instdisc")
    method = cls(**{**cls.smoke_kwargs(), "num_samples": sum(counts)}, gather_distributed=True)
    weights = torch.cat([p.detach().flatten() for p in method.parameters()])
    stream = ShardStream(
        urls,
        counts,
        transform=SimCLRTransform(8),
        batch_size=4,
        rank=rank,
        world_size=world,
        loader_workers=1,
        shuffle_buffer=10,
        seed=0,
    )
    loop = TrainingLoop(
        method, method, stream, LoopConfig(epochs=1, batch_size_per_worker=4, loader_workers=1), torch.device("cpu")
    )
    state = loop.state_dict()
    draws = torch.randint(0, 2**31, (8,))  # what the step's negatives and dropout masks draw from
    torch.manual_seed(99)
    loop.load_state_dict(state)
    return {"weights": weights, "draws": draws, "again": torch.randint(0, 2**31, (8,)), "cuda_rng": state["cuda_rng"]}


def test_each_rank_draws_its_own_step_randomness_from_shared_initial_weights(train_shards):
    """Every rank's first weights come from the shared seed; from the loop on, each rank
    has its own generator (else InstDisc/CMC would draw the same negative indices and
    SimCSE the same dropout masks on every rank), and a checkpoint restores each rank's."""
    from tests.gloo import run_workers

    urls, counts = train_shards
    r0, r1 = run_workers(_two_rank_draws, 2, urls, counts)
    torch.testing.assert_close(r0["weights"], r1["weights"])
    assert not torch.equal(r0["draws"], r1["draws"])
    assert torch.equal(r0["again"], r0["draws"]) and torch.equal(r1["again"], r1["draws"])
    assert r0["cuda_rng"] == [None, None]  # CPU workers: no CUDA generator to keep


def test_per_parameter_clipping_is_dinos():
    """clip_per_parameter against DINO's utils.clip_gradients re-derived: each tensor's
    gradient scaled by clip / (norm + 1e-6) where that is below 1, the others untouched."""
    from cl_core.engine import clip_per_parameter

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(4, 3), (5,), (2, 2)]]
    grads = [torch.randn(p.shape, generator=g) * scale for p, scale in zip(params, (10.0, 0.1, 3.0), strict=True)]
    for p, gr in zip(params, grads, strict=True):
        p.grad = gr.clone()
    clip_per_parameter(params, 3.0)
    for p, gr in zip(params, grads, strict=True):
        norm = gr.norm(2).item()
        coef = 3.0 / (norm + 1e-6)
        torch.testing.assert_close(p.grad, gr * coef if coef < 1 else gr)
    assert params[0].grad.norm().item() == pytest.approx(3.0, rel=1e-5)  # the large one is clipped
    torch.testing.assert_close(params[1].grad, grads[1])  # the small one is not


def test_weight_decay_schedule_is_dinos_cosine():
    """weight_decay_at against DINO's cosine_scheduler(base, final, epochs, niter_per_ep)
    re-derived: final + (base - final) / 2 * (1 + cos(pi * i / total)) at iteration i."""
    from cl_core.engine import weight_decay_at

    total = 37
    ref = [0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * i / total)) for i in range(total)]
    assert [weight_decay_at(i, total, 0.04, 0.4) for i in range(total)] == pytest.approx(ref)
    assert weight_decay_at(0, total, 0.04, 0.4) == pytest.approx(0.04)


def test_dino_trains_with_its_loop_defaults_and_a_config_turns_them_off(train_shards):
    from cl_core.engine import weight_decay_at

    loop = _method_loop("dino", train_shards)
    assert (loop.grad_clip, loop.weight_decay_end) == (3.0, 0.4)
    seen = []
    loop.run(lambda m, s: seen.append(m))
    last = weight_decay_at(loop.total_steps - 1, loop.total_steps, loop.cfg.weight_decay, 0.4)
    assert seen[-1]["train/weight_decay"] == pytest.approx(last)
    groups = loop.optimizer.param_groups
    assert any(g["weight_decay"] == pytest.approx(last) for g in groups)
    assert all(g["weight_decay"] in (0.0, pytest.approx(last)) for g in groups)  # biases and norms stay at 0
    other = _method_loop("simclr", train_shards)
    assert (other.grad_clip, other.weight_decay_end) == (0.0, None)
    import dataclasses

    off = _method_loop("dino", train_shards)
    off = TrainingLoop(
        off.method,
        off.method,
        off.stream,
        dataclasses.replace(off.cfg, grad_clip=0.0, weight_decay_end=None),
        torch.device("cpu"),
    )
    assert off.grad_clip == 0.0 and off.weight_decay_end == 0.4  # None keeps the method's default
