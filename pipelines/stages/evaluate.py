"""evaluate: everything measured on the test split (Encoder, Classifiers, Students ->
results table).

Per label fraction: top-1 of the teacher, the student and the supervised baseline, and
kNN and linear-probe top-1 of the frozen encoder fitted on that fraction's labels; and
with all training labels, kNN and linear probe of the pretrained encoder against a
randomly initialised one. Logs confusion matrices, a markdown and a JSON results table.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
import ray
import torch

from cl_core.augment import EvalTransform
from cl_core.data.reader import sample_pipeline
from cl_core.data.shards import check_shards, read_manifest
from cl_core.evaluate import knn_top1, linear_probe_top1, stream_features, stream_outputs, top1
from cl_core.methods import build_method
from pipelines import plots, ray_env
from pipelines.config import EvaluateConfig
from pipelines.console import console
from pipelines.graph import StageContext
from pipelines.stages._pretraining import load_encoder
from pipelines.stages._train import load_classifier

COLUMNS = ("labels", "encoder_knn", "encoder_linear", "baseline", "teacher", "student")


def _split(shard_dir: str, manifest: dict, split: str):
    check = check_shards(shard_dir, manifest, split)
    return check, sample_pipeline(check.urls, verify=check.verify)


def _evaluate_task(
    shard_dir: str,
    encoder: dict,
    subsets: dict,
    finetune: dict,
    distill: dict,
    cfg: dict,
    seed: int,
    threads: int,
    gpu: bool,
) -> dict:
    """Runs as a Ray task with ``threads`` CPUs (and a GPU with ``gpu``). Each split is read
    once, streamed from its shards in batches through every network that needs it; only
    features and predictions are kept, never the images."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
    manifest = read_manifest(shard_dir)
    tf = EvalTransform(encoder["image_size"])
    torch.manual_seed(seed)
    enc = load_encoder(encoder).to(device)
    random_init = build_method(encoder["model"], gather_distributed=False).encoder().eval().to(device)
    encoders = {"pretrained": enc, "random_init": random_init}
    classifiers: dict[str, torch.nn.Module] = {}
    for frac_name in subsets["subsets"]:
        for kind, models in (
            ("baseline", finetune["models"]),
            ("teacher", finetune["models"]),
            ("student", distill["models"]),
        ):
            record = models.get(f"{kind}_{frac_name}")
            if record is not None:
                classifiers[f"{kind}_{frac_name}"] = load_classifier(record).to(device)
    stream: dict[str, Any] = {"batch_size": 512, "device": device}
    train, samples = _split(shard_dir, manifest, "train")
    train_out, train_y = stream_outputs(encoders, samples, tf, limit=cfg["max_train"], **stream)
    test, samples = _split(shard_dir, manifest, "test")
    test_out, test_y = stream_outputs({**encoders, **classifiers}, samples, tf, **stream)
    metrics: dict[str, float] = {"test/num_samples": float(len(test_y))}
    for split, check in (("train", train), ("test", test)):  # truncated shards: their readable samples are used
        if check.lost_samples:
            metrics[f"data/{split}_lost_samples"] = float(check.lost_samples)
    if cfg["max_train"] is not None and len(train_y) < manifest["splits"]["train"]["num_samples"]:
        metrics["test/train_images_used"] = float(len(train_y))
    probe = {"weight_decay": cfg["probe_weight_decay"], "max_iter": cfg["probe_max_iter"]}
    knn = {"k": cfg["knn_k"], "temperature": cfg["knn_temperature"]}
    for name in encoders:
        ftr, fte = train_out[name], test_out[name]
        metrics[f"test/{name}/knn_top1"] = knn_top1(ftr, train_y, fte, test_y, **knn)
        metrics[f"test/{name}/linear_top1"] = linear_probe_top1(ftr, train_y, fte, test_y, **probe)
    rows, predictions = [], {}
    for frac_name, sub in subsets["subsets"].items():
        _, samples = _split(sub["shard_dir"], read_manifest(sub["shard_dir"]), "train")
        flx, ly = stream_features(enc, samples, tf, **stream)
        fte = test_out["pretrained"]
        row = {
            "label_fraction": sub["fraction"],
            "labels": len(ly),
            "encoder_knn": knn_top1(flx, ly, fte, test_y, **knn),
            "encoder_linear": linear_probe_top1(flx, ly, fte, test_y, **probe),
        }
        for kind in ("baseline", "teacher", "student"):
            name = f"{kind}_{frac_name}"
            if name in classifiers:
                pred = test_out[name].argmax(1)
                row[kind] = top1(pred, test_y)
                predictions[name] = pred.tolist()
        rows.append(row)
        for k, v in row.items():
            if k != "label_fraction":
                metrics[f"test/{frac_name}/{k if k == 'labels' else k + '_top1'}"] = float(v)
    return {
        "metrics": metrics,
        "rows": rows,
        "predictions": predictions,
        "test_labels": test_y.tolist(),
        "class_names": manifest["class_names"],
    }


def task_resources(cfg: EvaluateConfig) -> tuple[int, bool]:
    """(CPUs, GPU) of the evaluation task: ``evaluate.num_cpus``, else every CPU of the
    largest node that is up (1 with none up yet: the autoscaler's first node); a GPU
    when ``evaluate.use_gpu`` says so (auto: when the cluster has one)."""
    gpu = ray_env.cluster_gpus() >= 1 if cfg.use_gpu == "auto" else bool(cfg.use_gpu)
    if cfg.num_cpus is not None:
        return cfg.num_cpus, gpu
    alive = [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return max(1, int(max(alive, default=1))), gpu


def results_markdown(rows: list[dict], metrics: dict[str, float]) -> str:
    head = "| label fraction | labels | encoder kNN | encoder linear | supervised baseline | teacher | student |"
    lines = [head, "|" + "---:|" * 7]
    for r in rows:
        cells = [f"{r['label_fraction']:g}", str(r["labels"])]
        cells += [f"{r[c]:.4f}" if c in r else "-" for c in COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    if "test/pretrained/knn_top1" in metrics:
        lines.append(
            "| 1 (all) | - | {:.4f} | {:.4f} | - | - | - |".format(
                metrics["test/pretrained/knn_top1"], metrics["test/pretrained/linear_top1"]
            )
        )
        lines.append("")
        lines.append(
            "Random-init encoder with all labels: kNN {:.4f}, linear {:.4f}.".format(
                metrics["test/random_init/knn_top1"], metrics["test/random_init/linear_top1"]
            )
        )
    return "\n".join(lines) + "\n"


def evaluate(ctx: StageContext, cfg: EvaluateConfig, inputs: dict) -> dict:
    shard_set, encoder = inputs["shard"], inputs["pretrain"]
    manifest = read_manifest(shard_set["shard_dir"])
    n_test = manifest["splits"]["test"]["num_samples"]
    console.print(f"evaluate: teacher, student, baseline, kNN (k={cfg.knn_k}) and linear probe on {n_test} test images")
    cpus, gpu = task_resources(cfg)
    task = ray.remote(_evaluate_task).options(num_cpus=cpus, num_gpus=1 if gpu else 0)
    res = ray.get(
        task.remote(
            shard_set["shard_dir"],
            encoder,
            inputs["labels"],
            inputs["finetune"],
            inputs["distill"],
            cfg.model_dump(),
            ctx.seed,
            cpus,
            gpu,
        )
    )
    metrics, rows = res["metrics"], res["rows"]
    mlflow.log_metrics(metrics)
    table = results_markdown(rows, metrics)
    (ctx.output_dir / "results.md").write_text(table)
    (ctx.output_dir / "results.json").write_text(json.dumps({"rows": rows, "metrics": metrics}, indent=2))
    mlflow.log_artifact(str(ctx.output_dir / "results.md"))
    mlflow.log_artifact(str(ctx.output_dir / "results.json"))
    for frac_name in inputs["labels"]["subsets"]:
        preds = {
            k: res["predictions"][f"{k}_{frac_name}"]
            for k in ("teacher", "student", "baseline")
            if f"{k}_{frac_name}" in res["predictions"]
        }
        path = plots.confusion_matrices(
            preds,
            res["test_labels"],
            res["class_names"],
            ctx.output_dir / f"confusion_{frac_name}.png",
            title=f"test split, {frac_name} labels",
        )
        mlflow.log_artifact(str(path))
    return {"metrics": metrics, "rows": rows, "table_md": table, "results_path": str(ctx.output_dir / "results.json")}
