#!/usr/bin/env bash
# One command for the side-by-side table in the README: set up (.venv with the test extras), build llama.cpp
# from the llama-cpp-python sdist (outside the repo, idempotent), then run benchmarks/compare.py, which writes
# benchmarks/results/compare-DATE-TIME.md and .json. Arguments go to compare.py (e.g. --skip vision).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh serve,default-model,test
bash benchmarks/build_llamacpp.sh
exec .venv/bin/python benchmarks/compare.py --threads "${THREADS:-2}" --prompt-tokens 512 --gen-tokens 64 --repeat 3 "$@"
