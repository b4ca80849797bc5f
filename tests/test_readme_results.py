"""The results and tables of README.md, bench/README.md and docs/methods.md are generated
from bench/results/*.json and the code by bench/readme_tables.py: each page as committed
equals what the script renders (no hand-edited figure)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_generated_blocks_are_what_the_recorded_runs_and_the_code_render():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "bench" / "readme_tables.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.stale() == [], "run .venv/bin/python bench/readme_tables.py"
