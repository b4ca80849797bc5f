"""Every row of docs/config_errors.md, run through the command line: the arguments fail
validation with exit status 2, a header and exactly the documented problem line."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import main

ROOT = Path(__file__).parents[2]
DOC = ROOT / "docs" / "config_errors.md"
HEADER = "clpipe: config error:"
# | `ARGS` | `YAML` or nothing | `ERROR LINE` |
ROW = re.compile(r"^\| `(?P<args>[^`]+)` \| (?:`(?P<yaml>[^`]+)`)? *\| `(?P<error>[^`]+)` \|$")


def _rows() -> list[dict[str, str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        if line.startswith("| `"):
            m = ROW.match(line)
            assert m, f"{DOC.name}: a table row does not parse: {line}"
            rows.append({k: v or "" for k, v in m.groupdict().items()})
    return rows


ROWS = _rows()


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """An empty working directory (plus the text file one row points at), no stack env."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CLPIPE_STACK_ENV", raising=False)
    (tmp_path / "sentences.csv").write_text("")
    return tmp_path


def _check(row: dict[str, str], error_lines: list[str]) -> None:
    assert len(error_lines) == 1, f"expected one problem line, got {error_lines}"
    expected = row["error"]
    if expected.endswith("…"):
        assert error_lines[0].startswith(expected[:-1]), (error_lines[0], expected)
    else:
        assert error_lines[0] == expected


def _cli(command: str, row: dict[str, str], scratch: Path, capsys) -> tuple[int, str, list[str]]:
    if row["yaml"]:
        (scratch / "config.yaml").write_text(row["yaml"] + "\n")
    rc = main([command, *shlex.split(row["args"])])
    out, err = capsys.readouterr()
    header, *lines = err.splitlines() or [""]
    assert header == HEADER, err
    return rc, out, lines


def test_the_table_has_enough_distinct_rows():
    assert len(ROWS) >= 24
    keys = [(r["args"], r["yaml"]) for r in ROWS]
    assert len(set(keys)) == len(keys), "a row is listed twice"


@pytest.mark.parametrize("row", ROWS, ids=[" ".join(filter(None, (r["args"], r["yaml"]))) for r in ROWS])
def test_documented_error(row, scratch, capsys):
    rc, out, lines = _cli("config", row, scratch, capsys)
    assert rc == 2 and out == ""
    _check(row, lines)


def test_run_prints_the_same_and_so_does_the_module_entry_point(scratch, capsys):
    row = next(r for r in ROWS if r["args"].startswith("--set ") and not r["yaml"])
    rc, _, lines = _cli("config", row, scratch, capsys)
    assert rc == 2  # the row fails validation, so `run` below cannot start anything
    rc, out, lines = _cli("run", row, scratch, capsys)
    assert rc == 2 and out == ""
    _check(row, lines)
    env = {k: v for k, v in os.environ.items() if k != "CLPIPE_STACK_ENV"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
    p = subprocess.run(
        [sys.executable, "-m", "pipelines", "run", *shlex.split(row["args"])],
        cwd=scratch,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and p.stdout == "", p.stderr
    header, *lines = p.stderr.splitlines()
    assert header == HEADER
    _check(row, lines)
