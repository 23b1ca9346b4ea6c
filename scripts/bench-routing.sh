#!/usr/bin/env bash
# Routing policies side by side (issue "cluster routing"): cache-aware vs round-robin vs least-load on a
# shared-prefix workload, 2 CPU workers (1 thread each, fresh and cold for every run) behind one router, policies
# interleaved round by round so the host's drift hits each alike. Prints TTFT p50/p90, output tok/s and the prefix
# hit rate (prompt tokens the workers served from cache, from the router's counters) per run.
#   scripts/bench-routing.sh [ROUNDS]        (FERRITE_BIN to use another binary)
# POLICIES (default "cache-aware round-robin least-load") may carry router flags after `@`, comma-separated:
#   POLICIES="cache-aware cache-aware@--routing-prefill-weight=2 cache-aware@--kv-events=off round-robin"
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${FERRITE_BIN:-target/release/ferrite}
ROUNDS=${1:-2}
REQUESTS=${REQUESTS:-48}
CONCURRENCY=${CONCURRENCY:-4}
PROMPT=${PROMPT:-600}
SHARED=${SHARED:-500}
PREFIX_GROUPS=${PREFIX_GROUPS:-8}
OUTPUT=${OUTPUT:-16}
MODEL=$(scripts/fetch-model.sh)
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ok() { for _ in $(seq 600); do curl -sf "$1" >/dev/null && return 0; sleep 0.2; done; echo "not ready: $1" >&2; exit 1; }
metric() { curl -sf "$1/metrics" | awk -v m="$2" '$1 == m {print $2}'; }

echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); flags: $(grep -o -w 'avx2\|avx512f\|avx512bw\|avx_vnni' /proc/cpuinfo | sort -u | xargs)"
echo "workload: $REQUESTS requests, concurrency $CONCURRENCY, $PROMPT-word prompts, $SHARED shared words in $PREFIX_GROUPS groups, $OUTPUT output tokens"
printf '%-6s %-40s %9s %9s %11s %9s\n' round policy ttft_p50 ttft_p90 out_tok/s hit_rate
for round in $(seq "$ROUNDS"); do
  for entry in ${POLICIES:-cache-aware round-robin least-load}; do
    policy=${entry%%@*}
    extra=()
    [[ $entry == *@* ]] && IFS=, read -r -a extra <<<"${entry#*@}"
    pids=()
    w1=$(port); w2=$(port); http=$(port)
    "$BIN" worker --listen "127.0.0.1:$w1" --model "$MODEL" --threads 1 >"$tmp/w1.log" 2>&1 & pids+=($!)
    "$BIN" worker --listen "127.0.0.1:$w2" --model "$MODEL" --threads 1 >"$tmp/w2.log" 2>&1 & pids+=($!)
    "$BIN" router --port "$http" --model "$MODEL" --worker "http://127.0.0.1:$w1" --worker "http://127.0.0.1:$w2" \
      --routing "$policy" "${extra[@]}" >"$tmp/r.log" 2>&1 & pids+=($!)
    base="http://127.0.0.1:$http"
    wait_ok "$base/v1/health/ready"
    "$BIN" loadgen --base-url "$base/v1" --requests "$REQUESTS" --concurrency "$CONCURRENCY" --prompt-tokens "$PROMPT" \
      --shared-prefix "$SHARED" --prefix-groups "$PREFIX_GROUPS" --output-tokens "$OUTPUT" --json >"$tmp/out.json"
    hit=$(python3 -c "print(f'{float(\"$(metric "$base" ferrite_router_cached_prompt_tokens_total)\") / float(\"$(metric "$base" ferrite_router_prompt_tokens_total)\"):.3f}')")
    python3 - "$tmp/out.json" "$round" "$entry" "$hit" <<'PY' || { tail -n 20 "$tmp/r.log" "$tmp/w1.log" "$tmp/w2.log" >&2; exit 1; }
import json, sys
s = json.load(open(sys.argv[1]))
assert s["errors"] == 0, s["first_error"]
print(f"{sys.argv[2]:<6} {sys.argv[3]:<40} {s['ttft_ms']['p50']:8.0f}ms {s['ttft_ms']['p90']:8.0f}ms {s['output_tokens_per_s']:11.1f} {sys.argv[4]:>9}")
PY
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
  done
done
