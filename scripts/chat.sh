#!/usr/bin/env bash
# Set everything up, then chat with the embedded default model (or pass a model and flags).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh serve,default-model
exec .venv/bin/pocketvlm chat "$@"
