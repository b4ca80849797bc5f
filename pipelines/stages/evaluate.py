"""evaluate: everything measured on the test split (Encoder, Classifiers, Students ->
results table).

Per label fraction: top-1 of the teacher, the student and the supervised baseline, and
kNN and linear-probe top-1 of the frozen encoder fitted on that fraction's labels; and
with all training labels, kNN and linear probe of the pretrained encoder against a
randomly initialised one. Logs confusion matrices, a markdown and a JSON results table.
"""

from __future__ import annotations

import json

import mlflow
import ray
import torch

from cl_core.augment import EvalTransform
from cl_core.data.reader import load_split
from cl_core.data.shards import check_shards, read_manifest
from cl_core.evaluate import extract_features, knn_top1, linear_probe_top1, top1
from pipelines import plots
from pipelines.config import EvaluateConfig
from pipelines.console import console
from pipelines.graph import StageContext
from pipelines.stages._train import load_classifier
from pipelines.stages.pretrain import build_method, load_encoder

COLUMNS = ("labels", "encoder_knn", "encoder_linear", "baseline", "teacher", "student")


def _predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)])


@ray.remote(num_cpus=1)
def _evaluate_task(shard_dir: str, encoder: dict, subsets: dict, finetune: dict, distill: dict, cfg: dict,
                   seed: int) -> dict:
    torch.set_num_threads(1)
    manifest = read_manifest(shard_dir)
    tf = EvalTransform(encoder["image_size"])
    train, test = (check_shards(shard_dir, manifest, s) for s in ("train", "test"))
    train_x, train_y = load_split(train.urls, tf, verify=train.verify)
    test_x, test_y = load_split(test.urls, tf, verify=test.verify)
    torch.manual_seed(seed)
    enc = load_encoder(encoder)
    encoders = {"pretrained": enc, "random_init": build_method(encoder["model"], gather_distributed=False).encoder().eval()}
    metrics: dict[str, float] = {"test/num_samples": float(len(test_y))}
    for split, check in (("train", train), ("test", test)):  # truncated shards: their readable samples are used
        if check.lost_samples:
            metrics[f"data/{split}_lost_samples"] = float(check.lost_samples)
    probe = {"weight_decay": cfg["probe_weight_decay"], "max_iter": cfg["probe_max_iter"]}
    knn = {"k": cfg["knn_k"], "temperature": cfg["knn_temperature"]}
    feats = {name: (extract_features(e, train_x), extract_features(e, test_x)) for name, e in encoders.items()}
    for name, (ftr, fte) in feats.items():
        metrics[f"test/{name}/knn_top1"] = knn_top1(ftr, train_y, fte, test_y, **knn)
        metrics[f"test/{name}/linear_top1"] = linear_probe_top1(ftr, train_y, fte, test_y, **probe)
    rows, predictions = [], {}
    for frac_name, sub in subsets["subsets"].items():
        labeled = check_shards(sub["shard_dir"], read_manifest(sub["shard_dir"]), "train")
        lx, ly = load_split(labeled.urls, tf, verify=labeled.verify)
        flx, fte = extract_features(enc, lx), feats["pretrained"][1]
        row = {"label_fraction": sub["fraction"], "labels": len(ly),
               "encoder_knn": knn_top1(flx, ly, fte, test_y, **knn),
               "encoder_linear": linear_probe_top1(flx, ly, fte, test_y, **probe)}
        for kind, models in (("baseline", finetune["models"]), ("teacher", finetune["models"]), ("student", distill["models"])):
            record = models.get(f"{kind}_{frac_name}")
            if record is None:
                continue
            pred = _predict(load_classifier(record), test_x)
            row[kind] = top1(pred, test_y)
            predictions[f"{kind}_{frac_name}"] = pred.tolist()
        rows.append(row)
        for k, v in row.items():
            if k != "label_fraction":
                metrics[f"test/{frac_name}/{k if k == 'labels' else k + '_top1'}"] = float(v)
    return {"metrics": metrics, "rows": rows, "predictions": predictions, "test_labels": test_y.tolist(),
            "class_names": manifest["class_names"]}


def results_markdown(rows: list[dict], metrics: dict[str, float]) -> str:
    head = "| label fraction | labels | encoder kNN | encoder linear | supervised baseline | teacher | student |"
    lines = [head, "|" + "---:|" * 7]
    for r in rows:
        cells = [f"{r['label_fraction']:g}", str(r["labels"])]
        cells += [f"{r[c]:.4f}" if c in r else "-" for c in COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    if "test/pretrained/knn_top1" in metrics:
        lines.append("| 1 (all) | - | {:.4f} | {:.4f} | - | - | - |".format(
            metrics["test/pretrained/knn_top1"], metrics["test/pretrained/linear_top1"]))
        lines.append("")
        lines.append("Random-init encoder with all labels: kNN {:.4f}, linear {:.4f}.".format(
            metrics["test/random_init/knn_top1"], metrics["test/random_init/linear_top1"]))
    return "\n".join(lines) + "\n"


def evaluate(ctx: StageContext, cfg: EvaluateConfig, inputs: dict) -> dict:
    shard_set, encoder = inputs["shard"], inputs["pretrain"]
    manifest = read_manifest(shard_set["shard_dir"])
    n_test = manifest["splits"]["test"]["num_samples"]
    console.print(f"evaluate: teacher, student, baseline, kNN (k={cfg.knn_k}) and linear probe on {n_test} test images")
    res = ray.get(_evaluate_task.remote(shard_set["shard_dir"], encoder, inputs["labels"], inputs["finetune"],
                                        inputs["distill"], cfg.model_dump(), ctx.seed))
    metrics, rows = res["metrics"], res["rows"]
    mlflow.log_metrics(metrics)
    table = results_markdown(rows, metrics)
    (ctx.output_dir / "results.md").write_text(table)
    (ctx.output_dir / "results.json").write_text(json.dumps({"rows": rows, "metrics": metrics}, indent=2))
    mlflow.log_artifact(str(ctx.output_dir / "results.md"))
    mlflow.log_artifact(str(ctx.output_dir / "results.json"))
    for frac_name in inputs["labels"]["subsets"]:
        preds = {k: res["predictions"][f"{k}_{frac_name}"] for k in ("teacher", "student", "baseline")
                 if f"{k}_{frac_name}" in res["predictions"]}
        path = plots.confusion_matrices(preds, res["test_labels"], res["class_names"],
                                        ctx.output_dir / f"confusion_{frac_name}.png", title=f"test split, {frac_name} labels")
        mlflow.log_artifact(str(path))
    return {"metrics": metrics, "rows": rows, "table_md": table, "results_path": str(ctx.output_dir / "results.json")}
