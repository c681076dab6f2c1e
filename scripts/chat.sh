#!/usr/bin/env bash
# Set everything up, then chat with the embedded default model (or pass a model and flags).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh serve,default-model
# No arguments: pocketvlm-scenes, the default VLM (DINOv2 ViT-S/14 + Qwen2.5-Coder-0.5B-Instruct, trained by
# pocketvlm on generated scenes), at q4f16_1. Attach a picture with /image PATH; text chat works too.
# The first start rebuilds it from its real parts and calibrates its 4-bit weights (~10 minutes on 2 cores, once).
if [[ $# -eq 0 ]]; then
    set -- --temperature 0  # greedy: its short answers are its best guesses
fi
exec .venv/bin/pocketvlm chat "$@"
