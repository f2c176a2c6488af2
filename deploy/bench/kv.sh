#!/usr/bin/env bash
# KV memory benchmarks, before vs after in one run (the earlier policies stay selectable):
#
#   routing  the shared-prefix workload (N system prompts x M questions) over 4 simulated
#            groups, `--routing first-block` (the earlier first-block affinity) then
#            `--routing prefix`: TTFT p50/p99 and prompt tokens computed vs taken from the
#            prefix caches (the coordinator's shardline_prefix_cache_* counters).
#   admission  CHATS chat requests without max_tokens kept in flight (closed loop) for
#            CHAT_DURATION on one SmolLM2 group with the default KV budget,
#            `--kv-admission worst-case` (reserve prompt + the whole context) then
#            `--kv-admission on-demand`: running sequences, batch size, token throughput,
#            preemptions. Answers still running at the end are cut off (their tokens count),
#            so a run ends on time however long the model talks.
#
# Usage: deploy/bench/kv.sh [routing|admission|all]   (default all; builds if needed)
# Knobs: PROFILE=h100-llama3-8b RATE=8 PREFIX_GROUPS=8 PREFIX_QUESTIONS=16 PREFIX_LEN=512
#   PREFIX_HEADER_LEN=0 (tokens every system prompt starts with: they then share first blocks)
#   SIM_KV_BLOCKS= (each simulated group's KV blocks; default the profile's, which never fill)
#   ROUTE_PREFIX_WEIGHT=4 OUTPUT_LEN=64 CHATS=64 CHAT_DURATION=120s CHAT_BODY='{...}'
#   ADMISSION_POLICIES="worst-case on-demand" UP_ARGS= (more `shardline up` flags, e.g.
#   "--kv-cache-dtype f16") MODEL=<gguf> OUT=deploy/bench/kv SHARDLINE=target/debug/shardline
set -euo pipefail
cd "$(dirname "$0")/../.."

WHAT=${1:-all}
PROFILE=${PROFILE:-h100-llama3-8b}
RATE=${RATE:-8}
PREFIX_GROUPS=${PREFIX_GROUPS:-8}
PREFIX_QUESTIONS=${PREFIX_QUESTIONS:-16}
PREFIX_LEN=${PREFIX_LEN:-512}
PREFIX_HEADER_LEN=${PREFIX_HEADER_LEN:-0}
OUTPUT_LEN=${OUTPUT_LEN:-64}
CHATS=${CHATS:-64}
CHAT_DURATION=${CHAT_DURATION:-120s}
# Merged into every chat: no max_tokens (what the OpenAI clients send by default).
CHAT_BODY=${CHAT_BODY:-'{"max_tokens": null}'}
OUT=${OUT:-deploy/bench/kv}
SHARDLINE=${SHARDLINE:-target/debug/shardline}
MODEL=${MODEL:-$(ls models/*.gguf 2>/dev/null | head -1)}
HTTP_PORT=${HTTP_PORT:-18180}
SIM_BASE_PORT=${SIM_BASE_PORT:-51100}

[ -x "$SHARDLINE" ] || cargo build -p shardline
mkdir -p "$OUT"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_http() {
  for _ in $(seq 1 600); do
    if curl -sf "http://127.0.0.1:$HTTP_PORT/v1/models" | grep -q '"id"'; then return 0; fi
    sleep 0.2
  done
  echo "the cluster did not come up; see $OUT/$1.log" >&2
  return 1
}

routing() {
  for policy in first-block prefix; do
    echo "== routing: --routing $policy over 4 simulated groups ($PROFILE) =="
    workers=()
    for i in 0 1 2 3; do
      port=$((SIM_BASE_PORT + i))
      "$SHARDLINE" bench sim --profile "$PROFILE" --listen "127.0.0.1:$port" --group-id "sim-$i" \
        ${SIM_KV_BLOCKS:+--kv-blocks "$SIM_KV_BLOCKS"} \
        >"$OUT/sim-$policy-$i.log" 2>&1 &
      PIDS+=($!)
      workers+=("http://127.0.0.1:$port")
    done
    sleep 1
    "$SHARDLINE" coordinator --worker "$(IFS=,; echo "${workers[*]}")" --routing "$policy" \
      --route-prefix-weight "${ROUTE_PREFIX_WEIGHT:-4}" \
      --http-listen "127.0.0.1:$HTTP_PORT" --grpc-listen "127.0.0.1:0" \
      >"$OUT/routing-$policy.log" 2>&1 &
    PIDS+=($!)
    wait_http "routing-$policy"
    "$SHARDLINE" bench --base-url "http://127.0.0.1:$HTTP_PORT" --workload shared-prefix \
      --prefix-groups "$PREFIX_GROUPS" --prefix-questions "$PREFIX_QUESTIONS" --prefix-len "$PREFIX_LEN" \
      --prefix-header-len "$PREFIX_HEADER_LEN" \
      --input-len 64 --output-len "$OUTPUT_LEN" --request-rate "$RATE" \
      --num-requests $((PREFIX_GROUPS * PREFIX_QUESTIONS)) --scrape-metrics --no-progress \
      --json "$OUT/routing-$policy.json" | tee "$OUT/routing-$policy.txt"
    cleanup
    sleep 1
  done
}

admission() {
  [ -n "$MODEL" ] || { echo "no model: run deploy/fetch-model.sh or set MODEL" >&2; exit 1; }
  for policy in ${ADMISSION_POLICIES:-worst-case on-demand}; do
    echo "== admission: --kv-admission $policy, $CHATS chats without max_tokens for $CHAT_DURATION =="
    # shellcheck disable=SC2086 # UP_ARGS is a list of flags
    "$SHARDLINE" up --model "$MODEL" --kv-admission "$policy" ${UP_ARGS:-} \
      --http-listen "127.0.0.1:$HTTP_PORT" --grpc-listen "127.0.0.1:0" --worker-listen "127.0.0.1:0" \
      >"$OUT/admission-$policy.log" 2>&1 &
    PIDS+=($!)
    wait_http "admission-$policy"
    "$SHARDLINE" bench --base-url "http://127.0.0.1:$HTTP_PORT" --endpoint chat \
      --concurrency "$CHATS" --duration "$CHAT_DURATION" --cut-off --honor-retry-after --input-len 64 --ignore-eos false \
      --extra-body "$CHAT_BODY" --tokenizer "$MODEL" --scrape-metrics --no-progress \
      --json "$OUT/admission-$policy.json" | tee "$OUT/admission-$policy.txt"
    cleanup
    sleep 1
  done
}

case $WHAT in
  routing) routing ;;
  admission) admission ;;
  all) routing; admission ;;
  *) echo "usage: $0 [routing|admission|all]" >&2; exit 2 ;;
esac
