"""The stage graph: declares stages, runs them in MLflow child runs, caches and resumes.

A stage is a plain function ``fn(ctx, section, inputs) -> outputs``: ``section`` is its
own config section, ``inputs`` maps each upstream stage name to that stage's outputs
(small JSON-able records of paths and metadata). The runner derives the cache key from
the stage's name, version, section, the global seed and the upstream keys; finds a
finished MLflow run with that key (reuse) or opens a child run and calls the stage.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from pydantic import BaseModel

from cl_core.data import storage
from pipelines import leases, report, tracking
from pipelines.config import PipelineConfig, RayConfig, flatten
from pipelines.console import console
from pipelines.errors import StageError


@dataclass(frozen=True)
class StageSpec:
    name: str
    fn: Callable[[StageContext, Any, dict[str, dict]], dict]
    section: Callable[[PipelineConfig], BaseModel]
    deps: tuple[str, ...] = ()
    version: int = 1  # bump when a stage's outputs change meaning: old caches stop matching
    # optional stages (the sweep): when this says False the stage is skipped and its
    # dependents run without its outputs (their cache keys then do not name it)
    enabled: Callable[[PipelineConfig], bool] = lambda cfg: True
    # MLflow system metrics (CPU, memory, disk, network; GPU with pynvml) while the stage computes
    system_metrics: bool = False


@dataclass(frozen=True)
class StageEnv:
    """Where and how a stage runs, besides its section: none of it changes what the stage
    computes, so none of it is in the stage's cache key (its section and the seed are)."""

    pipeline: str  # the config's name
    tracking_uri: str
    ray: RayConfig  # how Ray is reached, where its runs are stored, its log level
    work_dir: Path

    def work_path(self) -> Path:
        return self.work_dir

    @classmethod
    def of(cls, cfg: PipelineConfig) -> StageEnv:
        return cls(cfg.name, cfg.tracking_uri(), cfg.ray, cfg.work_path())


@dataclass
class StageContext:
    """What a running stage may use besides its own config section: its run, key, seed and
    output dir, and the environment it runs in (not the rest of the config)."""

    name: str
    key: str
    run_id: str
    parent_run_id: str
    seed: int
    env: StageEnv
    output_dir: Path  # a directory owned by this stage and key
    upstream_run_ids: dict[str, str]
    rerun: bool = False  # --rerun of this stage (or upstream): outputs kept outside output_dir are rewritten too

    @property
    def ray_run_name(self) -> str:
        """Ray Train's run name: deterministic per cache key, so a rerun resumes."""
        return f"{self.name}-{self.key[:16]}"

    @property
    def tracking_uri(self) -> str:
        return self.env.tracking_uri


@dataclass
class StageResult:
    name: str
    key: str
    run_id: str
    outputs: dict
    cached: bool
    seconds: float
    started: float = 0.0  # seconds from the pipeline's start


@dataclass
class PipelineResult:
    run_id: str
    stages: dict[str, StageResult] = field(default_factory=dict)
    seconds: float = 0.0
    report: Path | None = None  # the HTML report (also report.html on the parent run)


def cache_key(spec: StageSpec, cfg: PipelineConfig, upstream_keys: dict[str, str]) -> str:
    payload = {
        "stage": spec.name,
        "version": spec.version,
        "section": spec.section(cfg).model_dump(mode="json"),
        "seed": cfg.seed,
        "upstream": upstream_keys,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _descendants(stages: list[StageSpec], name: str) -> set[str]:
    out = {name}
    for s in stages:  # dependency order: one pass suffices
        if any(d in out for d in s.deps):
            out.add(s.name)
    return out


def _ancestors(stages: list[StageSpec], name: str) -> set[str]:
    by_name = {s.name: s for s in stages}
    out: set[str] = set()
    todo = list(by_name[name].deps)
    while todo:
        d = todo.pop()
        if d not in out:
            out.add(d)
            todo += by_name[d].deps
    return out


def run_pipeline(
    cfg: PipelineConfig,
    stages: list[StageSpec],
    *,
    experiment_id: str,
    run_name: str | None = None,
    rerun: str | None = None,
    only: str | None = None,
    until: str | None = None,
) -> PipelineResult:
    """Run ``stages`` (in dependency order) under one parent MLflow run.

    ``rerun``: recompute that stage and everything downstream of it, ignoring the cache.
    ``only``: compute that stage alone; its upstream stages must be in the cache.
    ``until``: stop after that stage (run it and its upstream stages only).
    """
    t0 = time.perf_counter()
    names = [s.name for s in stages]
    for s in stages:
        missing = [d for d in s.deps if d not in names[: names.index(s.name)]]
        if missing:
            raise ValueError(f"stage {s.name} depends on {missing}, which do not come before it in the pipeline")
    for flag, value in (("--rerun", rerun), ("--only", only), ("--until", until)):
        if value is not None and value not in names:
            raise StageError(f"{flag} {value}: no such stage; stages: {', '.join(names)}")
    forced = _descendants(stages, rerun) if rerun else set()
    selected = [s for s in stages if s.enabled(cfg)]
    if until:
        keep_until = _ancestors(stages, until) | {until}
        selected = [s for s in selected if s.name in keep_until]
    if only:
        keep = _ancestors(stages, only) | {only}
        selected = [s for s in selected if s.name in keep]
        forced |= {only}
    source = tracking.source_tags()
    if cfg.mlflow.system_metrics_seconds:
        mlflow.set_system_metrics_sampling_interval(cfg.mlflow.system_metrics_seconds)
        mlflow.set_system_metrics_samples_before_logging(1)
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=run_name or f"pipeline {cfg.name}",
        tags={tracking.TAG_KIND: "pipeline", **source},
    ) as parent:
        result = PipelineResult(parent.info.run_id)
        tracking.log_params(parent.info.run_id, flatten(cfg.model_dump(mode="json")))
        mlflow.log_dict(cfg.model_dump(mode="json"), "config.json")
        if rerun or only:
            mlflow.set_tags({k: v for k, v in (("clpipe.rerun", rerun), ("clpipe.only", only)) if v})
        if until:
            mlflow.set_tag("clpipe.until", until)
        keys: dict[str, str] = {}
        for spec in selected:
            must_cache = only is not None and spec.name != only
            started = time.perf_counter() - t0
            res = _run_stage(
                spec,
                cfg,
                experiment_id,
                parent.info.run_id,
                keys,
                result,
                force=spec.name in forced,
                cache_only=must_cache,
                only=only,
                source=source,
            )
            res.started = started
            keys[spec.name] = res.key
            result.stages[spec.name] = res
            mlflow.set_tag(f"clpipe.stage.{spec.name}.run_id", res.run_id)
            mlflow.set_tag(f"clpipe.stage.{spec.name}.cached", str(res.cached).lower())
        result.seconds = time.perf_counter() - t0
        mlflow.log_metric("pipeline/seconds", result.seconds)
        mlflow.log_text(_chain_markdown(result), "chain.md")
        evaluated = result.stages.get("evaluate")
        if evaluated is not None:  # the results on the run a user opens first
            if isinstance(evaluated.outputs.get("metrics"), dict):
                mlflow.log_metrics(evaluated.outputs["metrics"])
            if isinstance(evaluated.outputs.get("table_md"), str):
                mlflow.log_text(evaluated.outputs["table_md"], "results.md")
        try:  # the run's results are in MLflow already: a report that fails to build says so and no more
            result.report = report.write(result, cfg)
        except Exception as e:
            mlflow.set_tag("clpipe.report_error", f"{type(e).__name__}: {e}"[:5000])
            console.print(f"[yellow]report: not written ({type(e).__name__}: {e})[/]")
    return result


def _chain_markdown(result: PipelineResult) -> str:
    lines = ["| stage | run id | cached | seconds |", "|---|---|---|---:|"]
    for s in result.stages.values():
        lines.append(f"| {s.name} | {s.run_id} | {'yes' if s.cached else 'no'} | {s.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def _missing_paths(outputs: dict) -> list[str]:
    return [
        v
        for k, v in flatten(outputs).items()
        if (k.endswith("_dir") or k.endswith("_path")) and isinstance(v, str) and not storage.exists_any(v)
    ]


def _run_stage(
    spec: StageSpec,
    cfg: PipelineConfig,
    experiment_id: str,
    parent_id: str,
    keys: dict[str, str],
    result: PipelineResult,
    *,
    force: bool = False,
    cache_only: bool = False,
    only: str | None = None,
    source: dict[str, str] | None = None,
) -> StageResult:
    deps = [d for d in spec.deps if d in keys]  # a disabled optional stage is not an input
    upstream_keys = {d: keys[d] for d in deps}
    key = cache_key(spec, cfg, upstream_keys)
    inputs = {d: result.stages[d].outputs for d in deps}
    upstream_runs = {d: result.stages[d].run_id for d in deps}
    tags = {
        tracking.TAG_KIND: "stage",
        tracking.TAG_STAGE: spec.name,
        tracking.TAG_KEY: key,
        tracking.TAG_UPSTREAM: json.dumps(upstream_runs),
        tracking.TAG_UPSTREAM_URIS: json.dumps({d: tracking.artifact_uri(r) for d, r in upstream_runs.items()}),
        "mlflow.parentRunId": parent_id,
        **(source or {}),
    }
    shards = inputs.get("shard")  # a shard set (a graph of other stages may have a "shard" of its own)
    if not (isinstance(shards, dict) and {"shard_dir", "manifest_sha256"} <= shards.keys()):
        shards = None
    dataset = f"{cfg.name}-shards"
    t0 = time.perf_counter()

    def reuse(cached: Run, outputs: dict) -> StageResult:
        with mlflow.start_run(
            experiment_id=experiment_id,
            run_name=f"{spec.name} (cached)",
            nested=True,
            tags={**tags, tracking.TAG_CACHE_HIT: "true", tracking.TAG_CACHED_FROM: cached.info.run_id},
        ) as run:
            if shards is not None:
                tracking.log_shard_input(shards, dataset, spec.name)
            tracking.save_outputs(run.info.run_id, outputs)
        console.print(f"[bold]{spec.name}[/]: cached, reusing run {cached.info.run_id} (key {key[:12]})")
        return StageResult(spec.name, key, cached.info.run_id, outputs, True, time.perf_counter() - t0)

    cached = None if force else tracking.find_cached(experiment_id, spec.name, key)
    if cached is not None:
        outputs = tracking.load_outputs(cached.info.run_id)
        missing = _missing_paths(outputs)
        if not missing:
            return reuse(cached, outputs)
        if cache_only:
            raise StageError(
                f"--only {only}: upstream stage {spec.name}'s run {cached.info.run_id} lost its "
                f"artifact {missing[0]}; rerun it: clpipe run --rerun {spec.name}"
            )
        console.print(f"[bold]{spec.name}[/]: cached run {cached.info.run_id} lost {missing[0]}; recomputing")
    elif cache_only:
        raise StageError(
            f"--only {only}: upstream stage {spec.name} has no finished run for this config "
            f"(key {key[:12]}); run the pipeline without --only first"
        )
    # one run at a time computes a stage key (its output dir, shard set and Ray run are the key's): a second
    # run waits here, then takes the first one's result from the cache
    with leases.lease(leases.root_for(cfg), f"{spec.name}-{key[:16]}", say=console.print) as waited:
        cached = tracking.find_cached(experiment_id, spec.name, key) if waited and not force else None
        if cached is not None:
            outputs = tracking.load_outputs(cached.info.run_id)
            if not _missing_paths(outputs):
                return reuse(cached, outputs)
        return _compute(
            spec, cfg, experiment_id, parent_id, key, tags, upstream_runs, inputs, force, t0, dataset, shards
        )


def _compute(
    spec: StageSpec,
    cfg: PipelineConfig,
    experiment_id: str,
    parent_id: str,
    key: str,
    tags: dict,
    upstream_runs: dict[str, str],
    inputs: dict,
    force: bool,
    t0: float,
    dataset: str,
    shards: dict | None,
) -> StageResult:
    console.rule(f"stage {spec.name}")
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=spec.name,
        nested=True,
        tags={**tags, tracking.TAG_CACHE_HIT: "false", "clpipe.forced": str(force).lower()},
        log_system_metrics=spec.system_metrics and cfg.mlflow.system_metrics_seconds > 0,
    ) as run:
        if shards is not None:
            tracking.log_shard_input(shards, dataset, spec.name)
        section = spec.section(cfg)
        tracking.log_params(run.info.run_id, flatten(section.model_dump(mode="json")))
        mlflow.log_dict(section.model_dump(mode="json"), f"{spec.name}_config.json")
        out_dir = cfg.work_path() / spec.name / key[:16]
        ctx = StageContext(
            spec.name, key, run.info.run_id, parent_id, cfg.seed, StageEnv.of(cfg), out_dir, upstream_runs, rerun=force
        )
        if force:  # recompute from scratch: drop partial outputs (a stage drops what it keeps elsewhere: ctx.rerun)
            shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            outputs = spec.fn(ctx, section, inputs)
        except Exception as e:
            mlflow.set_tag("clpipe.error", f"{type(e).__name__}: {e}"[:5000])
            raise StageError(f"stage {spec.name} failed: {type(e).__name__}: {e}") from e
        tracking.save_outputs(run.info.run_id, outputs)
        seconds = time.perf_counter() - t0
        mlflow.log_metric("stage/seconds", seconds)
    console.print(f"[bold]{spec.name}[/]: done in {seconds:.1f} s (run {run.info.run_id})")
    return StageResult(spec.name, key, run.info.run_id, outputs, False, seconds)
