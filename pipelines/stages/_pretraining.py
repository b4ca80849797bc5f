"""Pretraining's worker side and what the stages share about pretrained methods.

``train_worker`` runs on every Ray Train worker (DDP process) of the pretrain stage and
of each sweep trial (``make_worker_config`` builds its config); rank 0 writes the
checkpoint and the MLflow metrics, every rank reports each epoch. Also here: a pretrained
method or encoder loaded from an Encoder record (``load_method``, ``load_encoder``), the
views a method takes (``view_transform``, ``crop_plan``, ``view_stream``,
``device_views``), the val kNN monitor and the global-BatchNorm choice. The stage that
drives the pretraining is ``pipelines.stages.pretrain``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from ray import train

from cl_core import distributed
from cl_core.augment import EvalTransform, MultiCropTransform, SimCLRTransform
from cl_core.augment_device import DeviceViews
from cl_core.data import storage
from cl_core.data.device_decode import CropPlan, collate_encoded, decode_encoded, holds_jpeg
from cl_core.data.reader import ShardStream
from cl_core.data.shards import ShardCheck, read_manifest
from cl_core.data.text import load_text_split, load_tokenizer, text_stream
from cl_core.engine import TrainingLoop
from cl_core.evaluate import extract_features, knn_top1
from cl_core.methods import Method, build_method, get_method
from cl_core.models.global_bn import convert_global_bn, has_batch_norm
from cl_core.monitor import KnnMonitor
from pipelines import ray_env, tracking
from pipelines.config import (
    PretrainConfig,
    ViewsConfig,
)
from pipelines.console import Eta
from pipelines.stages._train import (
    STATE_FILE,
    loop_config,
    record_placement,
    report_checkpoint,
    verify_checkpoint,
)

CONFIG_FILE = "config.json"


def global_bn(p: PretrainConfig, world: int) -> bool:
    """Whether pretraining on ``world`` workers normalises over the global batch
    (``pretrain.sync_bn``; auto: the method's ``global_bn``, its authors' choice)."""
    if world < 2:
        return False
    return get_method(p.method).global_bn if p.sync_bn == "auto" else bool(p.sync_bn)


def knn_monitor(p: PretrainConfig, bank_urls, val_urls, device, bank_verify=None, val_verify=None) -> KnnMonitor:
    """The val kNN monitor of ``pretrain.monitor``: at most ``max_bank`` training and
    ``max_val`` val images, their features streamed from the shards at every call."""
    return KnnMonitor(
        bank_urls,
        val_urls,
        EvalTransform(p.views.image_size),
        k=p.knn_k,
        temperature=p.knn_temperature,
        max_bank=p.monitor.max_bank,
        max_val=p.monitor.max_val,
        device=device,
        bank_verify=bank_verify,
        val_verify=val_verify,
    )


def load_method(encoder: dict) -> Method:
    """The whole pretrained method (backbone and heads) of an Encoder record, loaded with
    ``weights_only``; a missing checkpoint is an error naming the file."""
    path = storage.join(encoder["checkpoint_dir"], STATE_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"{path}: the pretrained checkpoint is missing; rerun pretrain (clpipe run --rerun pretrain)"
        )
    method = build_method(encoder["model"], gather_distributed=False)
    state = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    method.load_state_dict(state["model"])
    return method


def load_encoder(encoder: dict) -> torch.nn.Module:
    """The pretrained backbone of an Encoder record, in eval mode."""
    return load_method(encoder).encoder().eval()


def view_transform(method: str, v: ViewsConfig):
    """The views the method's ``view_kind`` asks for, from the ``pretrain.views`` section
    (crop and flip only with ``augment_on: device``: :func:`device_views` does the rest)."""
    kind = get_method(method).view_kind
    color: dict[str, Any] = dict(
        hflip_prob=v.hflip_prob,
        jitter_strength=v.jitter_strength,
        jitter_prob=v.jitter_prob,
        grayscale_prob=v.grayscale_prob,
        blur_prob=v.blur_prob,
        color=v.augment_on == "loader",
    )
    if kind == "multi_crop":
        return MultiCropTransform(
            v.image_size,
            v.local_size(),
            global_scale=(v.crop_min_scale, 1.0),
            local_scale=v.local_crop_scale,
            n_local=v.local_views,
            **color,
        )
    if kind in ("two_views", "single"):
        return SimCLRTransform(
            v.image_size, crop_min_scale=v.crop_min_scale, n_views=2 if kind == "two_views" else 1, **color
        )
    raise ValueError(f"pretrain: {method} takes {kind} inputs, which the image pipeline does not make")


def decodes_on_device(v: ViewsConfig, device: torch.device, urls: Sequence[str] = ()) -> bool:
    """``views.decode_on``: auto decodes on the device when the colour augmentation runs
    there, the device is a GPU (on a CPU the loader processes decode in parallel) and the
    shards at ``urls`` hold JPEGs (a PNG would travel whole, as pixels, for nothing)."""
    if v.decode_on == "auto":
        return v.augment_on == "device" and device.type == "cuda" and holds_jpeg(urls)
    return v.decode_on == "device"


def crop_plan(method: str, v: ViewsConfig) -> CropPlan:
    """The loader's part of :func:`view_transform` with ``decode_on: device``: each view's
    crop box and flip, the views' sides and crop scales as the CPU transform makes them."""
    kind = get_method(method).view_kind
    if kind == "multi_crop":
        g, local = (v.crop_min_scale, 1.0), (v.local_crop_scale[0], v.local_crop_scale[1])
        return CropPlan(
            [v.image_size] * 2 + [v.local_size()] * v.local_views, [g] * 2 + [local] * v.local_views, v.hflip_prob
        )
    if kind in ("two_views", "single"):
        n = 2 if kind == "two_views" else 1
        return CropPlan([v.image_size] * n, [(v.crop_min_scale, 1.0)] * n, v.hflip_prob)
    raise ValueError(f"pretrain: {method} takes {kind} inputs, which the image pipeline does not make")


def view_stream(method: str, v: ViewsConfig, device: torch.device, urls: Sequence[str]) -> dict:
    """:class:`ShardStream`'s view arguments for the shards at ``urls``: the transform, and
    with ``decode_on: device`` the loader's crop plan, its decode and collate (the engine
    then decodes the batch)."""
    if decodes_on_device(v, device, urls):
        return {"transform": crop_plan(method, v), "decode": decode_encoded, "collate": collate_encoded}
    return {"transform": view_transform(method, v)}


def device_views(v: ViewsConfig) -> DeviceViews | None:
    """The colour augmentation on the training device (``views.augment_on: device``)."""
    if v.augment_on != "device":
        return None
    return DeviceViews(
        jitter_strength=v.jitter_strength,
        jitter_prob=v.jitter_prob,
        grayscale_prob=v.grayscale_prob,
        blur_prob=v.blur_prob,
    )


def train_worker(config: dict) -> list[dict] | None:
    """Runs on each Ray Train worker (``config["job"]``: a :class:`PretrainJob`)."""
    job: PretrainJob = config["job"]
    ray_env.quiet_train_worker()  # one progress line per epoch is enough
    ctx = train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(job.threads)
    device = train.torch.get_device()
    p = PretrainConfig.model_validate(job.pretrain)
    torch.manual_seed(job.seed)  # the initial weights (DDP then sends rank 0's to every rank)
    method = build_method(job.model).to(device)
    loop_cfg = loop_config(p)
    method = cast(Method, loop_cfg.settings_for(device).prepare(method))
    if global_bn(p, world):
        method = cast(
            Method,
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
            if device.type == "cuda"
            else convert_global_bn(method),
        )
    # queues, banks and centers are kept equal on every worker by gathered updates; DDP's
    # per-step broadcast of rank 0's buffers would resend a 65,536-key queue (32 MiB) each step
    model = train.torch.prepare_model(method, parallel_strategy_kwargs={"forward_sync_buffers": False})
    distributed.share_gradient_reduction(model)  # DDP's gradient buckets through /dev/shm too, where it is on
    urls, counts = job.train_urls, job.train_counts
    v = p.views
    text = job.modality == "text"
    if text:
        manifest = read_manifest(job.shard_dir)
        max_len = job.model["kwargs"]["max_len"]
        stream = text_stream(
            job.shard_dir,
            manifest,
            batch_size=p.batch_size_per_worker,
            rank=rank,
            world_size=world,
            loader_workers=p.loader_workers,
            max_len=max_len,
            shuffle_buffer=p.shuffle_buffer,
            seed=job.seed,
        )
    else:
        stream = ShardStream(
            urls,
            counts,
            rank=rank,
            world_size=world,
            loader_workers=p.loader_workers,
            batch_size=p.batch_size_per_worker,
            shuffle_buffer=p.shuffle_buffer,
            seed=job.seed,
            verify=job.train_verify,
            **view_stream(job.model["method"], v, device, urls),
        )
    loop = TrainingLoop(model, method, stream, loop_cfg, device, view_augment=None if text else device_views(v))

    ckpt = train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            verify_checkpoint(d, ckpt.path)
            loop.load_state_dict(torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True))
        if rank == 0:
            print(
                f"[pretrain] resumed from checkpoint at epoch {loop.epoch}, step {loop.step}"
                f"{f' (batch {loop.batch_in_epoch} of epoch {loop.epoch + 1})' if loop.batch_in_epoch else ''}",
                flush=True,
            )

    log: tracking.WorkerLog | None = None
    evaluate = None
    tracked = job.run_id is not None  # None: a sweep trial, whose metrics go to Ray Tune only
    if rank == 0 and job.run_id is not None and job.tracking_uri is not None:
        log = tracking.WorkerLog(job.tracking_uri, job.run_id, prefix="pretrain")
    record_placement(world, log)  # a collective: every rank
    if rank == 0 and tracked:
        bn = (
            ""
            if not has_batch_norm(method)
            else "; BatchNorm statistics over all workers"
            if global_bn(p, world)
            else "; BatchNorm statistics per worker"
            if world > 1
            else ""
        )
        print(f"[pretrain] {loop.describe()}{bn}", flush=True)
    labeled = job.labeled and job.val_urls and p.monitor.enabled
    if labeled and text and rank == 0:
        tok = load_tokenizer(job.shard_dir, manifest)
        bank_x, bank_y = load_text_split(urls, tok, max_len)
        val_x, val_y = load_text_split(job.val_urls, tok, max_len)
        bank_x, bank_y = bank_x[: p.monitor.max_bank], bank_y[: p.monitor.max_bank]
        val_x, val_y = val_x[: p.monitor.max_val], val_y[: p.monitor.max_val]

        def evaluate(encoder: torch.nn.Module) -> dict[str, float]:
            fb = extract_features(encoder, bank_x, device=device)
            fv = extract_features(encoder, val_x, device=device)
            return {"val/knn_top1": knn_top1(fb, bank_y, fv, val_y, k=p.knn_k, temperature=p.knn_temperature)}
    elif labeled and not text:
        # every rank encodes its share of the bank and the val images (cl_core.monitor)
        monitor = knn_monitor(p, urls, job.val_urls, device, job.train_verify, job.val_verify)

        def evaluate(encoder: torch.nn.Module) -> dict[str, float]:
            return {"val/knn_top1": monitor(encoder)}

    eta = Eta(p.epochs, loop.epoch)

    def report(metrics: dict[str, float], state: dict | None) -> None:
        if rank != 0:
            train.report(metrics, checkpoint=None)
            return
        if log is not None:
            log.metrics(metrics, step=int(metrics["epoch"]))
            print(
                "[pretrain] epoch {:.0f}/{}  loss {:.4f}  lr {:.4g}  {:.0f} img/s{}  {}".format(
                    metrics["epoch"],
                    p.epochs,
                    metrics["train/loss"],
                    metrics["train/lr"],
                    metrics["train/images_per_sec"],
                    f"  val kNN top-1 {metrics['val/knn_top1']:.3f}" if "val/knn_top1" in metrics else "",
                    eta(int(metrics["epoch"])),
                ),
                flush=True,
            )
        save(metrics, state)

    def save(metrics: dict[str, float], state: dict | None) -> None:
        """A checkpoint (rank 0's files; every rank reports)."""
        if rank != 0:
            train.report(metrics, checkpoint=None)
            return

        def write(d: Path) -> None:
            torch.save(state, d / STATE_FILE)
            (d / CONFIG_FILE).write_text(
                json.dumps({"model": job.model, "pretrain": job.pretrain, "metrics": metrics}, indent=2)
            )

        report_checkpoint(metrics, write, loop.position())

    def log_step(step: int, metrics: dict[str, float]) -> None:
        if log is not None:
            log.metrics(metrics, step=step)

    history = loop.run(report, evaluate, log_step, checkpoint=save)
    if log is not None:
        log.close()  # what an MLflow outage held back
    return history if rank == 0 else None


@dataclass(frozen=True)
class PretrainJob:
    """What every pretraining worker gets (``train_loop_config["job"]``)."""

    pretrain: dict  # the pretrain section as JSON (validated again on the worker)
    model: dict  # the method's record: {"method", "kwargs"}
    seed: int
    threads: int
    train_urls: list[str]
    train_counts: list[int]
    val_urls: list[str]
    train_verify: dict[str, dict[str, Any]]
    val_verify: dict[str, dict[str, Any]]
    labeled: bool
    modality: str  # "image" or "text"
    shard_dir: str
    tracking_uri: str | None  # None with run_id None: untracked (a sweep trial reports to Tune only)
    run_id: str | None


def make_worker_config(
    cfg: PretrainConfig,
    model: dict,
    shard_dir: str,
    manifest: dict,
    *,
    seed: int,
    checks: dict[str, ShardCheck],
    tracking_uri: str | None,
    run_id: str | None,
) -> dict:
    """``train_worker``'s config (``{"job": PretrainJob}``); ``run_id`` None: untracked (a sweep
    trial reports to Tune only). ``checks``: the train and val splits as :func:`checked_split` found them."""
    job = PretrainJob(
        pretrain=cfg.model_dump(mode="json"),
        model=model,
        seed=seed,
        threads=max(1, int(cfg.cpus_per_worker)),
        train_urls=checks["train"].urls,
        train_counts=checks["train"].counts,
        val_urls=checks["val"].urls,
        train_verify=checks["train"].verify,
        val_verify=checks["val"].verify,
        labeled=manifest["labeled"],
        modality=manifest.get("modality", "image"),
        shard_dir=shard_dir,
        tracking_uri=tracking_uri,
        run_id=run_id,
    )
    return {"job": job}
