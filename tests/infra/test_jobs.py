"""`clpipe submit | jobs | logs | stop` without a job server: an address that does not
answer, and the job a submit builds (entrypoint, runtime env, no secret in the command).
The jobs themselves run against the local stack in tests/infra/test_stack.py."""

import time

import pytest

from infra import jobs, procs
from pipelines.cli import main


@pytest.mark.parametrize("argv", [["submit", "--no-follow"], ["jobs"], ["logs", "some-job"], ["stop", "some-job"]])
def test_an_address_that_does_not_answer_fails_fast_with_one_line(argv, capsys):
    address = f"http://127.0.0.1:{procs.free_port()}"
    t0 = time.perf_counter()
    assert main([*argv, "--address", address]) == 1
    assert time.perf_counter() - t0 < jobs.CONNECT_TIMEOUT + 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"no Ray job server answers at {address}" in err and "clpipe stack up" in err and "--address" in err


def test_the_job_carries_the_config_and_the_locations_and_secrets_only_when_asked(tmp_path, monkeypatch):
    root = jobs.project_root()
    secrets = {
        "AWS_ACCESS_KEY_ID": "AKIDVALUE",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
        "AWS_SESSION_TOKEN": "sess-token",
        "MLFLOW_TRACKING_TOKEN": "mlf-token",
        "MLFLOW_TRACKING_PASSWORD": "mlf-pass",
    }
    assert set(secrets) == set(jobs.SECRET_ENV) and not set(jobs.SECRET_ENV) & set(jobs.FORWARD_ENV)
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    monkeypatch.setenv("UNRELATED_SECRET", "nope")
    inside = root / "pipelines" / "configs" / "default.yaml"
    entry, renv = jobs.build_job(inside, ["pretrain.epochs=1"], root)
    assert entry == "python -m pipelines run pipelines/configs/default.yaml --set pretrain.epochs=1"
    assert renv["working_dir"] == str(root) and ".clpipe-stack" in renv["excludes"] and ".venv" in renv["excludes"]
    assert renv["env_vars"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert renv["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:8333"
    assert not set(secrets) & set(renv["env_vars"]) and not any(v in repr(renv) for v in secrets.values())
    assert jobs.withheld_secrets() == list(jobs.SECRET_ENV)
    assert "UNRELATED_SECRET" not in renv["env_vars"] and "RAY_ADDRESS" not in renv["env_vars"]
    _, renv = jobs.build_job(inside, [], root, forward_secrets=True)  # --forward-secrets
    assert {k: renv["env_vars"][k] for k in secrets} == secrets

    outside = tmp_path / "my config.yaml"  # outside the project: its text travels in the runtime_env
    outside.write_text("name: outside\n")
    entry, renv = jobs.build_job(outside, [], root)
    assert renv["env_vars"][jobs.CONFIG_ENV] == "name: outside\n"
    assert entry.startswith(f'printf "%s" "${jobs.CONFIG_ENV}" > ') and "python -m pipelines run 'clpipe-job-" in entry
    assert "s3cr3t-value" not in entry

    entry, _ = jobs.build_job(None, ["work_dir=/w"], root, ["--until", "shard"])
    assert entry == "python -m pipelines run --set work_dir=/w --until shard"


def test_a_submit_with_a_bad_config_fails_before_it_connects(tmp_path, capsys):
    """The config is validated where `clpipe submit` runs: exit 2, no job server asked."""
    address = f"http://127.0.0.1:{procs.free_port()}"
    assert main(["submit", str(tmp_path / "missing.yaml"), "--address", address]) == 2
    err = capsys.readouterr().err
    assert "config file not found" in err and "no Ray job server" not in err
    assert main(["submit", "--set", "pretrain.epochs=0", "--address", address]) == 2
    assert "pretrain.epochs" in capsys.readouterr().err
