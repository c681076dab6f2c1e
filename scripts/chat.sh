#!/usr/bin/env bash
# Set everything up, then chat with the embedded default model (or pass a model and flags).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh serve,default-model
# No arguments: the embedded default model, keeping its GGUF blocks quantized (the file's own quality, decoded
# by the fused CPU step: ~4x the fp32 speed; see README "Measured results").
if [[ $# -eq 0 ]]; then
    set -- --quantization gguf
fi
exec .venv/bin/pocketvlm chat "$@"
