"""pretrain: contrastive pretraining on Ray Train workers (ShardSet -> Encoder).

The split follows Ray's Train docs: this stage is the driver that builds the
``TorchTrainer``; ``pipelines.stages._pretraining.train_worker`` runs on every Ray Train
worker (DDP process). The encoder is logged once, here, as an MLflow model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow

from cl_core.data import storage
from cl_core.data.shards import read_manifest
from cl_core.methods import build_method, get_method
from pipelines import models, plots
from pipelines.config import SWEEP_TRAINING_FIELDS, SWEEP_VIEW_FIELDS, PretrainConfig, apply_sweep
from pipelines.console import console
from pipelines.graph import StageContext
from pipelines.stages._data import checked_split
from pipelines.stages._pretraining import (
    CONFIG_FILE,
    load_encoder,
    make_worker_config,
    train_worker,
)
from pipelines.stages._train import checkpoint_uri, fit, input_example, use_gpu


def pretrain(ctx: StageContext, cfg: PretrainConfig, inputs: dict) -> dict:
    shard_set = inputs["shard"]
    best = (inputs.get("sweep") or {}).get("best") or {}
    if best:  # the sweep's best values replace the configured ones
        cfg = apply_sweep(cfg, best)
        mlflow.set_tag("clpipe.sweep_overrides", json.dumps(best))
        mlflow.log_params(
            {f"used.{k}": v for k, v in best.items() if k in SWEEP_TRAINING_FIELDS or k in SWEEP_VIEW_FIELDS}
        )
        console.print(f"pretrain: with the sweep's best {', '.join(f'{k}={v}' for k, v in best.items())}")
    manifest = read_manifest(shard_set["shard_dir"])
    checks = {s: checked_split(shard_set["shard_dir"], manifest, s) for s in ("train", "val")}
    train_urls, train_counts = checks["train"].urls, checks["train"].counts
    if get_method(cfg.method).uses_labels and not manifest["labeled"]:
        raise ValueError(
            f"pretrain.method: {cfg.method} is supervised and needs labeled shards, but the source of "
            f"{shard_set['shard_dir']} has no labels; use a labeled source or a self-supervised method"
        )
    model: dict[str, Any] = {"method": cfg.method, "kwargs": cfg.model_kwargs(num_samples=sum(train_counts))}
    modality = manifest.get("modality", "image")
    if modality == "text":
        kw = model["kwargs"]
        vocab = manifest["tokenizer_vocab_size"]
        if kw.get("vocab_size", vocab) < vocab:
            raise ValueError(
                f"pretrain.params.{cfg.method}.vocab_size ({kw['vocab_size']}) is smaller than the tokenizer of "
                f"{shard_set['shard_dir']} ({vocab} tokens); remove it (the tokenizer's size is used) or raise it"
            )
        kw["vocab_size"] = kw.get("vocab_size", vocab)
        kw["max_len"] = cfg.method_kwargs()["max_len"]
    # the hyperparameters actually used (the method's paper defaults, then params.<method>)
    mlflow.log_params({f"method.{k}": v for k, v in cfg.method_kwargs().items()})
    worker_config = make_worker_config(
        cfg,
        model,
        shard_set["shard_dir"],
        manifest,
        seed=ctx.seed,
        tracking_uri=ctx.tracking_uri,
        run_id=ctx.run_id,
        checks=checks,
    )
    console.print(
        f"pretrain: {cfg.method} / {cfg.backbone} on {cfg.num_workers} Ray Train worker(s)"
        f"{' with GPUs' if use_gpu(cfg) else ''}, {cfg.epochs} epochs, {sum(train_counts)} training images "
        f"in {len(train_urls)} shards"
    )
    result = fit(ctx, train_worker, worker_config, cfg)
    ckpt = checkpoint_uri(result)  # local, or s3:// when ray.storage_path is
    history = result.return_value or []  # type: ignore[attr-defined]  # Train V2's Result (the stubs are V1's)
    final = json.loads(storage.read_bytes(storage.join(ckpt, CONFIG_FILE)))["metrics"]
    local = Path(ckpt) if not storage.is_s3(ckpt) else storage.download_dir(ckpt, ctx.output_dir / "checkpoint")
    mlflow.log_artifacts(str(local), "checkpoint")
    if history:
        plots.training_curves(history, ctx.output_dir / "curves.png", title=f"{cfg.method} pretrain")
        mlflow.log_artifact(str(ctx.output_dir / "curves.png"))
    encoder = {
        "checkpoint_dir": ckpt,
        "model": model,
        "feat_dim": build_method(model).feat_dim,
        "image_size": cfg.views.image_size,
        "final_metrics": final,
        "modality": modality,
    }
    # weights + a JSON builder, loaded with weights_only (pipelines.models.load_model)
    # with two val images as input example (and so a signature) where the encoder reads images
    urls = checks["val"].urls or train_urls
    example = (
        input_example(urls, cfg.views.image_size, checks["val"].verify or checks["train"].verify)
        if modality == "image"
        else None
    )
    info = models.log_model(
        load_encoder(encoder), name="encoder", builder={"kind": "encoder", "model": model}, input_example=example
    )
    if final:  # the final epoch's metrics, linked to the model (the per-epoch histories stay as they are)
        mlflow.log_metrics(
            {f"encoder/{k.replace('/', '_')}": float(v) for k, v in final.items() if isinstance(v, (int, float))},
            model_id=info.model_id,
        )
    encoder.update(model_uri=info.model_uri, model_id=info.model_id)
    return encoder
