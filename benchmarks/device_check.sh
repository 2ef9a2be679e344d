#!/usr/bin/env bash
# One-GPU check of the training step (bf16, each variant), fbank_on_device (parity, cost), teacher extraction and the upstream
# forward; under 8 minutes on one H200. Writes outputs/device_check.json (or $1). Not run by CI.
#   benchmarks/device_check.sh [OUT.json] [extra arguments of python -m benchmarks.device_check]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/device_check.json}
shift || true
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 470 "$python" -m benchmarks.device_check --out "$out" "$@"
