#!/usr/bin/env bash
# Step pipelining check: one coordinator in front of ONE simulated group of a fast profile
# (h100-llama3.2-1b: ~1.5 ms decode steps), a closed loop of CONCURRENCY streams, and the
# delivered output tokens/s against the profile's ideal rate for the same steps run back
# to back. Also prints the coordinator's CPU per output token.
#
# Ideal rate (decode-dominated workload: short prompts, long outputs, ignore_eos): every
# step runs CONCURRENCY decodes plus, on average, CONCURRENCY × INPUT_LEN / OUTPUT_LEN
# prompt tokens, over CONCURRENCY × (INPUT_LEN + OUTPUT_LEN / 2) tokens of context:
#   step = a + b × tokens + c × context;  ideal = CONCURRENCY / step.
#
# Usage: deploy/bench/pipeline.sh   (knobs: CONCURRENCY=32 INPUT_LEN=32 OUTPUT_LEN=256
#   NUM_REQUESTS=256 SHARDLINE=target/debug/shardline OUT=deploy/bench/pipeline
#   COORDINATOR_ARGS="--stream-interval 4": extra coordinator flags
#   SIM_THREADS=1: the simulated worker's runtime threads (`--runtime-threads`); one
#   serves its step stream, and on two shared cores a second may only wake to preempt
#   its engine thread (measured, not alternated: 93.9-95.4 % of ideal over 6 runs with
#   two, median 95.0 %; 93.9-95.7 % over 13 with one, median 95.3 %);
#   SIM_THREADS= (empty) leaves the default, one per CPU.
#   SIM_PREFIX="chrt -f 1": runs the simulated worker at real-time priority, as if it had
#   its own machine; on two shared cores its engine thread otherwise waits behind the
#   coordinator and the bench client, or is preempted by its own gRPC threads. Needs root.)
set -euo pipefail
cd "$(dirname "$0")/../.."

CONCURRENCY=${CONCURRENCY:-32}
INPUT_LEN=${INPUT_LEN:-32}
OUTPUT_LEN=${OUTPUT_LEN:-256}
NUM_REQUESTS=${NUM_REQUESTS:-256}
PROFILE=h100-llama3.2-1b
# The profile's cost model (bench/src/sim/profile.rs).
A_S=1.2e-3 B_S=5e-6 C_S=12e-9
SHARDLINE=${SHARDLINE:-target/debug/shardline}
OUT=${OUT:-deploy/bench/pipeline}
LABEL=${LABEL:-run}
HTTP_PORT=${HTTP_PORT:-18180}
GRPC_PORT=${GRPC_PORT:-18181}
SIM_PORT=${SIM_PORT:-51100}
COORDINATOR_ARGS=${COORDINATOR_ARGS:-}
SIM_PREFIX=${SIM_PREFIX:-}
SIM_THREADS=${SIM_THREADS-1}
TICKS=$(getconf CLK_TCK)
mkdir -p "$OUT"

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
cpu_s() { awk -v t="$TICKS" '{ print ($14 + $15) / t }' "/proc/$1/stat"; }

$SIM_PREFIX "$SHARDLINE" bench sim --profile "$PROFILE" --listen "127.0.0.1:$SIM_PORT" --group-id sim-0 \
  ${SIM_THREADS:+--runtime-threads "$SIM_THREADS"} \
  >"$OUT/sim-$LABEL.log" 2>&1 &
sim=$!
PIDS+=($sim)
sleep 1
"$SHARDLINE" coordinator --worker "http://127.0.0.1:$SIM_PORT" \
  --http-listen "127.0.0.1:$HTTP_PORT" --grpc-listen "127.0.0.1:$GRPC_PORT" \
  --max-num-seqs 256 --max-concurrent-requests 4096 --max-queued-requests 4096 \
  $COORDINATOR_ARGS >"$OUT/coordinator-$LABEL.log" 2>&1 &
coord=$!
PIDS+=($coord)
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$HTTP_PORT/v1/models" | grep -q '"id"' && break
  sleep 0.2
done
before=$(cpu_s "$coord")
sim_before=$(cpu_s "$sim")
"$SHARDLINE" bench --base-url "http://127.0.0.1:$HTTP_PORT" --concurrency "$CONCURRENCY" \
  --num-requests "$NUM_REQUESTS" --warmup-requests "$CONCURRENCY" --input-len "$INPUT_LEN" \
  --output-len "$OUTPUT_LEN" --json "$OUT/$LABEL.json" --no-progress >"$OUT/bench-$LABEL.txt"
curl -sf "http://127.0.0.1:$HTTP_PORT/metrics" >"$OUT/metrics-$LABEL.txt" || true
cpu=$(awk -v a="$(cpu_s "$coord")" -v b="$before" 'BEGIN { print a - b }')
sim_cpu=$(awk -v a="$(cpu_s "$sim")" -v b="$sim_before" 'BEGIN { print a - b }')
python3 - "$OUT/$LABEL.json" "$cpu" "$sim_cpu" <<PY
import json, sys
d = json.load(open(sys.argv[1]))
p = d["runs"][0]
m = p.get("metrics", p)
def find(o, key):
    if isinstance(o, dict):
        if key in o: return o[key]
        for v in o.values():
            r = find(v, key)
            if r is not None: return r
    return None
tok_s = find(m, "output_throughput")
tokens = find(m, "total_output_tokens") or find(m, "output_tokens")
n, i, o = $CONCURRENCY, $INPUT_LEN, $OUTPUT_LEN
step = $A_S + $B_S * (n + n * i / o) + $C_S * n * (i + o / 2)
ideal = n / step
cpu = float(sys.argv[2])
import re
metrics = open("$OUT/metrics-$LABEL.txt").read() if __import__("os").path.exists("$OUT/metrics-$LABEL.txt") else ""
def mean(name):
    s = [float(x) for x in re.findall(rf"^{name}_sum{{[^}}]*}} (\S+)", metrics, re.M)]
    c = [float(x) for x in re.findall(rf"^{name}_count{{[^}}]*}} (\S+)", metrics, re.M)]
    return sum(s) / sum(c) if c and sum(c) else float("nan")
steps = f"step as the coordinator sees it {1e3*mean('shardline_step_duration_seconds'):.3f} ms, of which not the worker's {1e3*mean('shardline_step_overhead_seconds'):.3f} ms; mean batch {mean('shardline_batch_size'):.1f}"
print(f"$LABEL: {tok_s:.0f} output tok/s, ideal {ideal:.0f} (modelled step {step*1e3:.3f} ms): {100*tok_s/ideal:.1f} % of ideal; "
      f"coordinator CPU {cpu:.2f} s = {1e6*cpu/tokens:.1f} us/output token ({tokens} tokens); simulated worker CPU {float(sys.argv[3]):.2f} s; {steps}")
PY
