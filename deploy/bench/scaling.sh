#!/usr/bin/env bash
# Scaling study: one coordinator in front of 1, 2, 4, 8, 16 simulated worker groups, the
# same open-loop sweep (same per-group request rates) at each size; writes
# deploy/bench/scaling/report.md (+ scaling.png/svg, per-size JSON and plots), with the
# coordinator's TTFT breakdown per point (its histograms, scraped by the bench) and the CPU
# used by the coordinator, the load generator, the simulated workers and the machine.
#
# Usage: deploy/bench/scaling.sh            (builds target/debug/shardline if missing)
# Knobs (environment): SIZES="1 2 4 8 16" PROFILE=h100-llama3-8b (h100-llama3.2-1b: a small model
#   on a fast GPU, ~1.5 ms steps; deploy/bench/pipeline.sh measures one such group against
#   its ideal rate) PER_GROUP_RATES="2,4,8" HTTP_PORT=18080 GRPC_PORT=18081 SIM_BASE_PORT=51000
#   DURATION=20s INPUT_LEN=256 OUTPUT_LEN=128 OUT=deploy/bench/scaling SHARDLINE=path
#   COORDINATOR_ARGS="--stream-interval 4" (extra coordinator flags)
#   PREFILL_MS = the profile's modelled time for one INPUT_LEN prefill alone:
#   h100-llama3-8b, 256 tokens: 6 ms + 256 × 32 µs + 256 × 49 ns = 14.2 ms.
set -euo pipefail
cd "$(dirname "$0")/../.."

SIZES=${SIZES:-"1 2 4 8 16"}
PROFILE=${PROFILE:-h100-llama3-8b}
PER_GROUP_RATES=${PER_GROUP_RATES:-"2,4,8"}
DURATION=${DURATION:-20s}
INPUT_LEN=${INPUT_LEN:-256}
OUTPUT_LEN=${OUTPUT_LEN:-128}
PREFILL_MS=${PREFILL_MS:-14.2}
OUT=${OUT:-deploy/bench/scaling}
SHARDLINE=${SHARDLINE:-target/debug/shardline}
# The load generator, simulator and report (`shardline bench`, or the crate's example
# binary: BENCH=target/debug/examples/shardline-bench).
BENCH=${BENCH:-"$SHARDLINE bench"}
HTTP_PORT=${HTTP_PORT:-18080}
GRPC_PORT=${GRPC_PORT:-18081}
SIM_BASE_PORT=${SIM_BASE_PORT:-51000}
COORDINATOR_ARGS=${COORDINATOR_ARGS:-}

[ -x "$SHARDLINE" ] || cargo build -p shardline
mkdir -p "$OUT"
TICKS=$(getconf CLK_TCK)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# user + system CPU seconds of a process so far.
cpu_s() { awk -v t="$TICKS" '{ print ($14 + $15) / t }' "/proc/$1/stat"; }
# Sum of cpu_s over several processes.
cpu_sum() { local t=0; for p in "$@"; do t=$(awk -v a="$t" -v b="$(cpu_s "$p")" 'BEGIN { print a + b }'); done; echo "$t"; }
# "busy total" jiffies of the whole machine (every process, other users' builds included).
machine_jiffies() { awk '/^cpu / { idle = $5 + $6; tot = 0; for (i = 2; i <= NF; i++) tot += $i; print tot - idle, tot }' /proc/stat; }

wait_http() {
  for _ in $(seq 1 100); do
    if curl -sf "http://127.0.0.1:$HTTP_PORT/v1/models" | grep -q '"id"'; then return 0; fi
    sleep 0.2
  done
  echo "coordinator did not come up; see $OUT/coordinator-$1.log" >&2
  return 1
}

REPORT_ARGS=()
for n in $SIZES; do
  echo "== $n simulated group(s) =="
  workers=()
  SIM_PIDS=()
  for i in $(seq 0 $((n - 1))); do
    port=$((SIM_BASE_PORT + i))
    $BENCH sim --profile "$PROFILE" --listen "127.0.0.1:$port" --group-id "sim-$i" \
      >"$OUT/sim-$n-$i.log" 2>&1 &
    PIDS+=($!)
    SIM_PIDS+=($!)
    workers+=("http://127.0.0.1:$port")
  done
  sleep 1
  "$SHARDLINE" coordinator --worker "$(IFS=,; echo "${workers[*]}")" \
    --http-listen "127.0.0.1:$HTTP_PORT" --grpc-listen "127.0.0.1:$GRPC_PORT" \
    --max-num-seqs 256 --max-concurrent-requests 4096 --max-queued-requests 4096 \
    $COORDINATOR_ARGS >"$OUT/coordinator-$n.log" 2>&1 &
  coord=$!
  PIDS+=($coord)
  wait_http "$n"
  rates=$(echo "$PER_GROUP_RATES" | tr ',' '\n' | awk -v n="$n" '{ printf "%s%g", sep, $1 * n; sep="," }')
  before=$(cpu_s "$coord")
  sims_before=$(cpu_sum "${SIM_PIDS[@]}")
  read -r busy0 tot0 < <(machine_jiffies)
  # shellcheck disable=SC2086
  /usr/bin/time -f '%U %S %e' -o "$OUT/bench-$n.cpu" $BENCH --base-url "http://127.0.0.1:$HTTP_PORT" --request-rate "$rates" \
    --duration "$DURATION" --warmup-requests $((4 * n)) --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
    --slo ttft=500ms,tpot=50ms --json "$OUT/n$n.json" --plots "$OUT/n$n" --no-progress --scrape-metrics \
    | tee "$OUT/bench-$n.txt"
  read -r busy1 tot1 < <(machine_jiffies)
  after=$(cpu_s "$coord")
  sims_after=$(cpu_sum "${SIM_PIDS[@]}")
  cpu=$(awk -v a="$after" -v b="$before" 'BEGIN { print a - b }')
  sims=$(awk -v a="$sims_after" -v b="$sims_before" 'BEGIN { print a - b }')
  bench_cpu=$(awk '{ print $1 + $2 }' "$OUT/bench-$n.cpu")
  busy=$(awk -v b0="$busy0" -v t0="$tot0" -v b1="$busy1" -v t1="$tot1" 'BEGIN { print (b1 - b0) / (t1 - t0) }')
  curl -sf "http://127.0.0.1:$HTTP_PORT/metrics" >"$OUT/metrics-$n.txt" || true
  wall=$(awk '{ print $3 }' "$OUT/bench-$n.cpu")
  REPORT_ARGS+=(--size "$n=$OUT/n$n.json:$cpu:$bench_cpu:$sims:$busy:$wall")
  cleanup
  sleep 1
done

$BENCH scaling-report "${REPORT_ARGS[@]}" --prefill-ms "$PREFILL_MS" --out "$OUT" \
  --command "SIZES=\"$SIZES\" PROFILE=$PROFILE PER_GROUP_RATES=$PER_GROUP_RATES DURATION=$DURATION INPUT_LEN=$INPUT_LEN OUTPUT_LEN=$OUTPUT_LEN deploy/bench/scaling.sh"
echo "report: $OUT/report.md"
