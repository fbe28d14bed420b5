# Sourced by the device batch scripts (scripts/one-gpu-batch.sh, scripts/multi-gpu-batch.sh).
# Needs START and DEADLINE (epoch seconds) and STATUS (the markdown step table being written).
#
# step LOG NAME LIMIT_S COMMAND...   runs COMMAND (a shell string; exported functions work) under
# `timeout`, appends its output to LOG and one row to STATUS: pass, FAIL rc=N, TIMEOUT, or skipped
# once less than 20 s of the budget is left. Never fails itself, so one step cannot stop the next.
# STEP_ON_FAILURE, when set, names a command run (output to LOG) after a step that did not pass.
step() {
  local log=$1 name=$2 limit=$3
  shift 3
  local left=$((DEADLINE - $(date +%s)))
  if ((left < 20)); then
    echo "=== $name: skipped, the time budget is spent" >> "$log"
    printf '| %s | skipped (no time left) | - | %s |\n' "$name" "$(basename "$log")" >> "$STATUS"
    return 0
  fi
  ((limit > left - 5)) && limit=$((left - 5))
  echo "" >> "$log"
  echo "=== $name  [limit ${limit}s, t+$(($(date +%s) - START))s]  $*" >> "$log"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$*" >> "$log" 2>&1
  rc=$?
  local took=$(($(date +%s) - t0)) verdict
  if ((rc == 0)); then verdict=pass; elif ((rc == 124 || rc == 137)); then verdict="TIMEOUT (${limit}s)"; else verdict="FAIL rc=$rc"; fi
  echo "=== $name: $verdict in ${took}s" >> "$log"
  printf '| %s | %s | %ss | %s |\n' "$name" "$verdict" "$took" "$(basename "$log")" >> "$STATUS"
  if ((rc != 0)) && [ -n "${STEP_ON_FAILURE:-}" ]; then $STEP_ON_FAILURE >> "$log" 2>&1; fi
  return 0
}
