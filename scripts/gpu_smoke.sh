#!/usr/bin/env bash
# The CUDA path in one call (issue 23; docs/gpu.md, "GPU smoke run"). From the source tree with the machine's own torch
# and transformers, no network: every step time-boxed and logged under $OUT/logs, $OUT/summary.md and
# summary.json rewritten after each step; exit status 1 when a step failed. DEVICE=cpu rehearses it on a CPU,
# shrunk (tests/test_gpu_smoke.py). SMOKE_SCALE overrides the test-size factor, SMOKE_JOBS how many of the
# independent steps run at once.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/reports/gpu-smoke-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/logs" && OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
export DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.gpu-smoke-wheels}
WORK=$(mktemp -d)  # stand-ins and their HF_HOME: not under $OUT, which comes back over the wire
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH=".:$WHEELS/site${PYTHONPATH:+:$PYTHONPATH}" DFLASH_TEST_DEVICE=$DEVICE HYPOTHESIS_PROFILE=ci
export COLUMNS=300  # pytest's FAILED lines are cut at the terminal width; the summary quotes them

if [ "$DEVICE" = cpu ]; then  # the rehearsal: the same steps, smaller
  SCALE=${SMOKE_SCALE:-0.04} TOKENS=8 XDIST=0 TIMING=(--prompts 1 --tokens 16) SAMPLING=(-k speculative)
  TIER_DEVICE=(--device cpu) JOBS=${SMOKE_JOBS:-2}
else
  SCALE=${SMOKE_SCALE:-0.25} TOKENS=32 XDIST=1 TIMING=(--prompts 4 --tokens 64) SAMPLING=() TIER_DEVICE=()
  JOBS=${SMOKE_JOBS:-6}
fi
export DFLASH_TEST_SCALE=$SCALE SMOKE_NOTE="test sizes x$SCALE (DFLASH_TEST_SCALE: hypothesis examples, held-out \
prompts, sampling runs), sampling ${SAMPLING[*]:-all cases}; GPU tier 2 prompts x $TOKENS tokens with -n $XDIST; \
timing ${TIMING[*]}; $JOBS independent steps at once"

: > "$OUT/steps.tsv"
step() {  # step NAME SECONDS COMMAND...: run it time-boxed into logs/NAME.log, record it, rewrite the summary
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s.%N)
  timeout -k 10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $start}")" "$limit" \
    >> "$OUT/steps.tsv"
  "$PY" -m dflash.gpu_smoke summary "$OUT"
  echo "$name: exit $rc"
}
started() {  # started NAME SECONDS COMMAND...: the step in the background, at most $JOBS at once
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  step "$@" &
}

step nvidia-smi 30 bash -c 'command -v nvidia-smi >/dev/null || { echo "nvidia-smi is not on this machine"; exit 77; }
  nvidia-smi && nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv'
step wheels 120 "$PY" -m dflash.gpu_smoke wheels "$WHEELS"
ADDOPTS=()
"$PY" -c "import syrupy" 2>/dev/null || ADDOPTS=(-o "addopts=-ra")  # pyproject's addopts name a syrupy option
PYTEST=("$PY" -m pytest -p no:cacheprovider -p no:randomly -q -ra "${ADDOPTS[@]}")
step environment 120 "$PY" -m dflash.gpu_smoke environment "$OUT" "$DEVICE"
# Independent of each other (each test process holds its own CUDA context; the machine has 16 cores):
started lossless-float32 240 "${PYTEST[@]}" tests/test_lossless_greedy.py
started lossless-bfloat16 180 "${PYTEST[@]}" tests/test_bf16_exact.py -k tiny_bf16
started variants-lossless 240 "${PYTEST[@]}" tests/test_lossless_variants.py
started sampling 240 "${PYTEST[@]}" tests/test_sampling_chi2.py tests/test_sampling_chi2_variants.py "${SAMPLING[@]}"
started fastdllm-vs-cpu 180 "${PYTEST[@]}" tests/test_blockdiffusion_decode.py -k test_device_gives_the_cpu
started standins 180 "$PY" -m dflash.gpu_smoke standins "$WORK/hf_home"
wait
# Then one at a time: the GPU tier gates throughput against what it bootstrapped, the timing table measures it.
HF=(env -u HF_HUB_CACHE -u HUGGINGFACE_HUB_CACHE -u HF_DATASETS_CACHE -u CI HF_HOME="$WORK/hf_home" HF_HUB_OFFLINE=1
    HF_DATASETS_OFFLINE=1)
TIER=("${PYTEST[@]}" ablations -m "gpu and not slow" --profile gpu-qwen3-4b "${TIER_DEVICE[@]}" --prompts 2
      --max-new-tokens "$TOKENS" -n "$XDIST" --baselines-dir "$OUT/gpu-tier/baselines")
step gpu-tier-bootstrap 300 "${HF[@]}" "${TIER[@]}" --update-baselines --reports-dir "$OUT/gpu-tier/bootstrap"
step gpu-tier-gated 300 "${HF[@]}" CI=true "${TIER[@]}" --reports-dir "$OUT/gpu-tier/gated"
step timing 240 "${HF[@]}" "$PY" -m dflash.gpu_smoke timing "$OUT" "$DEVICE" "${TIMING[@]}"

cat "$OUT/summary.md"
"$PY" -m dflash.gpu_smoke summary "$OUT"
