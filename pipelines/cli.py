"""``clpipe``: run the pipeline, check a config, list methods; start the local stack
(``stack up|down|status``) and run the pipeline as a Ray Job (``submit``, ``jobs``, ``logs``, ``stop``)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

import yaml

from infra.jobs import JobsError
from infra.stack import StackError
from pipelines.console import console
from pipelines.errors import StageError

JOB_COMMANDS = ("submit", "jobs", "logs", "stop")  # the Ray Jobs client commands
SECRETS_HELP = (
    "also send this shell's AWS keys, session token and MLflow token/password to the cluster (default: "
    "its nodes use their own credentials); anyone who can reach the cluster's job server can read them "
    "back, and Ray's logs record them"
)

if TYPE_CHECKING:  # the config module imports torch: `stack`, `jobs`, `logs`, `stop` start without it
    from pipelines.config import PipelineConfig


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (default: the embedded digits pipeline)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set pretrain.epochs=5 (repeatable)",
    )
    p.add_argument("--work-dir", help="where shards, checkpoints and the MLflow store live (config: work_dir)")


def _config(args: argparse.Namespace) -> PipelineConfig:
    from pipelines.config import load_config

    overrides = list(args.overrides)
    if args.work_dir:
        overrides.append(f"work_dir={args.work_dir}")
    return load_config(args.config, overrides)


def run(
    cfg: PipelineConfig,
    *,
    rerun: str | None = None,
    only: str | None = None,
    until: str | None = None,
    forward_secrets: bool = False,
):
    """Run the stages (shard -> labels -> sweep -> pretrain -> finetune -> distill ->
    evaluate -> register) and print the summary. Returns the PipelineResult."""
    from cl_core.data import storage
    from pipelines import ray_env, tracking
    from pipelines.config import ConfigError
    from pipelines.graph import run_pipeline
    from pipelines.stages import STAGES

    t0 = time.perf_counter()
    tracking.quiet()
    cfg.work_path().mkdir(parents=True, exist_ok=True)
    exp_id = tracking.setup(cfg.tracking_uri(), cfg.mlflow.experiment, cfg.artifact_location())
    console.print(f"clpipe: pipeline [bold]{cfg.name}[/], work dir {cfg.work_path()}, MLflow {cfg.tracking_uri()}")
    for uri in cfg.s3_locations():  # an S3 endpoint or bucket that fails: one line, before Ray starts
        storage.check(uri)
    ray_env.init(cfg.ray, forward_secrets=forward_secrets)
    ray_env.preflight(cfg)
    if cfg.is_text():
        image_only = {"labels", "finetune", "distill", "evaluate", "register"}
        if only in image_only or until in image_only:
            raise ConfigError(
                f"--{'only' if only in image_only else 'until'} {only or until}: a text pipeline "
                f"({cfg.pretrain.method}) has the stages shard and pretrain only"
            )
        if until is None:
            console.print(
                f"clpipe: {cfg.pretrain.method} reads text: running shard and pretrain (the sweep, labels, "
                "finetune, distill, evaluate and register stages are for images)"
            )
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
        for col in (
            "label fraction",
            "labels",
            "encoder kNN",
            "encoder linear",
            "supervised baseline",
            "teacher",
            "student",
        ):
            t.add_column(col, justify="right")
        for r in rows:
            t.add_row(
                f"{r['label_fraction']:g}",
                str(r["labels"]),
                *[
                    f"{r[c]:.4f}" if c in r else "-"
                    for c in ("encoder_knn", "encoder_linear", "baseline", "teacher", "student")
                ],
            )
        t.add_row(
            "1 (all)",
            "-",
            f"{metrics['test/pretrained/knn_top1']:.4f}",
            f"{metrics['test/pretrained/linear_top1']:.4f}",
            "-",
            "-",
            "-",
        )
        t.add_row(
            "random init, all",
            "-",
            f"{metrics['test/random_init/knn_top1']:.4f}",
            f"{metrics['test/random_init/linear_top1']:.4f}",
            "-",
            "-",
            "-",
        )
        console.print(t)
    reg = result.stages.get("register")
    if reg is not None and not reg.cached:
        for v in reg.outputs.get("versions", {}).values():
            console.print(f"  registered {v['name']} version {v['version']}{' (champion)' if v['champion'] else ''}")
    for name, s in result.stages.items():
        console.print(f"  {name:<9} {'cached' if s.cached else f'{s.seconds:6.1f} s'}  run {s.run_id}")
    console.print(f"wall time {wall:.1f} s; MLflow parent run {result.run_id}")
    if result.report is not None:
        console.print(f"report: {result.report} (report.html on the parent run)")
    console.print(f"open the MLflow UI: [bold]{tracking.ui_command(cfg.tracking_uri())}[/]")


def _print_trials(out: dict) -> None:
    from rich.table import Table

    ranked = out["ranked"]
    names = [k for k in ranked[0] if k not in ("rank", "trial", "best", "last", "epochs_run", "stopped_early")]
    t = Table(title=f"sweep: {out['trials']} trials ranked by {out['metric']}")
    for col in ("rank", *names, out["metric"], "best epoch value", "epochs", "ASHA"):
        t.add_column(col, justify="right")
    for r in ranked:
        t.add_row(
            str(r["rank"]),
            *[f"{r[n]:.4g}" if isinstance(r[n], float) else str(r[n]) for n in names],
            f"{r['last']:.4f}",
            f"{r['best']:.4f}",
            str(r["epochs_run"]),
            "stopped" if r["stopped_early"] else "",
        )
    console.print(t)


def _add_stack_commands(sub) -> None:
    p = sub.add_parser("stack", help="a local SeaweedFS (S3), MLflow server and Ray head on 127.0.0.1")
    ssub = p.add_subparsers(dest="stack_command", required=True)
    p_up = ssub.add_parser("up", help="start S3, MLflow and Ray, each waited on until healthy; write the env file")
    p_down = ssub.add_parser("down", help="stop exactly the processes `up` started (by pid); remove the env file")
    p_status = ssub.add_parser("status", help="each service's pid, port and whether it answers")
    for q in (p_up, p_down, p_status):
        q.add_argument(
            "--dir",
            default=".clpipe-stack",
            help="state dir: S3 data, mlflow.db, logs, pids, the env file (default: ./.clpipe-stack)",
        )
    p_up.add_argument(
        "--s3-port", type=int, default=8333, help="SeaweedFS S3 port (it also uses +1..+3 and +10000 each)"
    )
    p_up.add_argument("--mlflow-port", type=int, default=5000, help="MLflow tracking server port")
    p_up.add_argument("--ray-port", type=int, default=6379, help="Ray GCS port (what RAY_ADDRESS names)")
    p_up.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard and job server port")
    p_up.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface the servers bind (default loopback; Ray's GCS and raylet listen on every "
        "interface whatever this says)",
    )
    p_up.add_argument("--bucket", default="clpipe", help="S3 bucket for MLflow artifacts (and your shards)")
    p_up.add_argument(
        "--num-cpus",
        type=int,
        help="logical CPUs of the Ray head (default: Ray counts them; 0: a head "
        "that runs no work, as on a cluster whose workers join it)",
    )
    p_up.add_argument(
        "--ray-auth",
        choices=("disabled", "token"),
        default="disabled",
        help="token: Ray's token auth on the head (the token goes to the env file, 0600); other nodes "
        "join with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN",
    )
    p_up.add_argument("--timeout", type=float, default=120.0, help="seconds each server may take to become healthy")


def _add_job_commands(sub) -> None:
    addr_help = "Ray job server (the dashboard), default $CLPIPE_JOB_ADDRESS or http://127.0.0.1:8265"
    p_submit = sub.add_parser("submit", help="run the pipeline as a Ray Job on a cluster and follow its logs")
    _add_config_args(p_submit)
    p_submit.add_argument("--address", help=addr_help)
    p_submit.add_argument("--no-follow", action="store_true", help="print the job id and return at once")
    p_submit.add_argument("--forward-secrets", action="store_true", help=SECRETS_HELP)
    for flag in ("--rerun", "--only", "--until"):
        p_submit.add_argument(flag, metavar="STAGE", help=f"passed to `clpipe run {flag}`")
    p_jobs = sub.add_parser("jobs", help="list the Ray Jobs: id, status, start time, entrypoint")
    p_jobs.add_argument("--address", help=addr_help)
    p_logs = sub.add_parser("logs", help="print a job's logs")
    p_logs.add_argument("job", help="job (submission) id, as `clpipe submit` printed it")
    p_logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p_logs.add_argument("--address", help=addr_help)
    p_stop = sub.add_parser("stop", help="stop a running job")
    p_stop.add_argument("job", help="job (submission) id")
    p_stop.add_argument("--address", help=addr_help)


def _stack(args: argparse.Namespace) -> int:
    from pathlib import Path

    from infra import stack

    d = Path(args.dir)
    if args.stack_command == "up":
        cfg = stack.StackConfig(
            dir=d,
            s3_port=args.s3_port,
            mlflow_port=args.mlflow_port,
            ray_port=args.ray_port,
            dashboard_port=args.dashboard_port,
            host=args.host,
            bucket=args.bucket,
            num_cpus=args.num_cpus,
            timeout=args.timeout,
            ray_auth=args.ray_auth,
        )
        if args.host not in ("127.0.0.1", "localhost"):
            guards = (
                "S3 keys and the Ray token are the guards"
                if args.ray_auth == "token"
                else "S3 keys are the only guard (Ray has none: --ray-auth token turns its token auth on)"
            )
            print(
                f"clpipe: note: --host {args.host}: the servers are reachable beyond this machine; {guards}; "
                "MLflow has no authentication here"
            )
        print(f"clpipe: starting the stack in {d.resolve()} ...")
        state = stack.up(cfg, say=print)
        env_file = state["env_file"]
        if d.resolve().name == stack.DEFAULT_DIR:
            print(
                f"clpipe commands run from {d.resolve().parent} read it; elsewhere: export CLPIPE_STACK_ENV={env_file}"
            )
        else:
            print(f"point clpipe at it: export CLPIPE_STACK_ENV={env_file}")
        print(
            f"MLflow UI http://{stack.url_host(args.host)}:{args.mlflow_port}, "
            f"Ray dashboard http://{stack.url_host(args.host)}:{args.dashboard_port}; stop: clpipe stack down"
            f"{'' if args.dir == '.clpipe-stack' else f' --dir {args.dir}'}"
        )
        return 0
    if args.stack_command == "down":
        return 0 if stack.down(d, say=print) else 1
    rows = stack.status(d)
    if not rows:
        print(f"no stack in {d.resolve()} (start one with `clpipe stack up`)")
        return 1
    for r in rows:
        where = f"{r['url']}" + (f" (GCS port {r['port']})" if r["name"] == "ray" else "")
        health = "healthy" if r["healthy"] else ("running, not answering" if r["running"] else "not running")
        print(f"  {r['name']:<7} pid {r['pid']:<7} port {r['port']:<5}  {where:<40} {health}")
    env_file = d.resolve() / stack.ENV_FILE
    print(f"env file {env_file}{'' if env_file.exists() else ' (missing)'}")
    return 0 if all(r["healthy"] for r in rows) else 1


def _jobs(args: argparse.Namespace) -> int:
    from infra import jobs

    if args.command == "submit":
        from pipelines.config import ConfigError, config_path, load_config

        flags = [
            x for flag in ("rerun", "only", "until") if getattr(args, flag) for x in (f"--{flag}", getattr(args, flag))
        ]
        overrides = list(args.overrides) + ([f"work_dir={args.work_dir}"] if args.work_dir else [])
        try:
            cfg = load_config(args.config, overrides)  # a typo fails here, not minutes later on the cluster
            pipeline = jobs.Pipeline(
                cfg.name,
                args.config,
                config_path(args.config) if args.config else None,
                args.work_dir or cfg.work_dir,
                cfg.mlflow.tracking_uri,
            )
            return jobs.submit(
                pipeline,
                overrides,
                address=args.address,
                follow=not args.no_follow,
                flags=flags,
                forward_secrets=args.forward_secrets,
            )
        except ConfigError as e:
            print(f"clpipe: config error:\n{e}", file=sys.stderr)
            return 2
    if args.command == "jobs":
        return jobs.list_jobs(args.address)
    if args.command == "logs":
        return jobs.logs(args.job, args.address, follow=args.follow)
    return jobs.stop(args.job, args.address)


def _load_stack_env(args: argparse.Namespace) -> None:
    """The local stack's env file ($CLPIPE_STACK_ENV, else ./.clpipe-stack/stack.env if
    present) into os.environ, never overriding a variable already set; for a jobs command
    with --address, only when that address is the stack's own job server."""
    from infra import stack

    stack.load_env(job_address=args.address if args.command in JOB_COMMANDS else None)


def _export(args: argparse.Namespace) -> int:
    import mlflow

    from pipelines import tracking
    from pipelines.config import load_config
    from pipelines.export import describe, export

    overrides = [f"work_dir={args.work_dir}"] if args.work_dir else []
    tracking.use(load_config(None, overrides).tracking_uri())
    try:
        out = export(args.model, args.output, args.format)
    except (ValueError, RuntimeError, OSError, mlflow.exceptions.MlflowException) as e:
        print(f"clpipe: export {args.model}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"clpipe: {args.model} -> {out} ({args.format}, outputs checked); load it with {describe(out, args.format)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``clpipe`` command line (every subcommand and option; parsing imports no torch)."""
    parser = argparse.ArgumentParser(prog="clpipe", description="Contrastive pretraining pipelines on Ray with MLflow.")
    sub = parser.add_subparsers(dest="command")
    p_run = sub.add_parser(
        "run", help="run the pipeline (shard, labels, sweep, pretrain, finetune, distill, evaluate, register)"
    )
    _add_config_args(p_run)
    p_run.add_argument(
        "--rerun", metavar="STAGE", help="recompute STAGE and everything downstream of it (ignore the cache)"
    )
    p_run.add_argument(
        "--only", metavar="STAGE", help="compute STAGE alone against the cached outputs of its upstream stages"
    )
    p_run.add_argument("--until", metavar="STAGE", help="stop after STAGE (e.g. --until pretrain)")
    p_run.add_argument(
        "--forward-secrets",
        action="store_true",
        help="joining a running cluster (ray.address) from outside a job: also send this shell's "
        "credentials to the run's workers in its runtime_env (default: their nodes' own); anyone who "
        "can reach the cluster's job server can read them back, and Ray's logs record them",
    )
    p_sweep = sub.add_parser(
        "sweep", help="run the sweep stage alone (shard, then Ray Tune) and print the ranked trials"
    )
    _add_config_args(p_sweep)
    p_cfg = sub.add_parser("config", help="validate a config and print it resolved")
    _add_config_args(p_cfg)
    sub.add_parser(
        "methods", help="list the known methods with their hyperparameters, defaults and default sweep space"
    )
    p_exp = sub.add_parser(
        "export",
        help="write a logged or registered model as a state_dict folder, TorchScript or "
        "ONNX file, checked against the model's outputs on its input example",
    )
    p_exp.add_argument("model", help="MLflow model URI, e.g. models:/default-student@champion")
    p_exp.add_argument("output", help="the file (torchscript, onnx) or folder (state_dict) to write")
    p_exp.add_argument("--format", default="torchscript", choices=["state_dict", "torchscript", "onnx"])
    p_exp.add_argument(
        "--work-dir",
        help="the pipeline's work dir, whose MLflow store holds the model (default: "
        "$MLFLOW_TRACKING_URI, else ./clpipe-work)",
    )
    _add_stack_commands(sub)
    _add_job_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["run", *(argv or [])])
    try:
        if args.command == "stack":
            return _stack(args)
        _load_stack_env(args)
        if args.command in JOB_COMMANDS:
            return _jobs(args)
    except (StackError, JobsError) as e:
        print(f"clpipe: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("clpipe: interrupted", file=sys.stderr)
        return 130
    from pipelines.config import ConfigError

    try:
        if args.command == "methods":
            from cl_core.methods import get_method, known_methods, method_params

            for name in known_methods():
                cls = get_method(name)
                hp = ", ".join(f"{k}={v!r}" for k, v in method_params(name).items())
                swept = "; ".join(f"{k} {v}" for k, v in cls.sweep_space.items())
                print(f"{name:<13} {cls.view_kind:<10} {hp}\n{'':<24} sweep.space by default: {swept}")
            return 0
        if args.command == "export":
            return _export(args)
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
        run(cfg, rerun=args.rerun, only=args.only, until=args.until, forward_secrets=args.forward_secrets)
        return 0
    except ConfigError as e:
        print(f"clpipe: config error:\n{e}", file=sys.stderr)
        return 2
    except StageError as e:
        print(f"clpipe: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a server or bucket checked before any stage: its one line (storage: StorageError)
        if not isinstance(e, ConnectionError) and type(e).__name__ != "StorageError":
            raise
        print(f"clpipe: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("clpipe: interrupted; rerun the same command to resume (finished stages are cached)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
