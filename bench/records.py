"""Reading the bench records (``bench/results/*.json``): what the benches that write them
and ``readme_tables.py`` that renders them both need. Standard library only."""

from __future__ import annotations


def run_of(stage: dict) -> str | None:
    """The MLflow run that computed a stage of a record: for a cache hit the run it reused
    (``computed_in_run``), else its own (``run_id``)."""
    return stage.get("computed_in_run") or stage.get("run_id")
