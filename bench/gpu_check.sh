#!/usr/bin/env bash
# The GPU part of issue 13 in one command, for a machine with one CUDA GPU and no network (the device machine,
# whose python3 holds torch but not this project: the checkout runs from PYTHONPATH, nothing is installed):
#   1. profile the GPU (`planner profile --device cuda`; the quick profile if the full one overruns),
#   2. price single-GPU plans of a GPT (gpt3-1.3b) and a Llama-family model (LLAMA below) with `planner predict`,
#   3. run each with torchrun for STEPS steps, appending to one results file,
#   4. `planner validate` the results (table and --json: step time and peak-memory error per plan).
# Everything lands in $OUT (at most 8 files): log.txt, profile.json, plans.txt, results.jsonl, validate.txt,
# validate.json. Commit them under docs/measurements/DATE/. One device call runs at most 600 s, so the profile is
# cut at PROFILE_TIMEOUT (270 s; then the quick profile, 90 s at most) and the 6 runs take about 4 min (each
# ~0.6-0.9 s a step on an H200 by the datasheet, plus start-up); PHASE=profile, then PHASE=runs on the still-warm
# machine (the profile stays in profiles/devices/), splits it in two calls.
#
#   OUT=$OUT bench/gpu_check.sh                 # on the GPU machine (the device tool's $OUT comes back)
#   DEVICE=cpu OUT=/tmp/cpu bench/gpu_check.sh  # the same steps on this CPU machine (tiny models), to check the script
#   .venv/bin/planner validate results.jsonl    # here, on what came back: the same table
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/meshplan-gpu-check}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
STEPS=${STEPS:-8}
PHASE=${PHASE:-all}
PROFILE_TIMEOUT=${PROFILE_TIMEOUT:-270}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee -a "$OUT/log.txt") 2>&1
log() { echo "[$(date +%T)] $*"; }
planner() { "$PY" -m planner.cli "$@"; }

# A Llama-family model of GPT-3 1.3B's size (GQA, SwiGLU, RMSNorm, RoPE, no biases): no preset is that small.
LLAMA="$OUT/plans/llama-1b.yaml"
write_llama() {
  printf '%s\n' "name: llama-1b" "layers: 16" "hidden: 2048" "heads: 32" "kv_heads: 8" "ffn_hidden: 8192" "seq_len: 2048" \
    "vocab: 32000" "mlp: swiglu" "norm: rmsnorm" "position: rope" "bias: false" > "$LLAMA"
}
if [ "$DEVICE" = cuda ]; then
  CLUSTER=(--cluster dgx-h200-141gb --nodes 1 --gpus-per-node 1); GPT=gpt3-1.3b; BATCH=16
  VARIANTS=("4 none" "8 selective" "16 full")
else
  CLUSTER=(--cluster local-cpu --nodes 1 --gpus-per-node 1); GPT=gpt-tiny; LLAMA=llama-tiny; BATCH=8
  VARIANTS=("4 none" "8 full")
fi
log "$("$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")')"

log "1. profile ($DEVICE)"
if [ "$PHASE" = runs ]; then
  log "PHASE=runs: the profile an earlier PHASE=profile left in profiles/devices/"
elif [ "$DEVICE" = cpu ] && [ -f profiles/devices/cpu.measured.json ]; then
  log "the dry run keeps this machine's cached profile (make run's): it checks the script, not the CPU"
elif ! timeout "$PROFILE_TIMEOUT" "$PY" -m planner.cli profile --device "$DEVICE"; then
  log "the full profile failed or ran past ${PROFILE_TIMEOUT}s: the quick one"
  timeout 90 "$PY" -m planner.cli profile --device "$DEVICE" --quick || { log "no profile: stopping"; exit 1; }
fi
name=$("$PY" -c "import torch; from runtime.profile import device_name; print(device_name('$DEVICE'))")
cp "profiles/devices/$name.measured.json" "$OUT/profile.json" || { log "no profile of $name: stopping"; exit 1; }
[ "$PHASE" = profile ] && { log "PHASE=profile: done"; exit 0; }
mkdir -p "$OUT/plans"
[ "$DEVICE" = cuda ] && write_llama

log "2. plans (${#VARIANTS[@]} micro-batch and recompute settings of each model, global batch $BATCH)"
: > "$OUT/plans.txt"
for model in "$GPT" "$LLAMA"; do
  for v in "${VARIANTS[@]}"; do
    set -- $v
    file="$OUT/plans/$(basename "$model" .yaml)-mbs$1-$2.json"
    if planner predict --model "$model" "${CLUSTER[@]}" --global-batch "$BATCH" --tp 1 --pp 1 --dp 1 \
        --micro-batch "$1" --recompute "$2" --out "$file" >> "$OUT/plans.txt"; then
      echo "$file" >> "$OUT/plans/list"
    else
      log "not priced: $model micro-batch $1 recompute $2 (see plans.txt)"
    fi
  done
done

log "3. runs ($STEPS steps each)"
while read -r plan; do
  log "run $plan"
  timeout 120 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m runtime.launch "$plan" \
    --steps "$STEPS" --warmup 2 --results "$OUT/results.jsonl" || log "run failed: $plan"
done < "$OUT/plans/list"

log "4. validate"
planner validate "$OUT/results.jsonl" | tee "$OUT/validate.txt"
planner validate "$OUT/results.jsonl" --json > "$OUT/validate.json"
tar -C "$OUT" -czf "$OUT/plans.tgz" plans && rm -rf "$OUT/plans"
log "done: $(ls "$OUT" | tr '\n' ' ')"
