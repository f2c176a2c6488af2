#!/usr/bin/env bash
# What TLS on the public API costs, measured in one run: one simulated worker group
# (`shardline worker --model sim:PROFILE`) behind two coordinators, one serving plain
# HTTP and one HTTPS (a CA and a certificate made here with openssl; rustls serves it),
# each driven by `shardline bench` with the same closed-loop load, alternating ROUNDS
# times so drift on a shared machine hits both alike. Prints a markdown table: output
# tok/s, TTFT and ITL of each and TLS/plain ratios.
#
# Usage: deploy/bench/tls-overhead.sh
# Knobs (environment): PROFILE=h100-llama3-8b CONCURRENCY=16 REQUESTS=400 INPUT=128 OUTPUT=64 ROUNDS=3
#   BIN=target/debug/shardline (cargo build first; a release build measures less noise)
# Needs: openssl, python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
PROFILE=${PROFILE:-h100-llama3-8b}
CONCURRENCY=${CONCURRENCY:-16}
REQUESTS=${REQUESTS:-400}
INPUT=${INPUT:-128}
OUTPUT=${OUTPUT:-64}
ROUNDS=${ROUNDS:-3}
BIN=${BIN:-target/debug/shardline}
command -v openssl >/dev/null || { echo "tls-overhead: openssl is needed" >&2; exit 1; }
[ -x "$BIN" ] || { echo "tls-overhead: $BIN missing: cargo build first" >&2; exit 1; }
dir=$(mktemp -d /tmp/shardline-tls-overhead.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# A CA and a server certificate for localhost / 127.0.0.1.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=tls-overhead CA" -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
  -keyout "$dir/tls.key" -out "$dir/tls.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > "$dir/ext"
openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
  -days 2 -extfile "$dir/ext" -out "$dir/tls.crt" 2>/dev/null

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
worker=$(free_port); plain=$(free_port); plain_g=$(free_port); tls=$(free_port); tls_g=$(free_port)
"$BIN" worker --model "sim:$PROFILE" --listen "127.0.0.1:$worker" >"$dir/worker.log" 2>&1 & pids+=($!)
"$BIN" coordinator --worker "http://127.0.0.1:$worker" --http-listen "127.0.0.1:$plain" \
  --grpc-listen "127.0.0.1:$plain_g" >"$dir/plain.log" 2>&1 & pids+=($!)
"$BIN" coordinator --worker "http://127.0.0.1:$worker" --http-listen "127.0.0.1:$tls" \
  --grpc-listen "127.0.0.1:$tls_g" --tls-cert "$dir/tls.crt" --tls-key "$dir/tls.key" \
  >"$dir/tls.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$plain/health" >/dev/null \
    && curl -sf --cacert "$dir/ca.crt" "https://localhost:$tls/health" >/dev/null && break
  sleep 0.2
done

run() { # name base-url extra-args...
  local name=$1 base=$2; shift 2
  "$BIN" bench --base-url "$base" --concurrency "$CONCURRENCY" --num-requests "$REQUESTS" \
    --input-len "$INPUT" --output-len "$OUTPUT" --ignore-eos true --warmup-requests 8 \
    --no-progress --json "$dir/$name.json" "$@" >/dev/null
}
for r in $(seq "$ROUNDS"); do
  run "plain-$r" "http://127.0.0.1:$plain"
  run "tls-$r" "https://localhost:$tls" --ca-cert "$dir/ca.crt"
done

python3 - "$dir" "$ROUNDS" "$PROFILE" "$CONCURRENCY" "$REQUESTS" "$INPUT" "$OUTPUT" <<'PY'
import json, statistics, sys
d, rounds, profile, c, n, i, o = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
def load(name):
    return json.load(open(f"{d}/{name}.json"))["runs"][0]
rows = {}
for kind in ("plain", "tls"):
    runs = [load(f"{kind}-{r}") for r in range(1, rounds + 1)]
    rows[kind] = {
        "tok/s": statistics.median(x["output_throughput"] for x in runs),
        "TTFT p50 ms": statistics.median(x["ttft_ms"]["p50"] for x in runs),
        "ITL p50 ms": statistics.median(x["itl_ms"]["p50"] for x in runs),
        "failed": sum(x["failed"] + x["rate_limited"] for x in runs),
    }
    if rows[kind]["failed"]:
        sys.exit(f"tls-overhead: {rows[kind]['failed']} {kind} requests failed or got 429; "
                 f"lower CONCURRENCY (logs in {d})")
print(f"sim:{profile}, closed loop, concurrency {c}, {n} requests x {rounds} rounds, "
      f"input {i} / output {o} tokens; medians over rounds")
print()
print("| | output tok/s | TTFT p50 (ms) | ITL p50 (ms) | failed or 429 |")
print("|---|---|---|---|---|")
for kind in ("plain", "tls"):
    r = rows[kind]
    print(f"| {kind} | {r['tok/s']:.0f} | {r['TTFT p50 ms']:.2f} | {r['ITL p50 ms']:.2f} | {r['failed']} |")
p, t = rows["plain"], rows["tls"]
print(f"| TLS / plain | {t['tok/s']/p['tok/s']:.3f} | {t['TTFT p50 ms']/p['TTFT p50 ms']:.3f} | "
      f"{t['ITL p50 ms']/p['ITL p50 ms']:.3f} | |")
PY
