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


def run(cfg: PipelineConfig, *, rerun: str | None = None, only: str | None = None, until: str | None = None):
    """Run the stages (shard -> pretrain, labels -> finetune -> distill -> evaluate ->
    register) and print the summary. Returns the PipelineResult."""
    from pipelines import ray_env, tracking
    from pipelines.graph import run_pipeline
    from pipelines.stages import STAGES

    t0 = time.perf_counter()
    tracking.quiet()
    cfg.work_path().mkdir(parents=True, exist_ok=True)
    exp_id = tracking.setup(cfg.tracking_uri(), cfg.mlflow.experiment, cfg.artifact_location())
    console.print(f"clpipe: pipeline [bold]{cfg.name}[/], work dir {cfg.work_path()}, MLflow {cfg.tracking_uri()}")
    ray_env.init(cfg.ray)
    if cfg.is_text():
        image_only = {"labels", "finetune", "distill", "evaluate", "register"}
        if only in image_only or until in image_only:
            raise ConfigError(f"--{'only' if only in image_only else 'until'} {only or until}: a text pipeline "
                              f"({cfg.pretrain.method}) has the stages shard and pretrain only")
        if until is None:
            console.print(f"clpipe: {cfg.pretrain.method} reads text: running shard and pretrain (the sweep, labels, "
                          "finetune, distill, evaluate and register stages are for images)")
            until = "pretrain"
    result = run_pipeline(cfg, STAGES, experiment_id=exp_id, rerun=rerun, only=only, until=until)
    _summary(cfg, result, time.perf_counter() - t0)
    return result


def _summary(cfg: PipelineConfig, result, wall: float) -> None:
    from rich.table import Table

    from pipelines import tracking

    ev = result.stages.get("evaluate")
    if ev is not None and ev.outputs.get("rows"):
        metrics, rows = ev.outputs["metrics"], ev.outputs["rows"]
        t = Table(title=f"test top-1 ({int(metrics['test/num_samples'])} images)")
        for col in ("label fraction", "labels", "encoder kNN", "encoder linear", "supervised baseline", "teacher", "student"):
            t.add_column(col, justify="right")
        for r in rows:
            t.add_row(f"{r['label_fraction']:g}", str(r["labels"]),
                      *[f"{r[c]:.4f}" if c in r else "-" for c in ("encoder_knn", "encoder_linear", "baseline", "teacher", "student")])
        t.add_row("1 (all)", "-", f"{metrics['test/pretrained/knn_top1']:.4f}", f"{metrics['test/pretrained/linear_top1']:.4f}",
                  "-", "-", "-")
        t.add_row("random init, all", "-", f"{metrics['test/random_init/knn_top1']:.4f}",
                  f"{metrics['test/random_init/linear_top1']:.4f}", "-", "-", "-")
        console.print(t)
    reg = result.stages.get("register")
    if reg is not None and not reg.cached:
        for v in reg.outputs.get("versions", {}).values():
            console.print(f"  registered {v['name']} version {v['version']}{' (champion)' if v['champion'] else ''}")
    for name, s in result.stages.items():
        console.print(f"  {name:<9} {'cached' if s.cached else f'{s.seconds:6.1f} s'}  run {s.run_id}")
    console.print(f"wall time {wall:.1f} s; MLflow parent run {result.run_id}")
    console.print(f"open the MLflow UI: [bold]{tracking.ui_command(cfg.tracking_uri())}[/]")


def _print_trials(out: dict) -> None:
    from rich.table import Table

    ranked = out["ranked"]
    names = [k for k in ranked[0] if k not in ("rank", "trial", "best", "last", "epochs_run", "stopped_early")]
    t = Table(title=f"sweep: {out['trials']} trials ranked by {out['metric']}")
    for col in ("rank", *names, out["metric"], "best epoch value", "epochs", "ASHA"):
        t.add_column(col, justify="right")
    for r in ranked:
        t.add_row(str(r["rank"]), *[f"{r[n]:.4g}" if isinstance(r[n], float) else str(r[n]) for n in names],
                  f"{r['last']:.4f}", f"{r['best']:.4f}", str(r["epochs_run"]), "stopped" if r["stopped_early"] else "")
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clpipe", description="Contrastive pretraining pipelines on Ray with MLflow.")
    sub = parser.add_subparsers(dest="command")
    p_run = sub.add_parser("run", help="run the pipeline (shard, pretrain, labels, finetune, distill, evaluate, register)")
    _add_config_args(p_run)
    p_run.add_argument("--rerun", metavar="STAGE", help="recompute STAGE and everything downstream of it (ignore the cache)")
    p_run.add_argument("--only", metavar="STAGE", help="compute STAGE alone against the cached outputs of its upstream stages")
    p_run.add_argument("--until", metavar="STAGE", help="stop after STAGE (e.g. --until pretrain)")
    p_sweep = sub.add_parser("sweep", help="run the sweep stage alone (shard, then Ray Tune) and print the ranked trials")
    _add_config_args(p_sweep)
    p_cfg = sub.add_parser("config", help="validate a config and print it resolved")
    _add_config_args(p_cfg)
    sub.add_parser("methods", help="list the known methods with their hyperparameters and defaults")
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["run", *(argv or [])])
    try:
        if args.command == "methods":
            from cl_core.methods import get_method, known_methods, method_params

            for name in known_methods():
                cls = get_method(name)
                hp = ", ".join(f"{k}={v!r}" for k, v in method_params(name).items())
                print(f"{name:<13} {cls.view_kind:<10} {hp}")
            return 0
        if args.command == "sweep":
            args.overrides = [*args.overrides, "sweep.enabled=true"]
        cfg = _config(args)
        if args.command == "sweep":
            result = run(cfg, until="sweep")
            _print_trials(result.stages["sweep"].outputs)
            return 0
        if args.command == "config":
            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
            return 0
        run(cfg, rerun=args.rerun, only=args.only, until=args.until)
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
