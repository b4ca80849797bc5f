"""Every ``clpipe`` command printed in README.md and docs/*.md works as printed.

The commands are taken from the documents' code blocks (continuation lines joined,
``;``-separated commands split, comments dropped). Each one must parse with the real
command line; every ``run``, ``sweep``, ``config`` and ``submit`` command must also pass
the config validation that ``clpipe`` runs before anything starts, with the YAML files
the documents define (``# name.yaml`` blocks) and the stage names it gives. The cheap ones
run: ``clpipe methods``, ``clpipe config``, the Python one-liners that make their
inputs, and every ``$ clpipe ...`` block whose printed output must be exactly what the
command prints. The ``make`` targets and bench scripts named must exist.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import _config, build_parser, main
from pipelines.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
COMMAND = re.compile(r"^(\$ )?clpipe(\s|$)")
STAGES = ("shard", "labels", "sweep", "pretrain", "finetune", "distill", "evaluate", "register")


def _blocks(doc: Path) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(doc.read_text())]


def _lines(body: str) -> list[str]:
    """The block's lines with ``\\`` continuations joined."""
    out: list[str] = []
    pending = ""
    for line in body.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def _commands(doc: Path) -> list[list[str]]:
    """Every ``clpipe`` command in the document's shell blocks, as argv after ``clpipe``
    (not the ``$ clpipe ...`` blocks that show a command with its output)."""
    found = []
    for lang, body in _blocks(doc):
        if lang not in ("", "bash", "sh", "console") or body.startswith("$ "):
            continue
        for line in _lines(body):
            for part in line.split(";"):
                part = part.strip()
                if COMMAND.match(part):
                    found.append(shlex.split(part, comments=True)[1:])
    return found


def _yaml_files(tmp: Path) -> None:
    """The documents' ``# name.yaml`` blocks, written under ``tmp``; ``my.yaml`` (the
    documents' stand-in for the reader's own file) as an empty config."""
    (tmp / "my.yaml").write_text("name: my-pipeline\n")
    for doc in DOCS:
        for lang, body in _blocks(doc):
            first = body.splitlines()[0] if body.strip() else ""
            if lang == "yaml" and re.fullmatch(r"# [\w.-]+\.yaml", first.strip()):
                (tmp / first.strip()[2:]).write_text(body)


@pytest.fixture
def docs_dir(tmp_path, monkeypatch, image_folder):
    _yaml_files(tmp_path)
    for p in tmp_path.glob("*.yaml"):  # an image folder that exists, where the documents name /data/images
        p.write_text(p.read_text().replace("/data/images", str(image_folder)))
    monkeypatch.chdir(tmp_path)
    # the inputs the documents' one-liners make (the text corpus of the SimCSE example)
    for doc in DOCS:
        for _, body in _blocks(doc):
            for line in _lines(body):
                if line.startswith('python -c "from cl_core'):
                    code = shlex.split(line, comments=True)[2]
                    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=120)
    return tmp_path


def test_the_documents_print_commands():
    commands = [c for doc in DOCS for c in _commands(doc)]
    assert len(commands) >= 20, commands
    assert ["run", "--set", "pretrain.method=byol", "--until", "pretrain"] in commands
    # every subcommand of the real parser is shown at least once, so none goes undocumented
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) - {c[0] for c in commands if c} == set(), "document these commands"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_clpipe_command_parses_and_its_config_validates(doc, docs_dir):
    parser = build_parser()
    for argv in _commands(doc):
        where = f"{doc.name}: clpipe {shlex.join(argv)}"
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{where}: the command line refuses it (exit {e.code})")
        if args.command is None:
            args = parser.parse_args(["run", *argv])
        if args.command not in ("run", "sweep", "config", "submit"):
            continue
        for flag in ("until", "rerun", "only"):
            stage = getattr(args, flag, None)
            assert stage is None or stage in STAGES, f"{where}: --{flag} {stage}: not a stage"
        if args.command == "sweep":
            args.overrides = [*args.overrides, "sweep.enabled=true"]
        try:
            _config(args)
        except Exception as e:  # noqa: BLE001 - the message is the finding
            pytest.fail(f"{where}: {type(e).__name__}: {e}")


def test_every_method_validates_with_the_default_config_and_sweeps_its_own_space():
    """``--set pretrain.method=NAME`` alone gives a valid config for every image method:
    the default sweep space is the method's own (README: "another method")."""
    from cl_core.methods import get_method, known_methods

    for name in known_methods():
        cls = get_method(name)
        if cls.view_kind == "text":
            continue  # it needs a text source: the README's SimCSE example is validated above
        cfg = load_config(None, [f"pretrain.method={name}"])
        assert cls.sweep_space, f"{name}: no default sweep space"
        assert cfg.sweep.space == {k: {"grid": list(v)} for k, v in cls.sweep_space.items()}, name
    # a space the config names replaces the method's; a file's or an override's
    cfg = load_config(None, ["pretrain.method=byol", "sweep.space.lr_base={grid: [0.1, 1.0]}"])
    assert cfg.sweep.space == {"lr_base": {"grid": [0.1, 1.0]}}


def test_the_cheap_commands_run_as_printed(docs_dir, capsys):
    """``clpipe methods`` and ``clpipe config`` run; each ``$ clpipe ...`` block prints
    exactly what follows it in the document."""
    from cl_core.methods import known_methods

    assert main(["methods"]) == 0
    listed = capsys.readouterr().out
    assert all(re.search(rf"^{m}\s", listed, re.M) for m in known_methods()), listed
    ran = 0
    for doc in DOCS:
        for argv in _commands(doc):
            if argv[:1] == ["config"]:
                assert main(argv) == 0, f"{doc.name}: clpipe {shlex.join(argv)}: {capsys.readouterr().err}"
                capsys.readouterr()
                ran += 1
        for _, body in _blocks(doc):
            if not body.startswith("$ clpipe "):
                continue
            first, *printed = body.rstrip("\n").splitlines()
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                main(shlex.split(first[2:], comments=True)[1:])
            got = (out.getvalue() + err.getvalue()).rstrip("\n").splitlines()
            assert got == printed, (
                f"{doc.name}: {first}\nprinted in the document:\n"
                + "\n".join(printed)
                + "\nprinted by clpipe:\n"
                + "\n".join(got)
            )
            ran += 1
    assert ran >= 3


def test_make_targets_and_bench_scripts_named_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+):", makefile, re.M))
    for doc in [*DOCS, ROOT / "bench" / "README.md"]:
        for lang, body in _blocks(doc):
            if lang not in ("", "bash", "sh"):
                continue
            for line in _lines(body):
                if not re.match(r"(make|(\.venv/bin/)?python3?) ", line):
                    continue  # prose, trees and output in plain blocks
                words = shlex.split(line, comments=True)
                if words[:1] == ["make"] and len(words) > 1 and "=" not in words[1]:
                    assert words[1] in targets, f"{doc.name}: make {words[1]}: no such target"
                for w in words:
                    if w.startswith("bench/") and w.endswith((".py", ".sh")):
                        assert (ROOT / w).is_file(), f"{doc.name}: {w} does not exist"
