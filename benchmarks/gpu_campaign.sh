#!/usr/bin/env bash
# Every long run left open by issues 4-6, launched at once as independent processes sharing one GPU
# (each is single-threaded on the CPU side; SmolLM2-135M leaves an H100 mostly idle per process, so
# ~20 of them share it well). Each job writes its own JSON and log under OUT; nothing is shared
# between jobs except the statistics cache, which `prepare` fills once before they start.
#
# Usage (from the repository root): benchmarks/gpu_campaign.sh DATA_DIR OUT_DIR [PYTHON]
#   DATA_DIR holds zsre/zsre_dev.json, counterfact/counterfact_{val,train}.json, knowns/known_1000.json
#   (the layout of ../shared/data). Set LEMOE_CACHE to where model and statistics are cached.
#   JOBS (environment) restricts to the named jobs; TRAIN_SECONDS bounds each meta-training run.
set -euo pipefail
DATA=$1
OUT=$2
PY=${3:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT/logs"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
CF="counterfact:$DATA/counterfact/counterfact_val.json"
ZS="zsre:$DATA/zsre/zsre_dev.json"
RUN="$PY -m lemoe run --device $DEVICE --quiet"
OEDIT="$PY benchmarks/oedit_compare.py --data-dir $DATA --device $DEVICE"

# Fill the statistics caches once (MEMIT/AlphaEdit/CoachHooK layers 4-8, O-Edit's B_k at layer 17).
$PY - "$DEVICE" <<'EOF'
import sys, time
from lemoe.methods import build_method
from lemoe.models import load_model
t0 = time.perf_counter()
model, tok = load_model("smollm2-135m", device=sys.argv[1])
for name in ("memit", "alphaedit", "coachhook"):
    build_method(name, model, tok, {}).prepare()
build_method("oedit-plus", model, tok, {}).ensure_knowledge()
print(f"statistics ready in {time.perf_counter() - t0:.0f} s", flush=True)
EOF

launch() {  # NAME COMMAND: a detached job (it outlives the shell that started it)
  local name=$1
  shift
  if [ -n "${JOBS:-}" ] && [[ " $JOBS " != *" $name "* ]]; then return; fi
  setsid nohup bash -c "$*" >"$OUT/logs/$name.log" 2>&1 </dev/null &
  echo "started $name"
}

# Issue 5: O-Edit / O-Edit+ beside FT-M and sequential MEMIT at large T (final evaluation).
for m in oedit-plus oedit ft-m memit; do
  launch "oedit-cf1500-$m" "$OEDIT --methods $m --datasets counterfact --edits 1500 --out $OUT/oedit_t1500_$m.json"
  launch "oedit-zsre498-$m" "$OEDIT --methods $m --datasets zsre --edits 498 --out $OUT/oedit_t498_$m.json"
done
launch oedit-cf500-memit "$OEDIT --methods memit --datasets counterfact --edits 500 --out $OUT/oedit_t500_memit.json"
launch oedit-cf1500-q512 "$OEDIT --methods oedit-plus --datasets counterfact --edits 1500 \
  --opt oedit-plus:knowledge_rank=512 --label ' q=512' --out $OUT/oedit_t1500_sweep_q512.json"
for e in 0.8 0.97; do
  launch "oedit-cf1500-e$e" "$OEDIT --methods oedit-plus --datasets counterfact --edits 1500 \
    --opt oedit-plus:edit_energy=$e --label ' energy=$e' --out $OUT/oedit_t1500_sweep_e$e.json"
done

# Issue 6: longer meta-training of both editors (same budget), then the exact-match scaling curve;
# MEMIT-MASS at N = 1,024 on the same CounterFact val records.
for m in malmen mend-sum; do
  launch "train-$m" "timeout ${TRAIN_SECONDS:-660} $PY -m lemoe train-editor --method $m --device $DEVICE \
    --out $OUT/editors/$m --counterfact $DATA/counterfact/counterfact_train.json --zsre $DATA/zsre/zsre_dev.json \
    --zsre-range 300:500 --edits-per-step 16 --val-size 32 --steps 600 --val-every 50 --opt loc_coef=10; \
    $PY benchmarks/malmen_scaling.py --device $DEVICE --editor $OUT/editors/$m/best --methods $m \
    --data $DATA/counterfact/counterfact_val.json --out $OUT/malmen_scaling_$m.json"
done
launch memit-mass-1024 "$RUN --method memit --data $CF --edits 1024 --edits-per-step 1024 --eval final --no-pre \
  --out $OUT/malmen_memit_mass1024.json"

# Issue 4: the AlphaEdit protocol (1,000 CounterFact edits in batches of 100) for the two methods not
# yet run, and the CoachHooK / MEMIT ablations on the ZsRE stream.
for m in alphaedit memit-mass; do
  launch "locate-cf1000-$m" "METHODS=$m LEMOE='$PY -m lemoe' benchmarks/locate_runs.sh $OUT/locate_cf1000 \
    1000 100 10 $CF --no-pre --device $DEVICE --quiet"
done
launch coachhook-zsre480-noscope "METHODS=coachhook LEMOE='$PY -m lemoe' benchmarks/locate_runs.sh \
  $OUT/abl_noscope 480 30 5 $ZS --no-pre --device $DEVICE --quiet --opt scope_rule=false"
launch coachhook-zsre480-relative "METHODS=coachhook LEMOE='$PY -m lemoe' benchmarks/locate_runs.sh \
  $OUT/abl_relative 480 30 5 $ZS --no-pre --device $DEVICE --quiet --opt scope_score=relative --opt alpha_quantile=0.1"
launch memit-zsre150-lambda "METHODS=memit LEMOE='$PY -m lemoe' benchmarks/locate_runs.sh \
  $OUT/abl_lambda 150 30 5 $ZS --no-pre --device $DEVICE --quiet --opt mom2_weight=15000"
# Issue 4, the key-aware scope rule with prompt keys: quantile 0.5 (measured on the AlphaEdit
# protocol in session 8) over the two 30-batch streams, where quantile 0.3 was measured.
KEYQ05="--opt scope_score=key --opt alpha_quantile=0.5 --opt scope_prompt_keys=true"
launch coachhook-cf600-keyq05pk "METHODS=coachhook LEMOE='$PY -m lemoe' benchmarks/locate_runs.sh \
  $OUT/key_cf600_q05pk 600 30 5 $CF --no-pre --device $DEVICE --quiet $KEYQ05"
launch coachhook-zsre480-keyq05pk "METHODS=coachhook LEMOE='$PY -m lemoe' benchmarks/locate_runs.sh \
  $OUT/key_zsre480_q05pk 480 30 5 $ZS --no-pre --device $DEVICE --quiet $KEYQ05"
launch coachhook-cf600-keyq01pk "METHODS=coachhook LEMOE='$PY -m lemoe' benchmarks/locate_runs.sh \
  $OUT/key_cf600_q01pk 600 30 5 $CF --no-pre --device $DEVICE --quiet --opt scope_score=key \
  --opt alpha_quantile=0.1 --opt scope_prompt_keys=true"

# Issue 6, the next MALMEN lever: locality weight and meta learning rate, validated on 128 edits.
for spec in "loc30:--opt loc_coef=30" "loc100:--opt loc_coef=100" "lr3e-5:--opt loc_coef=10 --opt meta_lr=3e-5"; do
  name=${spec%%:*}
  launch "train-malmen-$name" "timeout ${TRAIN_SECONDS:-660} $PY -m lemoe train-editor --method malmen --device $DEVICE \
    --out $OUT/editors/malmen-$name --counterfact $DATA/counterfact/counterfact_train.json --zsre $DATA/zsre/zsre_dev.json \
    --zsre-range 300:500 --edits-per-step 16 --val-size 128 --steps 600 --val-every 50 ${spec#*:}; \
    $PY benchmarks/malmen_scaling.py --device $DEVICE --editor $OUT/editors/malmen-$name/best --methods malmen \
    --data $DATA/counterfact/counterfact_val.json --out $OUT/malmen_scaling_malmen_$name.json"
done
