"""The embedded default (digits) as a new user runs it, twice in a row in fresh work
dirs: wall time per stage, the sweep's decisions, the results table, and whether the
two runs agree to the last digit (they must: same config and seed).

Run (about 7 minutes on 2 cores)::

    .venv/bin/python bench/digits_default.py

Writes bench/results/digits_default.json; bench/readme_tables.py puts its table in the
README.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from semi_supervised import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "digits_default.json"


def once() -> dict:
    from pipelines.cli import run
    from pipelines.config import load_config

    with tempfile.TemporaryDirectory(prefix="clpipe-digits-") as work:
        cfg = load_config(None, [f"work_dir={work}"])
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            result = run(cfg)
        seconds = time.perf_counter() - t0
        ev, sw = result.stages["evaluate"].outputs, result.stages["sweep"].outputs
        return {
            "seconds": seconds,
            "stages": {k: round(v.seconds, 1) for k, v in result.stages.items()},
            "rows": ev["rows"],
            "metrics": ev["metrics"],
            "sweep_best": sw["best"],
            "sweep_ranked": [{k: r[k] for k in ("trial", "last", "epochs_run", "stopped_early")} for r in sw["ranked"]],
        }


def main() -> None:
    load = os.getloadavg()[0]  # another job on the machine stretches the wall times
    runs = [once(), once()]
    same = all(runs[0][k] == runs[1][k] for k in ("rows", "metrics", "sweep_best", "sweep_ranked"))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": machine(),
                "date": time.strftime("%Y-%m-%d"),
                "identical": same,
                "load_average_at_start": load,
                "runs": runs,
            },
            indent=2,
        )
    )
    print(json.dumps({"identical": same, "seconds": [r["seconds"] for r in runs], "rows": runs[0]["rows"]}, indent=1))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
