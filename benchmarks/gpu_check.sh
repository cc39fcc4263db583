#!/usr/bin/env bash
# One command for a lent GPU (benchmarks/gpu_check.py's docstring says what it runs and prints):
#   bash benchmarks/gpu_check.sh [--out FILE]        # CUDA: under 8 minutes on one H100/H200
#   bash benchmarks/gpu_check.sh --cpu-smoke         # the same code paths on a CPU, tiny
#   ... --data-only                                  # the stand-in and the data half alone
# It runs with the project's .venv where there is one, else with the machine's python3 (a GPU
# box with torch, torchvision, timm and Lightning installed); wheels of what that python lacks
# (lightning-fabric, say) may lie in .whl/ and are installed into /tmp/site first, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x .venv/bin/python ]; then
  py=.venv/bin/python
else
  py=python3
fi
if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec "$py" benchmarks/gpu_check.py "$@"
