#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtual environment in .venv with pocketvlm and its extras.
# Picks the CPU build of torch (the wheel this machine keeps on disk); override with POCKETVLM_TORCH_SPEC.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-serve,default-model}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=".venv/.pocketvlm-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${EXTRAS//,/_}"
if [ -f "$stamp" ]; then
    exit 0
fi
$VPY -m pip install -q --upgrade pip
if ! $VPY -c "import torch" 2>/dev/null; then
    $VPY -m pip install -q "${POCKETVLM_TORCH_SPEC:-torch==2.13.0}"
fi
$VPY -m pip install -q -e ".[${EXTRAS}]"
touch "$stamp"
