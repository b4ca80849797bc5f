#!/usr/bin/env bash
# The prepared GPU run: one script for a machine with one CUDA GPU and PyTorch/torchvision
# but none of Ray, MLflow or pydantic. Results go to $OUT (default bench/results/gpu).
#
#   bash bench/gpu.sh            # on the GPU machine, from the repository root
#   bash bench/gpu.sh --smoke    # the same steps, tiny, on the CPU (tests/test_gpu_script.py)
#
# webdataset (pure Python) comes from bench/.wheels when the machine cannot reach PyPI:
#   .venv/bin/pip download --no-deps -d bench/.wheels webdataset braceexpand
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
SMOKE=()
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=(--smoke); fi
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
if ! "$PY" -c "import webdataset" 2>/dev/null; then
  SITE="$(mktemp -d)"
  "$PY" -m pip install -q --no-deps --no-index --target "$SITE" bench/.wheels/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'PY'
import torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__,
      "cuda", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, flush=True)
PY
# 1. the step alone and the colour augmentation, project side (no peer library needed)
"$PY" bench/augment.py --out "$OUT/augment.json" ${SMOKE:+--configs 32px --reps 1} 2>&1 | tail -20 || echo "augment.py failed"
# 2. SimCLR at 224 px from JPEG shards: views in the loader, colour on the device, decode on the device
"$PY" bench/gpu_train.py "${SMOKE[@]}" --out "$OUT/gpu_train.json"
echo "results in $OUT"
