"""Methods other than SimCLR through the pipeline on a local Ray (2 workers): MoCo (EMA,
a queue filled across workers, shuffle-BN) pretrains and fine-tunes; SwAV (multi-crop
views) and InstDisc (sample indices into a memory bank) pretrain; SimCSE pretrains on a
text source (shards of sentences and a locally trained tokenizer); hyperparameters
come from ``pretrain.params.<method>`` and land in MLflow as ``method.*`` params."""

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines import tracking
from pipelines.cli import main
from pipelines.stages.pretrain import load_method
from tests.test_pipeline_e2e import _latest_children, _recomputed, local_ray  # noqa: F401 - fixture

pytestmark = pytest.mark.slow

BASE = ["--set", "sweep.enabled=false", "--set", "pretrain.epochs=2", "--set", "pretrain.batch_size_per_worker=32", "--set", "labels.fractions=[0.1]",
        "--set", "finetune.epochs=2", "--set", "finetune.baseline=false", "--set", "finetune.min_steps=0"]


def test_other_methods_pretrain_through_the_pipeline(tmp_path, local_ray, capsys):  # noqa: F811
    work = tmp_path / "work"
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")

    moco = ["run", "--work-dir", str(work), *BASE, "--set", "pretrain.method=moco",
            "--set", "pretrain.params.moco={queue_size: 256, momentum: 0.99}", "--set", "finetune.objective=supcon",
            "--until", "finetune"]
    assert main(moco) == 0
    exp_id = client.get_experiment_by_name("clpipe").experiment_id
    children = _latest_children(client, exp_id)
    assert set(children) == {"shard", "labels", "pretrain", "finetune"}
    pre = children["pretrain"]
    assert pre.data.params["method.queue_size"] == "256" and pre.data.params["method.momentum"] == "0.99"
    assert pre.data.params["method.temperature"] == "None" and pre.data.params["method.version"] == "2"
    assert 0 <= pre.data.metrics["val/knn_top1"] <= 1 and "train/pos_top1" in pre.data.metrics
    encoder = tracking.load_outputs(pre.info.run_id)
    method = load_method(encoder)
    # 2 epochs x 10 steps x 2 workers x 32 keys went through the 256-key queue: the pointer wrapped
    steps = int(pre.data.metrics["step"])
    assert int(method.queue.ptr) == (steps * 64) % 256
    # the key encoder moved away from its initial copy of the query encoder, by EMA only
    q, k = dict(method.backbone.named_parameters()), dict(method.key_backbone.named_parameters())
    assert any(not torch.equal(q[n], k[n]) for n in q)
    fin = children["finetune"]
    assert fin.data.params["finetune_from_head_layer"] == "None"  # resolved to 0: MoCo has no SimCLR head
    assert 0 <= fin.data.metrics["teacher_10pct/selected_val_top1"] <= 1
    assert "teacher_10pct/train/supcon" in fin.data.metrics  # the supervised contrastive fine-tune

    # SwAV's multi-crop views (two sizes) also take their colour augmentation on the device
    for method_name, params, augment_on in (
            ("swav", "{num_prototypes: 20, freeze_prototypes_steps: 5, hidden_dim: 64}", "device"),
            ("instdisc", "{num_negatives: 64}", "loader")):
        args = ["run", "--work-dir", str(work), *BASE, "--set", f"pretrain.method={method_name}",
                "--set", f"pretrain.params.{method_name}={params}", "--set", "pretrain.views.local_views=2",
                "--set", f"pretrain.views.augment_on={augment_on}", "--until", "pretrain"]
        assert main(args) == 0
        children = _latest_children(client, exp_id)
        assert set(children) == {"shard", "pretrain"} and _recomputed(children) == {"pretrain"}
        pre = children["pretrain"]
        assert pre.data.tags[tracking.TAG_STAGE] == "pretrain" and 0 <= pre.data.metrics["val/knn_top1"] <= 1
        assert load_method(tracking.load_outputs(pre.info.run_id)).name == method_name
    # InstDisc's bank has one entry per training image (num_samples filled in from the manifest)
    bank = load_method(tracking.load_outputs(pre.info.run_id)).memory.bank
    assert bank.shape[0] == 1259 and pre.data.params["method.num_negatives"] == "64"
    capsys.readouterr()


def test_simcse_pretrains_on_a_text_source(tmp_path, local_ray, capsys):  # noqa: F811
    from cl_core.text import write_corpus

    corpus = tmp_path / "python_docs.txt"
    n = write_corpus(corpus)
    work = tmp_path / "work"
    args = ["run", "--work-dir", str(work), "--set", f"data.source={{kind: text, path: {corpus}}}",
            "--set", "data.tokenizer_vocab_size=600", "--set", "pretrain.method=simcse",
            "--set", "pretrain.backbone=text_transformer", "--set", "pretrain.epochs=2",
            "--set", "pretrain.params.simcse={dim: 32, depth: 1, heads: 2, max_len: 24}"]
    assert main(args) == 0
    assert "reads text: running shard and pretrain" in capsys.readouterr().out
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    children = _latest_children(client, client.get_experiment_by_name("clpipe").experiment_id)
    assert set(children) == {"shard", "pretrain"}
    shard, pre = children["shard"], children["pretrain"]
    assert shard.data.metrics["num_samples"] == n and shard.data.metrics["tokenizer_vocab_size"] <= 600
    assert "tokenizer.json" in {a.path for a in client.list_artifacts(shard.info.run_id)}
    assert pre.data.params["method.temperature"] == "0.05" and pre.data.params["method.dim"] == "32"
    hist = [m.value for m in client.get_metric_history(pre.info.run_id, "train/loss")]
    assert len(hist) == 2 and all(math.isfinite(v) for v in hist)  # that it learns: tests/test_simcse.py
    method = load_method(tracking.load_outputs(pre.info.run_id))
    assert method.name == "simcse" and method.vocab_size == shard.data.metrics["tokenizer_vocab_size"]
    # an image stage on a text pipeline is refused
    assert main([*args, "--until", "finetune"]) == 2
