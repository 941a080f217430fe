#!/usr/bin/env bash
# Locate-then-edit comparison on SmolLM2-135M: CoachHooK, sequential MEMIT, AlphaEdit (consecutive
# batches, all edits so far evaluated every EVERY batches) and MEMIT-MASS (all edits in one batch).
# Usage: benchmarks/locate_runs.sh OUT_DIR EDITS BATCH EVERY DATA [extra lemoe-run args, e.g. --opt v_steps=10]
# METHODS (environment) picks and orders the runs, default "coachhook memit alphaedit memit-mass";
# two shells with disjoint METHODS use both cores of a 2-core machine (each run is single-threaded
# when OMP_NUM_THREADS=1).
# The issue's protocol is `benchmarks/locate_runs.sh OUT 600 30 5 zsre:../shared/data/zsre/zsre_dev.json`.
set -euo pipefail
OUT=${1:-/tmp/locate_results}
EDITS=${2:-600}
BATCH=${3:-30}
EVERY=${4:-5}
DATA=${5:-zsre:../shared/data/zsre/zsre_dev.json}
shift $(( $# < 5 ? $# : 5 ))
EXTRA=("$@")
NAME=$(echo "$DATA" | cut -d: -f1)
mkdir -p "$OUT"
# LEMOE (environment) overrides the command, e.g. LEMOE="python3 -m lemoe" where no venv exists.
read -r -a LEMOE <<< "${LEMOE:-$(dirname "$0")/../.venv/bin/lemoe}"
for METHOD in ${METHODS:-coachhook memit alphaedit memit-mass}; do
  if [ "$METHOD" = memit-mass ]; then  # every edit in one batch on the unedited model
    nice -n 5 "${LEMOE[@]}" run --model smollm2-135m --method memit --data "$DATA" --edits "$EDITS" \
      --edits-per-step "$EDITS" --eval final --out "$OUT/$NAME-memit-mass-$EDITS.json" "${EXTRA[@]}"
  else
    nice -n 5 "${LEMOE[@]}" run --model smollm2-135m --method "$METHOD" --data "$DATA" --edits "$EDITS" \
      --edits-per-step "$BATCH" --eval "every:$EVERY" --out "$OUT/$NAME-$METHOD-$EDITS-b$BATCH.json" "${EXTRA[@]}"
  fi
done
