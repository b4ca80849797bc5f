"""evaluate: kNN and linear-probe top-1 of the pretrained encoder on the test split,
against a randomly initialised encoder of the same architecture (Encoder -> metrics)."""

from __future__ import annotations

import mlflow
import ray
import torch

from cl_core.augment import EvalTransform
from cl_core.data.reader import load_split
from cl_core.data.shards import read_manifest, shard_urls
from cl_core.evaluate import extract_features, knn_top1, linear_probe_top1
from pipelines.config import EvaluateConfig
from pipelines.console import console
from pipelines.graph import StageContext
from pipelines.stages.pretrain import build_method, load_encoder


@ray.remote(num_cpus=1)
def _evaluate_task(shard_dir: str, encoder: dict, cfg: dict, seed: int) -> dict[str, float]:
    torch.set_num_threads(1)
    manifest = read_manifest(shard_dir)
    tf = EvalTransform(encoder["image_size"])
    train_x, train_y = load_split(shard_urls(shard_dir, manifest, "train")[0], tf)
    test_x, test_y = load_split(shard_urls(shard_dir, manifest, "test")[0], tf)
    torch.manual_seed(seed)
    encoders = {"pretrained": load_encoder(encoder),
                "random_init": build_method(encoder["model"], gather_distributed=False).encoder().eval()}
    out: dict[str, float] = {}
    for name, enc in encoders.items():
        ftr, fte = extract_features(enc, train_x), extract_features(enc, test_x)
        out[f"test/{name}/knn_top1"] = knn_top1(ftr, train_y, fte, test_y, k=cfg["knn_k"], temperature=cfg["knn_temperature"])
        out[f"test/{name}/linear_top1"] = linear_probe_top1(ftr, train_y, fte, test_y, weight_decay=cfg["probe_weight_decay"],
                                                            max_iter=cfg["probe_max_iter"])
    out["test/num_samples"] = float(len(test_y))
    return out


def evaluate(ctx: StageContext, cfg: EvaluateConfig, inputs: dict) -> dict:
    shard_set, encoder = inputs["shard"], inputs["pretrain"]
    if not shard_set["labeled"]:
        console.print("[yellow]evaluate: the source has no labels; nothing to evaluate[/]")
        return {"metrics": {}}
    manifest = read_manifest(shard_set["shard_dir"])
    console.print(f"evaluate: kNN (k={cfg.knn_k}) and linear probe on {manifest['splits']['test']['num_samples']} test images")
    metrics = ray.get(_evaluate_task.remote(shard_set["shard_dir"], encoder, cfg.model_dump(), ctx.seed))
    mlflow.log_metrics(metrics)
    return {"metrics": metrics}
