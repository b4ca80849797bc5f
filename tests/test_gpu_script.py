"""The prepared GPU run (``bench/gpu.sh``) works where no GPU is: its ``--smoke`` mode runs
every step tiny on the CPU and writes the JSON a GPU run writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "bench/gpu.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_train.json").read_text())
    assert set(res["ways"]) == {"loader", "colour_on_device", "decode_on_device"}
    for way in res["ways"].values():
        assert way["steps"] >= 2 and way["images_per_sec_epoch"] > 0 and way["loss"] == way["loss"]  # not NaN
    assert json.loads((tmp_path / "augment.json").read_text())["results"]
