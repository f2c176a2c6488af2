#!/usr/bin/env python3
"""Added TTFT of an *ideal* coordinator: zero cost, zero network, the same batching policy.

A discrete-event model of one simulated group (`sim:h100-llama3-8b`: step time =
a + b·tokens + c·Σcontext) behind the coordinator's iteration-level scheduler — every step
decodes all running sequences, then packs waiting prompts FIFO into what is left of the
per-step token budget (chunked prefill), one step at a time — with Poisson arrivals. It
prints the TTFT percentiles minus the modelled prefill of one prompt alone, i.e. the
"added TTFT" that the batching policy alone causes: a request that arrives while a step
runs waits for it, and its prefill shares its step with other requests' tokens.

`--step-overhead-ms X` adds X ms to every step (e.g. the measured gRPC round trip), to
compare with a real run.

Usage: deploy/bench/ideal_ttft.py [--rate 8] [--requests 20000] [--seed 1]
       [--input-len 256] [--output-len 128] [--budget 512] [--step-overhead-ms 0]
"""
import argparse
import heapq
import random


def percentile(sorted_v, p):
    r = p / 100 * (len(sorted_v) - 1)
    lo = int(r)
    hi = min(lo + 1, len(sorted_v) - 1)
    return sorted_v[lo] + (sorted_v[hi] - sorted_v[lo]) * (r - lo)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=8.0, help="arrivals per second per group")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--budget", type=int, default=512, help="--max-num-batched-tokens")
    ap.add_argument("--a-ms", type=float, default=6.0)
    ap.add_argument("--b-us", type=float, default=32.0)
    ap.add_argument("--c-ns", type=float, default=49.0)
    ap.add_argument("--step-overhead-ms", type=float, default=0.0)
    args = ap.parse_args()

    a, b, c = args.a_ms / 1e3, args.b_us / 1e6, args.c_ns / 1e9
    alone = a + b * args.input_len + c * args.input_len
    rng = random.Random(args.seed)
    t = 0.0
    arrivals = []
    for _ in range(args.requests):
        t += rng.expovariate(args.rate)
        arrivals.append(t)

    waiting = []  # FIFO of [arrival, prompt_done]
    running = []  # [arrival, context, generated, first_token_time]
    ttft = []
    now = 0.0
    i = 0
    while i < len(arrivals) or waiting or running:
        while i < len(arrivals) and arrivals[i] <= now:
            waiting.append([arrivals[i], 0])
            i += 1
        if not waiting and not running:
            now = arrivals[i]  # idle: the next arrival starts a step at once
            continue
        budget = args.budget
        tokens = ctx = 0
        for r in running:  # decodes first
            if budget == 0:
                break
            budget -= 1
            tokens += 1
            ctx += r[1] + 1
        admitted = []
        for w in waiting:
            if budget == 0:
                break
            take = min(args.input_len - w[1], budget)
            budget -= take
            tokens += take
            ctx += w[1] + take
            w[1] += take
            if w[1] == args.input_len:
                admitted.append(w)
        step = a + b * tokens + c * ctx + args.step_overhead_ms / 1e3
        now += step
        for r in running:
            r[1] += 1
            r[2] += 1
        for w in admitted:
            waiting.remove(w)
            ttft.append(now - w[0])
            running.append([w[0], args.input_len, 1])
        running = [r for r in running if r[2] < args.output_len]

    ttft.sort()
    added = [(x - alone) * 1e3 for x in ttft]
    print(
        f"rate {args.rate}/s per group, {len(ttft)} requests, prefill alone {alone * 1e3:.1f} ms, "
        f"step overhead {args.step_overhead_ms} ms: added TTFT p50 {percentile(added, 50):.1f} ms, "
        f"p90 {percentile(added, 90):.1f} ms, p99 {percentile(added, 99):.1f} ms"
    )


if __name__ == "__main__":
    main()
