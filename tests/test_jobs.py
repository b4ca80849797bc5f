"""The pipeline as a Ray Job on the local stack: `clpipe submit | jobs | logs | stop` and
the documented `ray job submit`, against a real Ray head, MLflow server and SeaweedFS
started once for the module and stopped by pid."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from infra import jobs, procs, stack
from pipelines import tracking
from pipelines.cli import main
from tests.test_pipeline_e2e import STAGES, TINY
from tests.test_stack import ENV_KEYS, free_stack_ports, stop_stack


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory):
    saved = dict(os.environ)
    d = tmp_path_factory.mktemp("jobs") / "stack"
    ports = free_stack_ports()
    cfg = stack.StackConfig(dir=d, s3_port=ports["s3"], mlflow_port=ports["mlflow"], ray_port=ports["ray"],
                            dashboard_port=ports["dashboard"], num_cpus=4)
    try:
        t0 = time.perf_counter()
        state = stack.up(cfg, say=lambda _: None)
        print(f"\nstack up: {time.perf_counter() - t0:.1f} s")
        for k in ENV_KEYS:  # the stack's env file, not the developer's shell, points the CLI
            os.environ.pop(k, None)
        os.environ["CLPIPE_STACK_ENV"] = state["env_file"]
        yield SimpleNamespace(dir=d, ports=ports, env=stack.read_env_file(Path(state["env_file"])),
                              address=f"http://127.0.0.1:{ports['dashboard']}")
    finally:
        stop_stack(d)
        os.environ.clear()
        os.environ.update(saved)


def _secrets(live_stack) -> list[str]:
    return [live_stack.env["AWS_ACCESS_KEY_ID"], live_stack.env["AWS_SECRET_ACCESS_KEY"]]


@pytest.mark.slow
def test_submit_runs_the_tiny_pipeline_and_its_runs_reach_the_server(live_stack, tmp_path, capsys):
    t0 = time.perf_counter()
    rc = main(["submit", "--work-dir", str(tmp_path / "work"), *TINY])
    out = capsys.readouterr()
    print(f"submit (tiny pipeline as a job): {time.perf_counter() - t0:.1f} s")
    assert rc == 0, out.out[-4000:] + out.err[-2000:]
    job_id = re.search(r"submitted job (\S+) to ", out.out).group(1)
    assert f"job {job_id} SUCCEEDED" in out.out
    assert "stage shard" in out.out and "wall time" in out.out  # the job's log, followed
    for s in _secrets(live_stack):
        assert s not in out.out and s not in out.err

    # the pipeline's parent run and one finished child run per stage, through the MLflow server
    client = MlflowClient(live_stack.env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("clpipe")
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TAG_KIND}` = 'pipeline'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert {r.data.tags[tracking.TAG_STAGE] for r in children} == set(STAGES)
    assert all(r.info.status == "FINISHED" for r in children)
    for r in (*parents, *children):  # the keys never reach params or tags
        for s in _secrets(live_stack):
            assert s not in json.dumps({**r.data.params, **r.data.tags})

    assert main(["jobs"]) == 0
    listed = capsys.readouterr().out
    assert re.search(rf"^{re.escape(job_id)}\s+SUCCEEDED\s+\d{{4}}-\d\d-\d\d .*python -m pipelines run", listed, re.M)

    assert main(["logs", job_id]) == 0
    log = capsys.readouterr().out
    assert "stage register" in log and f"MLflow {live_stack.env['MLFLOW_TRACKING_URI']}" in log
    for s in _secrets(live_stack):
        assert s not in log

    assert main(["logs", "no-such-job"]) == 1
    assert capsys.readouterr().err.strip() == (f"clpipe: no job no-such-job on {live_stack.address}; list them with "
                                               f"`clpipe jobs --address {live_stack.address}`")


@pytest.mark.slow
def test_stop_ends_a_running_job_submitted_with_a_config_outside_the_project(live_stack, tmp_path, capsys):
    from ray.job_submission import JobSubmissionClient

    cfg = tmp_path / "long.yaml"  # outside the project: its text travels with the job
    cfg.write_text("name: long-job\nsweep:\n  enabled: false\npretrain:\n  epochs: 500\n")
    assert main(["submit", str(cfg), "--no-follow", "--work-dir", str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out
    job_id = re.search(r"submitted job (\S+) to ", out).group(1)
    assert "clpipe-long-job-" in job_id and f"clpipe logs {job_id} --follow" in out

    client = JobSubmissionClient(live_stack.address)
    procs.wait_until(lambda: "pipeline long-job" in client.get_job_logs(job_id), 240, "the long job's first line")
    assert str(client.get_job_status(job_id)) == "RUNNING"

    t0 = time.perf_counter()
    assert main(["stop", job_id]) == 0
    print(f"stop: {time.perf_counter() - t0:.1f} s")
    assert f"job {job_id} STOPPED" in capsys.readouterr().out
    assert str(client.get_job_status(job_id)) == "STOPPED"
    assert main(["stop", job_id]) == 0
    assert f"job {job_id} already STOPPED" in capsys.readouterr().out


@pytest.mark.slow
def test_the_documented_ray_job_submit_runs_the_pipeline(live_stack, tmp_path):
    env = live_stack.env
    runtime_env = {"env_vars": {k: env[k] for k in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                    "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                                    "MLFLOW_S3_ENDPOINT_URL", "RAY_AUTH_MODE")},
                   "excludes": jobs.EXCLUDES}
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", live_stack.address,
           "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "-m", "pipelines", "run", "--until", "shard", "--work-dir", str(tmp_path / "work"),
           "--set", "sweep.enabled=false", "--set", "name=via-ray-cli"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=jobs.project_root(), capture_output=True, text=True, timeout=400,
                       env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    print(f"ray job submit (shard stage): {time.perf_counter() - t0:.1f} s")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout and "pipeline via-ray-cli" in r.stdout

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("clpipe")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'pipeline via-ray-cli'")
    assert [x.info.status for x in runs] == ["FINISHED"]


@pytest.mark.parametrize("argv", [["submit", "--no-follow"], ["jobs"], ["logs", "some-job"], ["stop", "some-job"]])
def test_an_address_that_does_not_answer_fails_fast_with_one_line(argv, capsys):
    address = f"http://127.0.0.1:{procs.free_port()}"
    t0 = time.perf_counter()
    assert main([*argv, "--address", address]) == 1
    assert time.perf_counter() - t0 < jobs.CONNECT_TIMEOUT + 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"no Ray job server answers at {address}" in err and "clpipe stack up" in err and "--address" in err


def test_the_job_carries_the_config_and_the_environment_but_no_secret_in_its_command(tmp_path, monkeypatch):
    root = jobs.project_root()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("UNRELATED_SECRET", "nope")
    inside = root / "pipelines" / "configs" / "default.yaml"
    entry, renv = jobs.build_job(str(inside), ["pretrain.epochs=1"], root)
    assert entry == "python -m pipelines run pipelines/configs/default.yaml --set pretrain.epochs=1"
    assert renv["working_dir"] == str(root) and ".clpipe-stack" in renv["excludes"] and ".venv" in renv["excludes"]
    assert renv["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "s3cr3t-value"
    assert renv["env_vars"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert "UNRELATED_SECRET" not in renv["env_vars"] and "RAY_ADDRESS" not in renv["env_vars"]

    outside = tmp_path / "my config.yaml"  # outside the project: its text travels in the runtime_env
    outside.write_text("name: outside\n")
    entry, renv = jobs.build_job(str(outside), [], root)
    assert renv["env_vars"][jobs.CONFIG_ENV] == "name: outside\n"
    assert entry.startswith(f'printf "%s" "${jobs.CONFIG_ENV}" > ') and "python -m pipelines run 'clpipe-job-" in entry
    assert "s3cr3t-value" not in entry

    entry, _ = jobs.build_job(None, ["work_dir=/w"], root, ["--until", "shard"])
    assert entry == "python -m pipelines run --set work_dir=/w --until shard"
    with pytest.raises(jobs.JobsError, match="no such file"):
        jobs.build_job(str(tmp_path / "missing.yaml"), [], root)
