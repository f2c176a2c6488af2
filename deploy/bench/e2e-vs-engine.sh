#!/usr/bin/env bash
# What the cluster costs on top of its engine: the engine alone (worker/examples/engine_bench.rs) against the
# whole cluster (HTTP → coordinator → gRPC → worker, `shardline up`) driven by
# `shardline bench`, at the same batch sizes / concurrencies and lengths.
#
#   engine:  engine_bench MODEL THREADS 128 C --prompt-tokens 128 --serve [--prefill-runs 5],
#            right before the cluster point with the same C
#            (each batch scheduled as the coordinator does: decodes + prompt chunks in a
#            512-token step budget, prefill included in the time; plus the median of 5 warm
#            128-token prefills alone)
#   cluster: shardline bench --concurrency C --input-len 128 --output-len 128 (ignore_eos),
#            closed loop, REQS_PER_SLOT·C requests per point, C = 1, 8, 32, distinct
#            prompts everywhere (no prefix-cache hits), one warm-up request first
#
# Writes a markdown report (default deploy/bench/e2e-vs-engine.md) with: engine aggregate
# tok/s (same schedule, prefill included) vs cluster aggregate output tok/s and their ratio
# (target ≥ 0.95), and TTFT at 1 stream vs the engine's warm prefill time for a 128-token
# prompt (target within 5 ms).
#
# Usage: deploy/bench/e2e-vs-engine.sh
# Knobs (environment): MODEL THREADS CONCURRENCIES="1 8 32" PROMPT=128 NEW=128
#   REQS_PER_SLOT=1 OUT_MD=deploy/bench/e2e-vs-engine.md RAW=<dir for raw outputs>
#   ENGINE_TXT=<engine_bench output of an earlier run to reuse instead of running it again>
#   UP_FLAGS="--step-timeout-s 600" (extra `shardline up` flags; on this CPU a 2048-token
#   prefill step takes longer than the default 60 s step timeout)
# Cost on this 2-core machine: prefill and decode both run at ≈ 20-30 tok/s per core pair, so
# the engine part and the cluster part take ≈ 7 min each with the defaults.
# Needs: cargo, curl (with HTTP/2, to read the tokenizer from the worker's gRPC Info), python3.
set -euo pipefail
cd "$(dirname "$0")/../.."

MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
THREADS=${THREADS:-$(nproc)}
CONCURRENCIES=${CONCURRENCIES:-"1 8 32"}
PROMPT=${PROMPT:-128}
NEW=${NEW:-128}
REQS_PER_SLOT=${REQS_PER_SLOT:-1}
UP_FLAGS=${UP_FLAGS:-"--step-timeout-s 600"}
OUT_MD=${OUT_MD:-deploy/bench/e2e-vs-engine.md}
RAW=${RAW:-$(mktemp -d /tmp/shardline-e2e-vs-engine.XXXXXX)}
mkdir -p "$RAW"

[ -f "$MODEL" ] || { echo "$MODEL is missing: run deploy/fetch-model.sh" >&2; exit 1; }

# Dev profile: opt-level 3 for the worker and every dependency.
cargo build -p shardline-worker --example engine_bench
cargo build -p shardline --bin shardline
ENGINE=target/debug/examples/engine_bench
SHARDLINE=target/debug/shardline

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

UP_PID=
cleanup() {
  if [ -n "$UP_PID" ]; then
    kill "$UP_PID" 2>/dev/null || true
    wait "$UP_PID" 2>/dev/null || true
    UP_PID=
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- 1. the cluster, and the engine alone interleaved with it ------------------------
# Engine batch N runs right before cluster point N (the cluster idles meanwhile), so both
# see about the same machine load; the load of this shared machine drifts over minutes.
HTTP_PORT=$(free_port); GRPC_PORT=$(free_port); WORKER_PORT=$(free_port)
echo "== cluster: shardline up on :$HTTP_PORT (gRPC :$GRPC_PORT, worker :$WORKER_PORT) =="
# shellcheck disable=SC2086
"$SHARDLINE" up --model "$MODEL" --threads "$THREADS" $UP_FLAGS \
  --http-listen "127.0.0.1:$HTTP_PORT" --grpc-listen "127.0.0.1:$GRPC_PORT" \
  --worker-listen "127.0.0.1:$WORKER_PORT" >"$RAW/up.log" 2>&1 &
UP_PID=$!
for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$HTTP_PORT/health" >/dev/null && break
  kill -0 "$UP_PID" 2>/dev/null || { echo "shardline up exited; see $RAW/up.log" >&2; exit 1; }
  sleep 0.2
done
curl -sf "http://127.0.0.1:$HTTP_PORT/health" >/dev/null || { echo "shardline up never became ready; see $RAW/up.log" >&2; exit 1; }

# The served tokenizer (InfoResponse.tokenizer_json, field 8) over raw gRPC, so prompts are
# exactly $PROMPT tokens: an empty InfoRequest is the 5-byte frame 00 00000000.
printf '\0\0\0\0\0' >"$RAW/info-req.bin"
curl -sf --http2-prior-knowledge -H 'content-type: application/grpc' -H 'te: trailers' \
  --data-binary @"$RAW/info-req.bin" -o "$RAW/info-resp.bin" \
  "http://127.0.0.1:$WORKER_PORT/shardline.worker.v1.Worker/Info"
python3 - "$RAW/info-resp.bin" "$RAW/tokenizer.json" <<'EOF'
import sys
data = open(sys.argv[1], "rb").read()
assert len(data) >= 5 and data[0] == 0, "unexpected gRPC frame"
n = int.from_bytes(data[1:5], "big"); msg = data[5:5 + n]; i = 0
def varint():
    global i
    v = s = 0
    while True:
        b = msg[i]; i += 1; v |= (b & 0x7F) << s; s += 7
        if b < 0x80: return v
while i < len(msg):
    key = varint(); field, wire = key >> 3, key & 7
    if wire == 0: varint()
    elif wire == 2:
        ln = varint(); val = msg[i:i + ln]; i += ln
        if field == 8:
            open(sys.argv[2], "wb").write(val); sys.exit(0)
    elif wire == 5: i += 4
    elif wire == 1: i += 8
    else: raise SystemExit(f"unexpected wire type {wire}")
raise SystemExit("InfoResponse has no tokenizer_json")
EOF

# Every point gets its own --seed, so no prompt repeats an earlier one: the worker's prefix
# cache would otherwise skip most of the prefill. The warm-up is a separate run with yet
# another seed (`shardline bench` now gives warm-ups prompts of their own too).
"$SHARDLINE" bench --base-url "http://127.0.0.1:$HTTP_PORT" --concurrency 1 --num-requests 1 \
  --seed 1000 --input-len "$PROMPT" --output-len 16 --tokenizer "$RAW/tokenizer.json" \
  --no-progress >"$RAW/warmup.txt"
if [ -n "${ENGINE_TXT:-}" ]; then
  echo "== engine: reusing $ENGINE_TXT =="
  cp "$ENGINE_TXT" "$RAW/engine.txt"
else
  : >"$RAW/engine.txt"
fi
runs=5
for c in $CONCURRENCIES; do
  if [ -z "${ENGINE_TXT:-}" ]; then
    echo "== engine: $ENGINE $MODEL $THREADS $NEW $c --prompt-tokens $PROMPT --serve --prefill-runs $runs =="
    "$ENGINE" "$MODEL" "$THREADS" "$NEW" "$c" --prompt-tokens "$PROMPT" --serve --prefill-runs "$runs" \
      | tee -a "$RAW/engine.txt"
    runs=0 # the warm prefills are timed once, next to the 1-stream point
  fi
  n=$((REQS_PER_SLOT * c))
  echo "== cluster: closed loop, concurrency $c, $n requests =="
  # The coordinator's step histograms before and after: the worker's own step time in this
  # very run (RPC round trip − overhead), the same-run engine reference.
  curl -sf "http://127.0.0.1:$HTTP_PORT/metrics" >"$RAW/metrics-c$c-before.txt"
  "$SHARDLINE" bench --base-url "http://127.0.0.1:$HTTP_PORT" --concurrency "$c" --seed "$c" \
    --num-requests "$n" --input-len "$PROMPT" --output-len "$NEW" \
    --ignore-eos true --tokenizer "$RAW/tokenizer.json" --json "$RAW/cluster-c$c.json" \
    --scrape-metrics --no-progress | tee "$RAW/cluster-c$c.txt"
  curl -sf "http://127.0.0.1:$HTTP_PORT/metrics" >"$RAW/metrics-c$c-after.txt"
done
cleanup
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- 3. the report -------------------------------------------------------------------
CMD="REQS_PER_SLOT=$REQS_PER_SLOT UP_FLAGS='$UP_FLAGS' deploy/bench/e2e-vs-engine.sh" \
  ENGINE_REUSED="${ENGINE_TXT:-}" python3 - "$RAW" "$OUT_MD" "$CONCURRENCIES" "$THREADS" \
  "$MODEL" "$LOAD_BEFORE" "$LOAD_AFTER" "$NEW" <<'EOF'
import json, re, subprocess, sys, datetime, os
raw, out_md, concs, threads, model, load_before, load_after, new = sys.argv[1:9]
concs = [int(c) for c in concs.split()]
engine = open(f"{raw}/engine.txt").read()
rows = {}
pp = None
for line in engine.splitlines():
    m = re.match(r"ours: serve batch (\d+) \(prefill\+decode, budget (\d+)\) \(aggregate\)\s+(\d+)\s+([\d.]+)\s+([\d.]+)", line)
    if m:
        rows[int(m[1])] = (int(m[3]), float(m[4]), float(m[5]))
    m = re.match(r"ours: prefill (\d+) tokens alone, warm \(median of (\d+)\)\s+(\d+)\s+([\d.]+)", line)
    if m:
        pp = (int(m[1]), float(m[4]), int(m[2]))
pp_ms = pp[1] * 1e3 if pp else None
cl = {c: json.load(open(f"{raw}/cluster-c{c}.json"))["runs"][0] for c in concs}
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
L = []
L.append("# End to end vs engine: what the HTTP, coordinator and gRPC hops cost\n")
L.append(f"Run {now} at `{rev}` (plus uncommitted work in the shared tree) with `{os.environ['CMD']}`;")
L.append(f"model `{model}`, {threads} kernel threads for the engine and for the worker, dev profile")
L.append(f"(opt-level 3 for the worker and dependencies). Load average before/after: {load_before} / {load_after}")
L.append("(the 2-core machine is shared with other builds: numbers are noisy).\n")
L.append("## Throughput: engine vs cluster, same streams, same schedule, prefill included\n")
def msum(path, name):
    try:
        text = open(path).read()
    except OSError:
        return None
    vals = [float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
            if l.startswith(name + " ") or l.startswith(name + "{")]
    return sum(vals) if vals else None
def delta(c, name):
    a = msum(f"{raw}/metrics-c{c}-before.txt", name)
    b = msum(f"{raw}/metrics-c{c}-after.txt", name)
    return None if a is None or b is None else b - a
L.append("| streams | engine tok/s | cluster output tok/s | cluster / engine | worker step time / cluster wall (same run) | cluster TPOT p50 ms | completed / failed |")
L.append("|---|---|---|---|---|---|---|")
for c in concs:
    toks, secs, tps = rows.get(c, (None, None, None))
    r = cl[c]
    ctps = r["output_throughput"]
    f = lambda x, p=1: "n/a" if x is None else f"{x:.{p}f}"
    rpc = delta(c, "shardline_step_duration_seconds_sum")
    over = delta(c, "shardline_step_overhead_seconds_sum")
    busy = (rpc - over) / r["duration_s"] if rpc is not None and over is not None and r["duration_s"] > 0 else None
    L.append(f"| {c} | {f(tps)} | {ctps:.1f} | {f(ctps / tps if tps else None, 3)} | {f(busy, 3)} | "
             f"{r['tpot_ms']['p50']:.1f} | {r['completed']} / {r['failed'] + r['rate_limited']} |")
L.append("")
c1 = cl.get(1)
L.append(f"## Time to first token at 1 stream vs engine prefill ({pp[0] if pp else '?'}-token prompt)\n")
if c1:
    t = c1["ttft_ms"]
    L.append("| cluster TTFT p50 / mean / p90 ms | engine prefill alone, warm, median ms | difference (p50) ms |")
    L.append("|---|---|---|")
    diff = "n/a" if pp_ms is None else f"{t['p50'] - pp_ms:.1f}"
    est = "n/a" if pp_ms is None else f"{pp_ms:.1f}"
    L.append(f"| {t['p50']:.1f} / {t['mean']:.1f} / {t['p90']:.1f} | {est} | {diff} |")
    L.append("")
    n = delta(1, "shardline_first_token_overhead_seconds_count")
    own = delta(1, "shardline_first_token_overhead_seconds_sum")
    q = delta(1, "shardline_request_queue_time_seconds_sum")
    srv = delta(1, "shardline_time_to_first_token_seconds_sum")
    if n and own is not None and q is not None and srv is not None:
        own, q, srv = own / n * 1e3, q / n * 1e3, srv / n * 1e3
        worker = srv - q - own
        L.append("Same run, from the coordinator's metrics (mean over the point's requests):\n")
        L.append("| client TTFT ms | coordinator TTFT ms | queue ms | worker's prefill step ms | coordinator + gRPC hop ms | client TTFT − worker's prefill step ms |")
        L.append("|---|---|---|---|---|---|")
        L.append(f"| {t['mean']:.1f} | {srv:.1f} | {q:.2f} | {worker:.1f} | {own:.2f} | {t['mean'] - worker:.2f} |")
        L.append("")
L.append("## How to read this\n")
L.append("- *engine tok/s*: `engine_bench --serve`: N sequences with distinct 128-token prompts,")
L.append("  scheduled as the coordinator does (each step decodes every sequence that has a token and")
L.append("  packs prompt chunks into the rest of a 512-token budget), until each has 128 new tokens;")
L.append("  generated tokens over the whole time, prefill included. No HTTP, coordinator or gRPC.")
L.append("- *cluster output tok/s*: `shardline bench` closed loop, N streams, N requests sent at once,")
L.append("  output tokens of completed requests over first send → last end.")
L.append("- *worker step time / cluster wall (same run)*: the worker's own time in its steps (the")
L.append("  coordinator's `shardline_step_duration_seconds` − `shardline_step_overhead_seconds`, i.e.")
L.append("  RPC round trip − everything outside the worker's step) over the bench's first send → last")
L.append("  end, from the coordinator's metrics before and after the point. 1.0 means the engine was")
L.append("  never waiting on HTTP, the coordinator or gRPC: the same-run counterpart of cluster / engine,")
L.append("  free of the drift between two runs on this shared machine.")
L.append("- *engine prefill alone*: the median of 5 warm prefills of one 128-token prompt (after an")
L.append("  untimed one), each a single forward.")
L.append("- Cluster TTFT is measured at the client (first SSE content chunk − send): HTTP, coordinator")
L.append("  queueing and tokenization, the gRPC hop, the prefill step and the first chunk's way back.")
L.append("")
L.append("## Raw engine output\n")
if os.environ.get("ENGINE_REUSED"):
    L.append(f"(engine run earlier in the same session, reused with `ENGINE_TXT`)\n")
L.append("```")
L.append(engine.rstrip())
L.append("```")
text = "\n".join(L) + "\n"
open(out_md, "w").write(text)
print(text)
EOF
echo "raw outputs in $RAW; report in $OUT_MD"
