#!/usr/bin/env bash
# The GPU part of issue 13 in one command, for a machine with one CUDA GPU and no network (the device machine,
# whose python3 holds torch but not this project: the checkout runs from PYTHONPATH, nothing is installed):
#   1. profile the GPU (`planner profile --device cuda`; if it fails or overruns, the plans are priced from the
#      datasheet instead: the quick profile's small GEMMs and micro-batches would price them worse than that),
#   2. price single-GPU plans of a GPT (gpt3-1.3b) and a Llama-family model (llama-1b below) with `planner predict`
#      on the measured profile (`--device NAME`, the name `planner profile` gave it, which the plans then record),
#   3. run each with torchrun for STEPS steps, appending to one results file,
#   4. `planner validate` the results (table and --json: step time and peak-memory error per plan).
# $OUT gets at most 7 files: log.txt, profile.json, plans.txt, plans.tgz, results.jsonl, validate.txt, validate.json.
# Commit them under docs/measurements/DATE/. One device call runs at most 600 s: the profile is cut at
# PROFILE_TIMEOUT (200 s), no run starts after DEADLINE (380 s) from the start and none runs past 540 s; the 6 runs
# take about 4.5 min (0.6-0.9 s a step on an H200 by the datasheet, plus start-up). Killed at the device tool's
# limit, it leaves plans.tgz (written before the runs) and results.jsonl (a line per finished run), from which
# `planner validate` here gives the rest. Exit status 1 if anything failed. PHASE=profile, then PHASE=runs PROFILE=path/to/profile.json (what the first call brought
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
PROFILE_TIMEOUT=${PROFILE_TIMEOUT:-200}
DEADLINE=${DEADLINE:-380}
LIMIT=${LIMIT:-540}  # no step runs past this many seconds from the start
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
trap 'exit 143' TERM INT  # a TERM to this shell alone: finish, once the step it waits for ends
log() { echo "[$(date +%T)] $*"; }
left() { local n=$((LIMIT - SECONDS)); [ "$n" -gt "$1" ] && echo "$1" || echo $((n > 5 ? n : 5)); }  # a step's cap
planner() { timeout -k 15 "$(left 120)" "$PY" -m planner.cli "$@"; }

mkdir -p "$WORK/plans"
# A Llama-family model of GPT-3 1.3B's size (GQA, SwiGLU, RMSNorm, RoPE, no biases): no preset is that small.
printf '%s\n' "name: llama-1b" "layers: 16" "hidden: 2048" "heads: 32" "kv_heads: 8" "ffn_hidden: 8192" "seq_len: 2048" \
  "vocab: 32000" "mlp: swiglu" "norm: rmsnorm" "position: rope" "bias: false" > "$WORK/plans/llama-1b.yaml"
if [ "$DEVICE" = cuda ]; then
  CLUSTER=(--cluster dgx-h200-141gb --nodes 1 --gpus-per-node 1); GPT=gpt3-1.3b; LLAMA=$WORK/plans/llama-1b.yaml; BATCH=16
  VARIANTS=("4 none" "8 selective" "16 full")
  # The profile times the blocks of both models the plans run (the measured layer times are per block shape).
  PROFILE_MODELS=(--model gpt3-125m --model gpt3-350m --model "$GPT" --model "$LLAMA")
else
  CLUSTER=(--cluster local-cpu --nodes 1 --gpus-per-node 1); GPT=gpt-tiny; LLAMA=llama-tiny; BATCH=8
  VARIANTS=("4 none" "8 full")
  PROFILE_MODELS=()
fi
log "$("$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")')"
# Every module a step imports, first: an API this torch lacks fails here in seconds, not after the profile.
"$PY" -c "import runtime.launch, runtime.profile, planner.cli" || { log "the runtime does not import: stopping"; failed=1; exit 1; }
name=$("$PY" -c "from runtime.profile import device_name; print(device_name('$DEVICE'))") || { failed=1; exit 1; }
measured=profiles/devices/$name.measured.json

log "1. profile ($DEVICE, named $name)"
if [ -n "$PROFILE" ]; then
  cp "$PROFILE" "$measured" && log "the profile given: $PROFILE" || exit 1
elif [ "$DEVICE" = cpu ] && [ -f "$measured" ]; then
  log "the dry run keeps this machine's cached profile (make run's): it checks the script, not the CPU"
elif ! timeout -k 15 "$PROFILE_TIMEOUT" "$PY" -m planner.cli profile --device "$DEVICE" "${PROFILE_MODELS[@]}"; then
  log "the profile failed or ran past ${PROFILE_TIMEOUT}s"; failed=$((failed + 1))
fi
if [ -f "$measured" ]; then
  cp "$measured" "$OUT/profile.json"
elif [ -f "profiles/devices/$name.json" ] && [ "$PHASE" != profile ]; then
  log "no measured profile: the plans are priced from the datasheet profiles/devices/$name.json"
else
  log "no profile at $measured and no datasheet of that name: stopping"; failed=$((failed + 1)); exit 1
fi
[ "$PHASE" = profile ] && exit 0

log "2. plans (${#VARIANTS[@]} micro-batch and recompute settings of each model, global batch $BATCH)"
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
tar -C "$WORK" -czf "$OUT/plans.tgz" plans  # now, in case the runs are cut short

log "3. runs ($STEPS steps each)"
for plan in "${plans[@]}"; do
  if [ "$SECONDS" -gt "$DEADLINE" ]; then
    log "past ${DEADLINE}s: $plan and the rest not run"; failed=$((failed + 1)); break
  fi
  log "run $plan"
  # --local-addr: --standalone otherwise hands the workers this host's FQDN, which an offline machine may not resolve.
  timeout -k 15 "$(left 120)" "$PY" -m torch.distributed.run --standalone --local-addr 127.0.0.1 --nproc-per-node 1 -m runtime.launch "$plan" \
    --steps "$STEPS" --warmup 2 --results "$OUT/results.jsonl" < /dev/null || { log "run failed: $plan"; failed=$((failed + 1)); }
done

log "4. validate"
planner validate "$OUT/results.jsonl" > "$OUT/validate.txt" || failed=$((failed + 1))
cat "$OUT/validate.txt"
planner validate "$OUT/results.jsonl" --json > "$OUT/validate.json" || failed=$((failed + 1))
[ "$failed" -eq 0 ]
