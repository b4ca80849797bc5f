"""The README's results are generated from bench/results/*.json by bench/readme_tables.py:
the README as committed equals what the script renders (no hand-edited figure)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_results_blocks_are_what_the_recorded_runs_render():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "bench" / "readme_tables.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = (ROOT / "README.md").read_text()
    assert mod.render(text) == text, "README.md is stale: run .venv/bin/python bench/readme_tables.py"
