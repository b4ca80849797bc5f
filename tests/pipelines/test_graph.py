"""The stage graph's caching, lineage and selection (--rerun, --only, --until) on the
pipeline's real wiring (``pipelines.stages.STAGES``: names, dependencies, config
sections), with each stage's work replaced by a function that records its call and
writes one output directory; a real MLflow store, no Ray."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipelines import tracking
from pipelines.config import load_config
from pipelines.errors import StageError
from pipelines.graph import run_pipeline
from pipelines.stages import STAGES
from tests.conftest import STAGES as CHAIN
from tests.conftest import children, mlflow_client, outputs, pipeline_runs, recomputed


class Recorder:
    """The stages with their real specs and a stand-in body."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.stages = [dataclasses.replace(s, fn=self._body(s.name)) for s in STAGES]

    def _body(self, name: str):
        def fn(ctx, section, inputs):
            self.calls.append(name)
            d = ctx.output_dir / "out"
            d.mkdir(parents=True, exist_ok=True)
            (d / "data").write_text(json.dumps(section.model_dump(mode="json")))
            return {"out_dir": str(d), "inputs": sorted(inputs)}

        return fn


@pytest.fixture
def graph(tmp_path):
    """run(overrides, **flags) -> ({stage: run} of that pipeline run, the stages computed in order)."""
    work = tmp_path / "work"
    rec = Recorder()
    tracking.quiet()
    store = f"sqlite:///{work / 'mlflow.db'}"
    work.mkdir()
    exp_id = tracking.setup(store, "clpipe", None)

    def run(*overrides: str, **flags):
        cfg = load_config(overrides=["sweep.enabled=false", f"work_dir={work}", *overrides])
        rec.calls.clear()
        result = run_pipeline(cfg, rec.stages, experiment_id=exp_id, **flags)
        client, _ = mlflow_client(work)
        return children(client, exp_id, result.run_id), list(rec.calls)

    run.work = work
    yield run
    import mlflow

    mlflow.set_tracking_uri(None)


def test_a_first_run_computes_every_stage_in_order_with_lineage(graph):
    runs, calls = graph()
    assert calls == CHAIN and set(runs) == set(CHAIN) and recomputed(runs) == set(CHAIN)
    client, exp_id = mlflow_client(graph.work)
    # each stage names its upstream stages' runs and artifact locations, and gets their outputs
    ev = runs["evaluate"]
    up = json.loads(ev.data.tags[tracking.TAG_UPSTREAM])
    assert up == {s: runs[s].info.run_id for s in ("shard", "pretrain", "labels", "finetune", "distill")}
    uris = json.loads(ev.data.tags[tracking.TAG_UPSTREAM_URIS])
    assert uris["distill"] == runs["distill"].info.artifact_uri
    assert outputs(client, ev.info.run_id)["inputs"] == ["distill", "finetune", "labels", "pretrain", "shard"]
    assert all(r.info.status == "FINISHED" and r.data.params for r in runs.values())  # the section as params
    parent = pipeline_runs(client, exp_id)[0]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"config.json", "chain.md"}


def test_the_cache_and_what_a_change_or_rerun_recomputes(graph):
    first, _ = graph()
    runs, calls = graph()
    assert calls == [] and recomputed(runs) == set()  # the same config: every stage from the cache
    assert all(runs[s].data.tags[tracking.TAG_CACHED_FROM] == first[s].info.run_id for s in CHAIN)
    # a section's change recomputes its stage and everything downstream of it
    _, calls = graph("distill.temperature=1.0")
    assert calls == ["distill", "evaluate", "register"]
    _, calls = graph("labels.fractions=[0.2]")
    assert calls == ["labels", "finetune", "distill", "evaluate", "register"]
    # the seed is in every key
    _, calls = graph("seed=1")
    assert calls == CHAIN
    # --rerun forces a stage and its descendants, whatever the cache holds
    _, calls = graph(rerun="finetune")
    assert calls == ["finetune", "distill", "evaluate", "register"]
    runs, calls = graph(rerun="register")
    assert calls == ["register"] and runs["register"].data.tags["clpipe.forced"] == "true"
    # the sweep, when on, is an input of pretrain and so of everything after it
    _, calls = graph("sweep.enabled=true")
    assert calls == ["sweep", "pretrain", "finetune", "distill", "evaluate", "register"]


def test_only_and_until_select_stages(graph):
    graph()
    runs, calls = graph(only="evaluate")  # its upstream from the cache, nothing downstream
    assert calls == ["evaluate"] and set(runs) == {"shard", "labels", "pretrain", "finetune", "distill", "evaluate"}
    runs, calls = graph("pretrain.epochs=3", until="pretrain")
    assert calls == ["pretrain"] and set(runs) == {"shard", "pretrain"}  # labels is not upstream of pretrain
    with pytest.raises(StageError, match=r"--until train: no such stage; stages: shard, labels, sweep, pretrain"):
        graph(until="train")


def test_only_needs_its_upstream_cached_and_whole(graph):
    with pytest.raises(StageError, match="--only distill: upstream stage shard has no finished run for this config"):
        graph(only="distill")
    first, _ = graph()
    lost = Path(outputs(mlflow_client(graph.work)[0], first["finetune"].info.run_id)["out_dir"])
    for f in lost.iterdir():
        f.unlink()
    lost.rmdir()
    with pytest.raises(StageError) as e:
        graph(only="distill")
    assert str(e.value) == (
        f"--only distill: upstream stage finetune's run {first['finetune'].info.run_id} lost its "
        f"artifact {lost}; rerun it: clpipe run --rerun finetune"
    )
    # a plain run recomputes the stage that lost its output; its key, and so its dependents', stay
    _, calls = graph()
    assert calls == ["finetune"] and lost.is_dir()
