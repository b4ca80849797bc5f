"""distill: the SimCLRv2 student (Teacher + unlabeled shards -> Student).

Per label fraction, on Ray Train workers: a student (the teacher's backbone for
self-distillation, or a smaller one from the config) trained on every training image,
labels unused, to match the frozen teacher's softmax at temperature T on the same
crop-and-flip view; optionally plus ``alpha`` x cross-entropy on the labeled subset.
The student starts from random weights (``init: scratch``), or for self-distillation
from the pretrained encoder (``pretrained``) or the fine-tuned teacher's encoder
(``teacher``), with a new linear layer.
"""

from __future__ import annotations

import mlflow
import torch

from cl_core.data.reader import ShardStream
from cl_core.data.shards import read_manifest
from cl_core.downstream import build_classifier, classifier_spec
from cl_core.downstream.classifier import num_parameters
from cl_core.downstream.distill import DistillObjective
from pipelines.config import DistillConfig
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
    cycle,
    fit,
    input_example,
    load_classifier,
    log_classifiers,
)


def distill_worker(config: dict) -> list[dict] | None:
    run: ClassifierJob = config["job"]
    w = Worker.setup(run.threads)
    d = DistillConfig.model_validate(run.section)
    runner = SequentialJobs(run, w, "distill")
    tf = crop_flip(d.views, run.image_size)

    def build(job: dict, start_step: int):
        teacher = load_classifier(job["teacher"])
        torch.manual_seed(run.seed)
        student = build_classifier(job["spec"])
        if d.init != "scratch":  # a resumed run loads its checkpoint over this afterwards
            init_student(student, teacher.backbone if d.init == "teacher" else load_method(run.encoder).encoder())
        stream = ShardStream(
            run.train_urls,
            run.train_counts,
            rank=w.rank,
            world_size=w.world,
            loader_workers=d.loader_workers,
            batch_size=d.batch_size_per_worker,
            shuffle_buffer=d.shuffle_buffer,
            seed=run.seed,
            transform=tf,
            verify=run.train_verify,
        )
        aux = None
        if d.alpha > 0:
            urls, counts = job["labeled_urls"], job["labeled_counts"]
            labeled = ShardStream(
                urls,
                counts,
                rank=w.rank,
                world_size=w.world,
                loader_workers=0,
                batch_size=batch_for(counts, d.batch_size_per_worker, w.world),
                shuffle_buffer=d.shuffle_buffer,
                seed=run.seed + 1,
                transform=tf,
                verify=job["labeled_verify"],
            )
            batches = cycle(labeled, skip=start_step)  # one labeled batch per step

            def aux():
                return next(batches)

        objective = DistillObjective(student, teacher, temperature=d.temperature, alpha=d.alpha)
        return objective, student, stream, aux

    history = runner.run(run.jobs, build, d)
    return history if w.rank == 0 else None


def init_student(student, encoder: torch.nn.Module) -> None:
    """Copy ``encoder`` (the teacher's backbone, or the pretrained method's encoder) into
    the student's backbone; the student's linear layer keeps its random initialisation."""
    student.backbone.load_state_dict(encoder.state_dict())


def check_init(cfg: DistillConfig, student, encoder: torch.nn.Module, where: str) -> None:
    """``distill.init`` other than scratch needs the student's backbone to have exactly the
    parameters of ``start``'s (the teacher's or the pretrained encoder's)."""
    want = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in student.backbone.state_dict().items()}
    if want != have:
        raise ValueError(
            f"distill.init: {cfg.init!r} starts the student from {where}, whose architecture differs from "
            f"the student's (student_backbone={cfg.student_backbone}, student_width={cfg.student_width}); "
            "set distill.init=scratch for a different student, or leave student_backbone and "
            "student_width null"
        )


def student_spec(t_spec: dict, num_classes: int, cfg: DistillConfig) -> dict:
    """The student's classifier spec: by default the teacher's encoder architecture
    without the head layers (self-distillation); or ``student_backbone`` /
    ``student_width`` (a plain backbone)."""
    if t_spec.get("encoder") and cfg.student_backbone is None and cfg.student_width is None:
        return classifier_spec(
            backbone=t_spec["backbone"], encoder=t_spec["encoder"], num_classes=num_classes, from_head_layer=0
        )
    t_args = (
        (t_spec.get("encoder") or {}).get("kwargs", {}).get("backbone_args", {})
        if t_spec.get("encoder")
        else {"width": t_spec.get("width", 32), "cifar_stem": t_spec.get("cifar_stem", False)}
    )
    backbone = cfg.student_backbone or t_spec["backbone"]
    same = backbone == t_spec["backbone"]
    return classifier_spec(
        backbone=backbone,
        num_classes=num_classes,
        from_head_layer=0,
        width=cfg.student_width or (t_args.get("width", 32) if same else 32),
        cifar_stem=t_args.get("cifar_stem", False) if same else False,
    )


def distill(ctx: StageContext, cfg: DistillConfig, inputs: dict) -> dict:
    shard_set, teachers, subsets = inputs["shard"], inputs["finetune"], inputs["labels"]
    pretrained = load_method(inputs["pretrain"]) if cfg.init == "pretrained" else None
    num_classes = shard_set["num_classes"]
    manifest = read_manifest(shard_set["shard_dir"])
    train, val = (checked_split(shard_set["shard_dir"], manifest, s) for s in ("train", "val"))
    train_urls, train_counts, val_urls = train.urls, train.counts, val.urls
    jobs = []
    for name, sub in subsets["subsets"].items():
        record = teachers["models"].get(f"teacher_{name}")
        if record is None:
            raise ValueError(
                f"distill: finetune run {ctx.upstream_run_ids.get('finetune')} has no teacher for {name}; "
                "rerun finetune (clpipe run --rerun finetune)"
            )
        teacher = load_classifier(record)  # names the missing file if the upstream artifact is gone
        if teacher.num_classes != num_classes:
            raise ValueError(
                f"distill: the teacher {record['model_path']} predicts {teacher.num_classes} classes but the "
                f"shard set {shard_set['shard_dir']} has {num_classes}; fine-tune a teacher on this data"
            )
        spec = student_spec(record["spec"], num_classes, cfg)
        student = build_classifier(spec)
        if cfg.init != "scratch":
            check_init(
                cfg,
                student,
                teacher.backbone if pretrained is None else pretrained.encoder(),
                record["model_path"] if pretrained is None else "the pretrained encoder",
            )
        student_params = num_parameters(student)
        sub_manifest = read_manifest(sub["shard_dir"])
        labeled = checked_split(sub["shard_dir"], sub_manifest, "train", name=f"labels_{name}")
        labeled_urls, labeled_counts = labeled.urls, labeled.counts
        jobs.append(
            {
                "name": f"student_{name}",
                "fraction": sub["fraction"],
                "teacher": record,
                "spec": spec,
                "labeled_urls": labeled_urls,
                "labeled_counts": labeled_counts,
                "labeled_verify": labeled.verify,
                "teacher_params": num_parameters(teacher),
                "student_params": student_params,
            }
        )
    j0 = jobs[0]
    console.print(
        f"distill: {len(jobs)} student(s) on {sum(train_counts)} unlabeled training images, T={cfg.temperature}"
        f"{f', alpha={cfg.alpha}' if cfg.alpha else ''}; student"
        f"{'' if cfg.init == 'scratch' else f' (from the {cfg.init} encoder)'} {j0['spec']['backbone']} "
        f"({j0['student_params']:,} params) from teacher ({j0['teacher_params']:,} params)"
    )
    worker_config = {
        "job": ClassifierJob(
            section=cfg.model_dump(mode="json"),
            jobs=jobs,
            encoder=inputs["pretrain"],
            seed=ctx.seed if cfg.seed is None else cfg.seed,
            threads=max(1, int(cfg.cpus_per_worker)),
            val_urls=val_urls,
            val_verify=val.verify,
            image_size=teachers["image_size"],
            tracking_uri=ctx.tracking_uri,
            run_id=ctx.run_id,
            train_urls=train_urls,
            train_counts=train_counts,
            train_verify=train.verify,
        )
    }
    result = fit(ctx, distill_worker, worker_config, cfg)
    models = collect_models(result, ctx.output_dir)
    for j in jobs:
        models[j["name"]].update(params=j["student_params"], teacher_params=j["teacher_params"], fraction=j["fraction"])
    log_classifiers(models, input_example(val_urls, teachers["image_size"], val.verify))
    mlflow.log_metrics({"student_params": j0["student_params"], "teacher_params": j0["teacher_params"]})
    for n, m in models.items():
        console.print(f"distill: {n}: val top-1 {m['val_top1']:.4f} at epoch {m['selected_epoch']}")
    return {"models": models, "num_classes": num_classes, "image_size": teachers["image_size"]}
