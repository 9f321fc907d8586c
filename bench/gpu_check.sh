#!/usr/bin/env bash
# The GPU part of issue 13 in one command, for a machine with one CUDA GPU and no network (the device machine,
# whose python3 holds torch but not this project: the checkout runs from PYTHONPATH, nothing is installed):
#   1. profile the GPU (`planner profile --device cuda`; the quick profile if the full one overruns),
#   2. price single-GPU plans of a GPT (gpt3-1.3b) and a Llama-family model (llama-1b below) with `planner predict`
#      on the measured profile (`--device NAME`, the name `planner profile` gave it, which the plans then record),
#   3. run each with torchrun for STEPS steps, appending to one results file,
#   4. `planner validate` the results (table and --json: step time and peak-memory error per plan).
# $OUT gets at most 7 files: log.txt, profile.json, plans.txt, plans.tgz, results.jsonl, validate.txt, validate.json.
# Commit them under docs/measurements/DATE/. One device call runs at most 600 s: the profile is cut at
# PROFILE_TIMEOUT (270 s; then the quick profile, 90 s at most) and no run starts after DEADLINE (500 s) from the
# start; the 6 runs take about 4 min (0.6-0.9 s a step on an H200 by the datasheet, plus start-up). Exit status 1
# if anything failed. PHASE=profile, then PHASE=runs PROFILE=path/to/profile.json (what the first call brought
# back, carried in an ignored folder) splits it into two calls.
#
#   bench/gpu_check.sh                          # on the GPU machine: writes to $OUT (the device tool's)
#   DEVICE=cpu OUT=/tmp/cpu PY=.venv/bin/python bench/gpu_check.sh   # the same steps here on the tiny models
#   .venv/bin/planner validate results.jsonl    # here, on what came back (with its profile.json copied to
#                                               # profiles/devices/NAME.measured.json): the same table
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/meshplan-gpu-check}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
STEPS=${STEPS:-8}
PHASE=${PHASE:-all}
PROFILE=${PROFILE:-}
PROFILE_TIMEOUT=${PROFILE_TIMEOUT:-270}
DEADLINE=${DEADLINE:-500}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1
TEE=$!
WORK=$(mktemp -d)  # the plans, outside $OUT until they are one tar file
failed=0
finish() {
  [ -d "$WORK/plans" ] && tar -C "$WORK" -czf "$OUT/plans.tgz" plans
  rm -rf "$WORK"
  log "done after ${SECONDS}s, $failed failure(s): $(ls "$OUT" | tr '\n' ' ')"
  exec >&- 2>&-
  wait "$TEE"
}
trap finish EXIT
log() { echo "[$(date +%T)] $*"; }
planner() { timeout -k 15 120 "$PY" -m planner.cli "$@"; }

if [ "$DEVICE" = cuda ]; then
  CLUSTER=(--cluster dgx-h200-141gb --nodes 1 --gpus-per-node 1); GPT=gpt3-1.3b; LLAMA=$WORK/plans/llama-1b.yaml; BATCH=16
  VARIANTS=("4 none" "8 selective" "16 full")
else
  CLUSTER=(--cluster local-cpu --nodes 1 --gpus-per-node 1); GPT=gpt-tiny; LLAMA=llama-tiny; BATCH=8
  VARIANTS=("4 none" "8 full")
fi
log "$("$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")')"
name=$("$PY" -c "from runtime.profile import device_name; print(device_name('$DEVICE'))") || exit 1
measured=profiles/devices/$name.measured.json

log "1. profile ($DEVICE, named $name)"
if [ -n "$PROFILE" ]; then
  cp "$PROFILE" "$measured" && log "the profile given: $PROFILE" || exit 1
elif [ "$DEVICE" = cpu ] && [ -f "$measured" ]; then
  log "the dry run keeps this machine's cached profile (make run's): it checks the script, not the CPU"
elif ! timeout -k 15 "$PROFILE_TIMEOUT" "$PY" -m planner.cli profile --device "$DEVICE"; then
  log "the full profile failed or ran past ${PROFILE_TIMEOUT}s: the quick one"
  timeout -k 15 90 "$PY" -m planner.cli profile --device "$DEVICE" --quick || { log "no profile: stopping"; failed=1; exit 1; }
fi
cp "$measured" "$OUT/profile.json" || { log "no profile at $measured: stopping"; failed=1; exit 1; }
[ "$PHASE" = profile ] && exit 0

log "2. plans (${#VARIANTS[@]} micro-batch and recompute settings of each model, global batch $BATCH)"
mkdir -p "$WORK/plans"
# A Llama-family model of GPT-3 1.3B's size (GQA, SwiGLU, RMSNorm, RoPE, no biases): no preset is that small.
printf '%s\n' "name: llama-1b" "layers: 16" "hidden: 2048" "heads: 32" "kv_heads: 8" "ffn_hidden: 8192" "seq_len: 2048" \
  "vocab: 32000" "mlp: swiglu" "norm: rmsnorm" "position: rope" "bias: false" > "$WORK/plans/llama-1b.yaml"
plans=()
for model in "$GPT" "$LLAMA"; do
  for v in "${VARIANTS[@]}"; do
    set -- $v
    file="$WORK/plans/$(basename "$model" .yaml)-mbs$1-$2.json"
    if planner predict --model "$model" "${CLUSTER[@]}" --device "$name" --global-batch "$BATCH" --tp 1 --pp 1 --dp 1 \
        --micro-batch "$1" --recompute "$2" --out "$file" >> "$OUT/plans.txt"; then
      plans+=("$file")
    else
      log "not priced: $model micro-batch $1 recompute $2 (see plans.txt)"; failed=$((failed + 1))
    fi
  done
done

log "3. runs ($STEPS steps each)"
for plan in "${plans[@]}"; do
  if [ "$SECONDS" -gt "$DEADLINE" ]; then
    log "past ${DEADLINE}s: $plan and the rest not run"; failed=$((failed + 1)); break
  fi
  log "run $plan"
  timeout -k 15 120 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m runtime.launch "$plan" \
    --steps "$STEPS" --warmup 2 --results "$OUT/results.jsonl" < /dev/null || { log "run failed: $plan"; failed=$((failed + 1)); }
done

log "4. validate"
planner validate "$OUT/results.jsonl" > "$OUT/validate.txt" || failed=$((failed + 1))
cat "$OUT/validate.txt"
planner validate "$OUT/results.jsonl" --json > "$OUT/validate.json" || failed=$((failed + 1))
[ "$failed" -eq 0 ]
