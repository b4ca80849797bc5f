"""``clpipe``: run the pipeline, check a config, list methods."""

from __future__ import annotations

import argparse
import sys
import time

import yaml

from pipelines.config import ConfigError, PipelineConfig, load_config
from pipelines.console import console
from pipelines.errors import StageError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (default: the embedded digits pipeline)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set pretrain.epochs=5 (repeatable)")
    p.add_argument("--work-dir", help="where shards, checkpoints and the MLflow store live (config: work_dir)")


def _config(args: argparse.Namespace) -> PipelineConfig:
    overrides = list(args.overrides)
    if args.work_dir:
        overrides.append(f"work_dir={args.work_dir}")
    return load_config(args.config, overrides)


def run(cfg: PipelineConfig):
    """Run shard -> pretrain -> evaluate and print the summary. Returns the PipelineResult."""
    from pipelines import ray_env, tracking
    from pipelines.graph import run_pipeline
    from pipelines.stages import STAGES

    t0 = time.perf_counter()
    tracking.quiet()
    cfg.work_path().mkdir(parents=True, exist_ok=True)
    exp_id = tracking.setup(cfg.tracking_uri(), cfg.mlflow.experiment, cfg.artifact_location())
    console.print(f"clpipe: pipeline [bold]{cfg.name}[/], work dir {cfg.work_path()}, MLflow {cfg.tracking_uri()}")
    ray_env.init(cfg.ray)
    result = run_pipeline(cfg, STAGES, experiment_id=exp_id)
    _summary(cfg, result, time.perf_counter() - t0)
    return result


def _summary(cfg: PipelineConfig, result, wall: float) -> None:
    from rich.table import Table

    from pipelines import tracking

    metrics = result.stages["evaluate"].outputs.get("metrics", {})
    if metrics:
        t = Table(title=f"test split ({int(metrics['test/num_samples'])} images)")
        t.add_column("encoder")
        t.add_column("kNN top-1", justify="right")
        t.add_column("linear probe top-1", justify="right")
        for name in ("pretrained", "random_init"):
            t.add_row(name.replace("_", " "), f"{metrics[f'test/{name}/knn_top1']:.4f}",
                      f"{metrics[f'test/{name}/linear_top1']:.4f}")
        console.print(t)
    for name, s in result.stages.items():
        console.print(f"  {name:<9} {'cached' if s.cached else f'{s.seconds:6.1f} s'}  run {s.run_id}")
    console.print(f"wall time {wall:.1f} s; MLflow parent run {result.run_id}")
    console.print(f"open the MLflow UI: [bold]{tracking.ui_command(cfg.tracking_uri())}[/]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clpipe", description="Contrastive pretraining pipelines on Ray with MLflow.")
    sub = parser.add_subparsers(dest="command")
    p_run = sub.add_parser("run", help="run the pipeline (shard -> pretrain -> evaluate)")
    _add_config_args(p_run)
    p_cfg = sub.add_parser("config", help="validate a config and print it resolved")
    _add_config_args(p_cfg)
    sub.add_parser("methods", help="list the known methods")
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["run", *(argv or [])])
    try:
        if args.command == "methods":
            from cl_core.methods import known_methods

            print("\n".join(known_methods()))
            return 0
        cfg = _config(args)
        if args.command == "config":
            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
            return 0
        run(cfg)
        return 0
    except ConfigError as e:
        print(f"clpipe: config error:\n{e}", file=sys.stderr)
        return 2
    except StageError as e:
        print(f"clpipe: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("clpipe: interrupted; rerun the same command to resume (finished stages are cached)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
