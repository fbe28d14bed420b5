#!/usr/bin/env bash
# Low-latency kernel variants side by side in one device call (nvidia-h200 or nvidia-h100-x1, ranks
# sharing the GPU under MPS). Each file $VARIANTS/<name>.cu (default scratch/variants, carried) is a
# version of cuda/src/low_latency.cu. The working tree's own file runs first as "base" (build, bench,
# trace, bench/ll_host.ts and its CUDA API summary under nsys where installed); then each variant: build, the low-latency tests (default, BUN_EP_LL_COPY_ENGINES=all,
# BUN_EP_LL_WAITING_BLOCKS=2), bench/low_latency.ts, and the phase traces of a trace build (dispatch
# EP2 / EP8, the floor combine at EP8).
# The working tree's file is put back at the end. A variant must come from a commit on top of the
# working tree's (the TypeScript side is the working tree's: same native symbols and ABI version).
# Prepare here, e.g.:
#
#   mkdir -p scratch/variants
#   for t in map combine all; do git show exp-$t:cuda/src/low_latency.cu > scratch/variants/$t.cu; done
#   run(carry [".device", "scratch"], timeout_s 600, command "bash scripts/variants-batch.sh")
#
# About 40 s for base and 120 s per variant: at most 4 variants fit. Output under $OUT: summary.md
# (steps, test counts, the benchmark's graph-of-20 rows and rank 0's cycle lines of each trace per
# variant) and <name>.log per variant, whole (the device brings back at most 8 files: 7 variants).

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT=${OUT:-/tmp/variants-out}
VARIANTS=${VARIANTS:-scratch/variants}
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=$((START + ${BATCH_BUDGET_S:-560}))
STATUS=$OUT/status.md
SOURCE=cuda/src/low_latency.cu
# shellcheck disable=SC1091
source .device/remote.sh > "$OUT/base.log" 2>&1
# shellcheck source=scripts/batch_steps.sh
source scripts/batch_steps.sh
mps_start >> "$OUT/base.log" 2>&1
restart_mps() { mps_stop; sleep 2; mps_start; }
STEP_ON_FAILURE=restart_mps  # a failed step can leave MPS refusing clients (see below)
cp "$SOURCE" /tmp/low_latency.base.cu
echo "| step | result | took | log |" > "$STATUS"
echo "|---|---|---|---|" >> "$STATUS"

# run_variant NAME WITH_TESTS: the current $SOURCE through build, (tests), bench and trace.
run_variant() {
  local name=$1 log=$OUT/$1.log
  step "$log" "$name: build" 120 "bun run build"
  if [ "$2" = 1 ]; then
    step "$log" "$name: low_latency" 90 "bun test test/gpu/low_latency.test.ts"
    step "$log" "$name: low_latency all" 90 "BUN_EP_LL_COPY_ENGINES=all bun test test/gpu/low_latency.test.ts"
    step "$log" "$name: low_latency WB2" 90 "BUN_EP_LL_WAITING_BLOCKS=2 bun test test/gpu/low_latency.test.ts"
  fi
  step "$log" "$name: bench" 60 "bun bench/low_latency.ts --iterations 50"
  step "$log" "$name: trace build" 120 "BUN_EP_NVCC_FLAGS=-DBUN_EP_LL_TRACE bun run build"
  step "$log" "$name: trace EP2" 30 "bun bench/ll_trace.ts --ranks 2"
  step "$log" "$name: trace EP8" 30 "bun bench/ll_trace.ts --ranks 8"
  step "$log" "$name: combine trace EP8, floor" 30 "bun bench/ll_trace.ts --op combine --ranks 8 --tokens 8 --topk 1"
}

run_variant base 0
# The host's cost per call, and (where Nsight Systems is installed) which CUDA calls it is made of.
step "$OUT/base.log" "base: host probe" 60 "bun bench/ll_host.ts"
if command -v nsys > /dev/null 2>&1; then
  step "$OUT/base.log" "base: host probe under nsys" 120 \
    "nsys profile -t cuda -o /tmp/ll_host -f true bun bench/ll_host.ts > /dev/null && nsys stats -r cuda_api_sum /tmp/ll_host.nsys-rep | head -40"
fi
for file in "$VARIANTS"/*.cu; do
  [ -f "$file" ] || continue
  # A fresh MPS server per variant: a variant whose kernels time out can leave the old one refusing
  # clients (cudaErrorDevicesUnavailable: seen in session 6), which would fail every later variant.
  restart_mps >> "$OUT/base.log" 2>&1
  cp "$file" "$SOURCE"
  run_variant "$(basename "$file" .cu)" 1
done
cp /tmp/low_latency.base.cu "$SOURCE"
mps_stop >> "$OUT/base.log" 2>&1

{
  echo "# low-latency variants, $(date -u +%FT%TZ), $(($(date +%s) - START)) s"
  echo
  cat "$STATUS"
  for log in "$OUT"/*.log; do
    echo
    echo "## $(basename "$log" .log)"
    grep -E '^\(fail\)|threw$|^ *[0-9]+ (pass|fail)$' "$log" | cut -c1-300
    grep -E '^\| [^|]+ \| [0-9] \| (dispatch|combine) \| graph of' "$log"
    grep -E '^(dispatch|combine) R=|rank 0 (sender )?blocks|per call' "$log" | cut -c1-400
  done
} > "$OUT/summary.md"
cat "$OUT/summary.md"
