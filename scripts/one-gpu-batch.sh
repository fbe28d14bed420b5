#!/usr/bin/env bash
# The one-GPU validation and benchmark batch: every GPU test, the low-latency tests again in each
# dispatch mode and with tiny waiting grids, bench/low_latency.ts and the decode example, in one
# device call of < 10 min (nvidia-h200 or nvidia-h100-x1, ranks sharing the GPU under MPS). From
# the repo root:
#
#   run(carry [".device"], timeout_s 600, command "bash scripts/one-gpu-batch.sh")
#
# Every step is independent (a failing step does not stop the next), runs under `timeout`, and is
# skipped once the time budget (BATCH_BUDGET_S, default 540 s) is spent. BATCH_QUICK=1 leaves out
# the benchmark. Output under $OUT:
#   summary.md         step table (pass / FAIL / TIMEOUT / skipped, seconds), then each test file's
#                      pass/fail counts and the benchmark's graph rows
#   setup.log          device, toolchain, build
#   tests.log          every test run, whole
#   bench.log          bench/low_latency.ts, the decode example and its HTTP self-test
#   bench-mps-off.log  bench/low_latency.ts again with MPS stopped (one process needs none)
#   low_latency.json   the benchmark's results (bench/results/low_latency.json of this run)
# (7 files: the device brings back at most 8 from $OUT, so add at most 1.)

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT=${OUT:-/tmp/one-gpu-out}
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=$((START + ${BATCH_BUDGET_S:-540}))
SETUP_LOG=$OUT/setup.log TESTS_LOG=$OUT/tests.log BENCH_LOG=$OUT/bench.log BENCH_NO_MPS_LOG=$OUT/bench-mps-off.log
STATUS=$OUT/status.md
# The device's copy of .git lags the working tree it was sent with (its HEAD was an older commit in
# every run of 2026-12-01): name the commit from here, e.g. command "BUN_EP_COMMIT=$(git rev-parse
# --short HEAD) bash ..." with the hash written out, since $(...) would run on the device.
COMMIT=${BUN_EP_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')}

# shellcheck disable=SC1091
source .device/remote.sh > "$SETUP_LOG" 2>&1
# shellcheck source=scripts/batch_steps.sh
source scripts/batch_steps.sh
mps_start >> "$SETUP_LOG" 2>&1
# A step whose kernels timed out can leave the MPS server refusing clients (cudaErrorDevicesUnavailable,
# session 6): a fresh one after every failed step keeps the later steps meaningful.
restart_mps() { mps_stop; sleep 2; mps_start; }
STEP_ON_FAILURE=restart_mps
echo "bun-ep $COMMIT (dirty files: $(git status --porcelain 2>/dev/null | wc -l)), $(date -u +%FT%TZ)" >> "$SETUP_LOG"
echo "| step | result | took | log |" > "$STATUS"
echo "|---|---|---|---|" >> "$STATUS"

step "$SETUP_LOG" "build" 240 "bun run build"
for file in runtime normal low_latency internode; do
  step "$TESTS_LOG" "test/gpu/$file" 200 "bun test test/gpu/$file.test.ts"
done
# The low-latency tests through the other dispatch paths, then with waiting grids of 2 and 3 blocks
# (every shape then sends several tokens per sender block and every waiting kernel loops).
step "$TESTS_LOG" "low_latency, BUN_EP_LL_COPY_ENGINES=all" 120 "BUN_EP_LL_COPY_ENGINES=all bun test test/gpu/low_latency.test.ts"
step "$TESTS_LOG" "low_latency, BUN_EP_LL_COPY_ENGINES=0" 120 "BUN_EP_LL_COPY_ENGINES=0 bun test test/gpu/low_latency.test.ts"
step "$TESTS_LOG" "low_latency, BUN_EP_LL_WAITING_BLOCKS=2" 150 "BUN_EP_LL_WAITING_BLOCKS=2 bun test test/gpu/low_latency.test.ts"
step "$TESTS_LOG" "low_latency, BUN_EP_LL_WAITING_BLOCKS=3" 150 "BUN_EP_LL_WAITING_BLOCKS=3 bun test test/gpu/low_latency.test.ts"
if [ "${BATCH_QUICK:-0}" != 1 ]; then
  rm -f bench/results/low_latency.json
  step "$BENCH_LOG" "bench/low_latency.ts" 240 "bun bench/low_latency.ts --iterations 50 && cp bench/results/low_latency.json '$OUT/'"
fi
step "$BENCH_LOG" "decode example" 90 "bun examples/decode-loop.ts --ranks 2"
step "$BENCH_LOG" "decode example --serve" 90 "bun examples/decode-loop.ts --ranks 2 --serve --requests 8"
mps_stop >> "$SETUP_LOG" 2>&1
STEP_ON_FAILURE=  # MPS stays off from here
# One process needs no MPS (its ranks' streams share one context): the benchmark again without it,
# where a launch costs the host what it costs a deployment (one rank per GPU, no MPS). Its JSON is
# not kept (the one above, with MPS on, is).
if [ "${BATCH_QUICK:-0}" != 1 ]; then
  sleep 2  # the MPS server's quit is asynchronous
  NO_MPS="env -u CUDA_MPS_PIPE_DIRECTORY -u CUDA_MPS_LOG_DIRECTORY"
  step "$BENCH_NO_MPS_LOG" "bench/low_latency.ts, MPS off" 120 "$NO_MPS bun bench/low_latency.ts --iterations 50"
  # Ranks sharing one GPU announce rows with GPU-scope releases; multi-GPU runs cannot. The same
  # benchmark with system scope shows what that choice is worth here.
  step "$BENCH_NO_MPS_LOG" "bench/low_latency.ts, MPS off, BUN_EP_LL_GPU_SCOPE=0" 120 \
    "$NO_MPS BUN_EP_LL_GPU_SCOPE=0 bun bench/low_latency.ts --iterations 50"
fi

{
  echo "# one-GPU batch, bun-ep $COMMIT, $(date -u +%FT%TZ), $(($(date +%s) - START)) s"
  echo
  cat "$STATUS"
  echo
  echo "## test counts, in step order"
  grep -E '^=== |^ *[0-9]+ (pass|fail|skip)$' "$TESTS_LOG" | grep -v ': pass in\|: FAIL\|: TIMEOUT' | sed 's/  \[limit.*//'
  echo
  echo "## failed tests (and rounds that threw), in step order"
  grep -E '^=== |^\(fail\)|threw$|^BunEpError' "$TESTS_LOG" | grep -v ': pass in' | sed 's/  \[limit.*//' | cut -c1-400
  echo
  echo "## bench/low_latency.ts, graph rows"
  grep -E '^\| [^|]+ \| [0-9] \| (dispatch|combine)[^|]* \| graph' "$BENCH_LOG" || echo "(none)"
  echo
  echo "## bench/low_latency.ts with MPS off, events and graph-of-20 rows"
  grep -E '^\| [^|]+ \| [0-9] \| (dispatch|combine) \| (events|graph of)' "$BENCH_NO_MPS_LOG" 2>/dev/null || echo "(none)"
  echo
  echo "## decode example"
  grep -E 'step latency|exact|requests answered' "$BENCH_LOG" || echo "(none)"
} > "$OUT/summary.md"
cat "$OUT/summary.md"
