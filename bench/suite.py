"""How long ``make test`` and ``make test-fast`` take, as CI runs them.

Clones the repository's committed HEAD into a temporary directory, installs its
virtualenv there once (``make install``, timed on its own), then runs ``make test``
(with ``.ci/run``'s arguments) and ``make test-fast`` several times each in that clone,
one after the other. Every run gets a fresh, empty TorchInductor cache, as on a new CI
machine. Recorded per run: wall seconds, exit code, pytest's summary line, the machine's
CPU use during the run (busy share of all cores and busy CPU-seconds, steal) from ``/proc/stat``, a fixed
pure-Python loop timed just before the run (the machine's speed at that moment: shared
machines vary), and the slowest tests.

    .venv/bin/python bench/suite.py                  # 3 x make test, 3 x make test-fast
    .venv/bin/python bench/suite.py --test-runs 1 --fast-runs 1 --out /tmp/suite.json

Writes ``bench/results/test_suite.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CI_ARGS = "-q --durations=20"  # as .ci/run calls make test
SUMMARY = re.compile(r"^=*\s*(\d+ (passed|failed).*) in [\d.]+s")


def cpu_times() -> tuple[int, int, int]:
    """(busy, total, steal) jiffies over all cores."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = f[3] + f[4]
    return sum(f) - idle, sum(f), f[7]


def speed_probe() -> float:
    t = time.perf_counter()
    sum(i * i for i in range(10**7))
    return round(time.perf_counter() - t, 3)


def run(cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    probe = speed_probe()
    b0, t0, s0 = cpu_times()
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    b1, t1, s1 = cpu_times()
    text = log.read_text(errors="replace")
    summary = next((m.group(1) for ln in reversed(text.splitlines()) if (m := SUMMARY.match(ln.strip()))), None)
    slowest = (
        [
            ln.strip()
            for ln in text.split("slowest 20 durations", 1)[-1].splitlines()[1:21]
            if re.match(r"^\d+\.\d+s ", ln.strip())
        ]
        if "slowest 20 durations" in text
        else []
    )
    return {
        "seconds": round(wall, 1),
        "rc": rc,
        "summary": summary,
        "cpu_busy_share": round((b1 - b0) / (t1 - t0), 3),
        "busy_cpu_seconds": round((b1 - b0) / os.sysconf("SC_CLK_TCK"), 1),
        "steal_share": round((s1 - s0) / (t1 - t0), 4),
        "speed_probe_s": probe,
        "slowest": slowest,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--test-runs", type=int, default=3)
    ap.add_argument("--fast-runs", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "test_suite.json"))
    a = ap.parse_args()

    commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    # not under /tmp: the two-host test gives each host a private /tmp, where this clone's venv would vanish
    work = Path(tempfile.mkdtemp(prefix="clpipe-suite-", dir="/var/tmp"))
    clone = work / "clone"
    subprocess.check_call(["git", "clone", "-q", str(ROOT), str(clone)])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTEST_"))}
    env["PYTHONUNBUFFERED"] = "1"
    t = time.perf_counter()
    subprocess.check_call(["make", "install"], cwd=clone, env=env, stdout=subprocess.DEVNULL)
    install_s = round(time.perf_counter() - t, 1)
    print(f"clone of {commit[:12]} in {clone}; make install {install_s} s", flush=True)

    out: dict = {
        "commit": commit,
        "machine": {
            "cpu_cores": os.cpu_count(),
            "cpu_cores_usable": len(os.sched_getaffinity(0)),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "install_seconds": install_s,
        "make_test": [],
        "make_test_fast": [],
    }
    jobs = [
        ("make_test", ["make", "test", f"PYTEST_ARGS={CI_ARGS}"], a.test_runs),
        ("make_test_fast", ["make", "test-fast", "PYTEST_ARGS=-q"], a.fast_runs),
    ]
    try:
        for key, cmd, n in jobs:
            for i in range(n):
                cache = work / f"inductor-{key}-{i}"  # a new machine's empty compile cache
                r = run(cmd, clone, {**env, "TORCHINDUCTOR_CACHE_DIR": str(cache)}, work / f"{key}-{i}.log")
                out[key].append(r)
                print(
                    f"{key} #{i + 1}: {r['seconds']} s rc={r['rc']} {r['summary']} "
                    f"(cpu busy {r['cpu_busy_share']:.0%}, probe {r['speed_probe_s']} s)",
                    flush=True,
                )
                Path(a.out).write_text(json.dumps(out, indent=2))
    finally:
        Path(a.out).write_text(json.dumps(out, indent=2))
        failed = any(r["rc"] for k in ("make_test", "make_test_fast") for r in out[k])
        if failed:
            print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| command | runs (s) | all passed |\n|---|---|---|")
    for key, label in (("make_test", "make test"), ("make_test_fast", "make test-fast")):
        rs = out[key]
        print(f"| `{label}` | {', '.join(str(r['seconds']) for r in rs)} | {all(r['rc'] == 0 for r in rs)} |")
    return 0 if not any(r["rc"] for k in ("make_test", "make_test_fast") for r in out[k]) else 1


if __name__ == "__main__":
    sys.exit(main())
