#!/bin/bash
# The batch-job measurement of README "Batch jobs", as run on 2026-12-04 (D=/tmp/bt/meas, s100 = the first 100 of
# `pocketvlm scenes $D/../scenes/s500 --count 500 --seed 2`, images copied into $D/s100), under `nice -n 10`.
# Then: threads.py 1 and threads.py 2 (CPU s/image), and the local `--threads 1` run:
#   pocketvlm batch ask $D/s100 --prompt "How many shapes are there?" --max-tokens 8 -o $D/local1.jsonl --no-progress --threads 1
cd /work/wt-batch
export PYTHONPATH=$PWD
PY=/work/main/.venv/bin/python
D=/tmp/bt/meas
rm -f $D/local.jsonl* $D/ray.jsonl*
echo "start $(date -u +%T)"
/usr/bin/time -f "local wall %e s" $PY -m pocketvlm batch ask $D/s100 --prompt "How many shapes are there?" --max-tokens 8 -o $D/local.jsonl --no-progress
echo "mid $(date -u +%T)"
/usr/bin/time -f "ray wall %e s" $PY -m pocketvlm batch ask $D/s100 --prompt "How many shapes are there?" --max-tokens 8 -o $D/ray.jsonl --no-progress --ray --actors 2 --cpus-per-actor 1
echo "end $(date -u +%T)"
$PY - <<'PY'
import json
a = {r["id"]: r.get("answer") for r in map(json.loads, open("/tmp/bt/meas/local.jsonl"))}
b = {r["id"]: r.get("answer") for r in map(json.loads, open("/tmp/bt/meas/ray.jsonl"))}
same = sum(a[k] == b.get(k) for k in a)
print(f"rows local {len(a)} ray {len(b)}; identical answers {same}/{len(a)}")
rows = [json.loads(l) for l in open("/tmp/bt/meas/local.jsonl")]
import statistics as st
for k in ("image_ms", "encode_ms", "generate_ms", "total_ms"):
    print(k, "median", st.median(r[k] for r in rows), "mean", round(st.mean(r[k] for r in rows), 1))
PY
