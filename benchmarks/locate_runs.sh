#!/usr/bin/env bash
# Locate-then-edit comparison on SmolLM2-135M, ZsRE dev (scaled-down consecutive-batch protocol that
# fits a shared 2-core CPU): 120 edits in batches of 30, all edits so far evaluated every 2 batches.
# Usage: benchmarks/locate_runs.sh [OUT_DIR] [EDITS] [BATCH] [EVERY] [DATA]
set -euo pipefail
OUT=${1:-/tmp/locate_results}
EDITS=${2:-120}
BATCH=${3:-30}
EVERY=${4:-2}
DATA=${5:-zsre:/work/shared/data/zsre/zsre_dev.json}
NAME=$(echo "$DATA" | cut -d: -f1)
mkdir -p "$OUT"
LEMOE="$(dirname "$0")/../.venv/bin/lemoe"
for METHOD in coachhook memit alphaedit; do
  nice -n 5 "$LEMOE" run --model smollm2-135m --method "$METHOD" --data "$DATA" --edits "$EDITS" \
    --edits-per-step "$BATCH" --eval "every:$EVERY" --quiet --out "$OUT/$NAME-$METHOD-$EDITS-b$BATCH.json"
done
# MEMIT-MASS: every edit in one batch on the unedited model.
nice -n 5 "$LEMOE" run --model smollm2-135m --method memit --data "$DATA" --edits "$EDITS" \
  --edits-per-step "$EDITS" --eval final --quiet --out "$OUT/$NAME-memit-mass-$EDITS.json"
