"""finetune: the SimCLRv2 teacher, and the supervised baseline (Encoder + LabelSubsets
-> Classifiers).

Per label fraction, on Ray Train workers: the pretrained encoder plus the first k
layers of its projection head plus a new linear layer, fine-tuned end to end with
cross-entropy on the labeled subset (random crop and flip only) or, with
``objective: supcon``, with the supervised contrastive loss on two views while the
linear layer learns from the detached features; and, with
``baseline: true``, the same classifier from random initialisation trained on the same
labels with the same budget. Each model keeps the epoch with the best val top-1.
"""

from __future__ import annotations

from typing import cast

import torch

from cl_core.data.reader import ShardStream
from cl_core.data.shards import read_manifest
from cl_core.downstream import build_classifier, classifier_from_pretrained, classifier_spec
from cl_core.downstream.finetune import SupervisedObjective
from cl_core.downstream.supcon_finetune import SupConObjective
from cl_core.methods import method_params
from pipelines.config import FinetuneConfig
from pipelines.console import console
from pipelines.graph import StageContext
from pipelines.stages._data import checked_split
from pipelines.stages._pretraining import load_method
from pipelines.stages._train import (
    ClassifierJob,
    SequentialJobs,
    Worker,
    batch_for,
    collect_models,
    crop_flip,
    fit,
    input_example,
    log_classifiers,
)


def finetune_worker(config: dict) -> list[dict] | None:

    run: ClassifierJob = config["job"]
    w = Worker.setup(run.threads)
    f = FinetuneConfig.model_validate(run.section)
    runner = SequentialJobs(run, w, "finetune")

    def build(job: dict, start_step: int):
        torch.manual_seed(run.seed)
        head = None
        if job["kind"] == "teacher":
            method = load_method(run.encoder)
            clf = classifier_from_pretrained(method, job["spec"])
            if run.encoder["model"]["method"] == "supcon":
                head = cast(torch.nn.Module, method.head)  # continue the pretrained SupCon projection head
            if f.head_init == "probe" and start_step == 0:
                init_from_probe(clf, job, run.image_size, f.bn_recalibration_images)
        else:
            clf = build_classifier(job["spec"])
        bs = batch_for(job["counts"], f.batch_size_per_worker, w.world)
        supcon = f.objective == "supcon"
        stream = ShardStream(
            job["urls"],
            job["counts"],
            rank=w.rank,
            world_size=w.world,
            loader_workers=f.loader_workers,
            batch_size=bs,
            shuffle_buffer=f.shuffle_buffer,
            seed=run.seed,
            transform=crop_flip(f.views, run.image_size, 2 if supcon else 1),
            verify=job.get("verify"),
        )
        if supcon:
            return SupConObjective(clf, head, temperature=f.supcon_temperature), clf, stream, None
        return SupervisedObjective(clf), clf, stream, None

    history = runner.run(run.jobs, build, f)
    return history if w.rank == 0 else None


def init_from_probe(clf, job: dict, image_size: int, bn_images: int) -> None:
    """LP-FT: the classifier's BatchNorm statistics recomputed on the labeled images
    (uncropped, as for the val checks), then its new linear layer set to a
    logistic-regression probe of their features. Every rank computes the same values
    (the same images, the same deterministic fit)."""

    from cl_core.augment import EvalTransform
    from cl_core.data.reader import load_split, sample_pipeline
    from cl_core.evaluate import fit_linear_probe, recalibrate_batch_norm, stream_features

    transform = EvalTransform(image_size)
    if bn_images:  # the first bn_images labeled images, the only ones held as images
        recalibrate_batch_norm(clf, load_split(job["urls"], transform, verify=job.get("verify"), limit=bn_images)[0])
    # the probe's features streamed in batches: memory grows with N x feature size, not N images
    feats, y = stream_features(
        torch.nn.Sequential(clf.backbone, clf.neck), sample_pipeline(job["urls"], verify=job.get("verify")), transform
    )
    weight, bias = fit_linear_probe(feats, y, clf.num_classes)
    with torch.no_grad():
        clf.fc.weight.copy_(weight)
        clf.fc.bias.copy_(bias)


def teacher_spec(model: dict, num_classes: int, from_head_layer: int | None) -> dict:
    """The classifier spec of a teacher fine-tuned from the pretrained ``model`` record:
    the method's encoder plus ``from_head_layer`` layers of its SimCLR-style head (None:
    SimCLRv2's 1 when the method has such a head, else 0)."""
    hp = {**method_params(model["method"]), **model["kwargs"]}
    layers = hp.get("head_layers")
    k = from_head_layer if from_head_layer is not None else (1 if layers else 0)
    return classifier_spec(
        backbone=model["kwargs"]["backbone"],
        encoder=model,
        num_classes=num_classes,
        from_head_layer=k,
        head_layers=layers or 0,
    )


def finetune(ctx: StageContext, cfg: FinetuneConfig, inputs: dict) -> dict:
    shard_set, encoder, subsets = inputs["shard"], inputs["pretrain"], inputs["labels"]
    num_classes = shard_set["num_classes"]
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise ValueError(
            f"finetune.num_classes: the teacher would predict {cfg.num_classes} classes but the shard set "
            f"{shard_set['shard_dir']} has {num_classes}; remove finetune.num_classes or fix the data"
        )
    load_method(encoder)  # fails early, naming the file, if the pretrained checkpoint is gone
    manifest = read_manifest(shard_set["shard_dir"])
    val = checked_split(shard_set["shard_dir"], manifest, "val")
    val_urls = val.urls
    if not val_urls:
        raise ValueError("finetune: the val split is empty, so no epoch can be selected; set data.val_fraction > 0")
    spec = teacher_spec(encoder["model"], num_classes, cfg.finetune_from_head_layer)
    jobs = []
    for name, sub in subsets["subsets"].items():
        sub_manifest = read_manifest(sub["shard_dir"])
        labeled = checked_split(sub["shard_dir"], sub_manifest, "train", name=f"labels_{name}")
        kinds = ("teacher", "baseline") if cfg.baseline else ("teacher",)
        jobs += [
            {
                "name": f"{kind}_{name}",
                "kind": kind,
                "fraction": sub["fraction"],
                "urls": labeled.urls,
                "counts": labeled.counts,
                "verify": labeled.verify,
                "spec": spec,
            }
            for kind in kinds
        ]
    console.print(
        f"finetune: {len(jobs)} model(s) ({', '.join(j['name'] for j in jobs)}) on {cfg.num_workers} "
        f"Ray Train worker(s), {cfg.epochs} epochs each, from head layer {spec['from_head_layer']}"
    )
    worker_config = {
        "job": ClassifierJob(
            section=cfg.model_dump(mode="json"),
            jobs=jobs,
            encoder=encoder,
            seed=ctx.seed if cfg.seed is None else cfg.seed,
            threads=max(1, int(cfg.cpus_per_worker)),
            val_urls=val_urls,
            val_verify=val.verify,
            image_size=encoder["image_size"],
            tracking_uri=ctx.tracking_uri,
            run_id=ctx.run_id,
        )
    }
    result = fit(ctx, finetune_worker, worker_config, cfg)
    models = collect_models(result, ctx.output_dir)
    log_classifiers(models, input_example(val_urls, encoder["image_size"], val.verify))
    for n, m in models.items():
        console.print(f"finetune: {n}: val top-1 {m['val_top1']:.4f} at epoch {m['selected_epoch']}")
    return {
        "models": models,
        "num_classes": num_classes,
        "image_size": encoder["image_size"],
        "from_head_layer": spec["from_head_layer"],
    }
