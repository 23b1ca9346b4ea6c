#!/usr/bin/env bash
# Structured outputs against free generation (issue "structured outputs"): one `ferrite serve` on the default model,
# `loadgen` streams with and without a JSON Schema `response_format`, interleaved (free, constrained, free, ...)
# round by round so the host's drift hits both alike. Prints ITL p50/p90 and output tok/s per run:
#   - batch 1 and 16: all free vs all constrained;
#   - neighbours: 8 free streams measured while 8 other streams run beside them, free or constrained (does a
#     constrained neighbour slow the free requests down?).
#   scripts/bench-constrained.sh [ROUNDS]     (FERRITE_BIN to use another binary; THREADS, default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${FERRITE_BIN:-target/release/ferrite}
ROUNDS=${1:-2}
THREADS=${THREADS:-2}
MODEL=$(scripts/fetch-model.sh)
tmp=$(mktemp -d)
pid=
cleanup() { [[ -n $pid ]] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# A record with free text, an enum, a number and a list: the grammar forces structure at every few tokens.
cat >"$tmp/schema.json" <<'JSON'
{"type": "object", "properties": {
  "title": {"type": "string", "maxLength": 80},
  "mood": {"enum": ["calm", "tense", "joyful", "grim"]},
  "year": {"type": "integer"},
  "places": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 6},
  "summary": {"type": "string"}},
 "required": ["title", "mood", "year", "places", "summary"], "additionalProperties": false}
JSON
"$BIN" serve --port "$port" --model "$MODEL" --threads "$THREADS" >"$tmp/serve.log" 2>&1 &
pid=$!
base="http://127.0.0.1:$port"
for _ in $(seq 600); do curl -sf "$base/v1/health/ready" >/dev/null && break; sleep 0.2; done
echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); flags: $(grep -o -w 'avx2\|avx512f\|avx512bw\|avx_vnni' /proc/cpuinfo | sort -u | xargs); $THREADS threads"
lg() { # concurrency requests [--json-schema FILE] -> loadgen JSON on stdout
  local c=$1 n=$2
  shift 2
  "$BIN" loadgen --base-url "$base/v1" --chat --concurrency "$c" --requests "$n" --prompt-tokens 64 --output-tokens 96 --json "$@"
}
row() { # round label json
  python3 - "$@" <<'PY'
import json, sys
s = json.loads(sys.argv[3])
assert s["errors"] == 0, s["first_error"]
print(f"{sys.argv[1]:<6} {sys.argv[2]:<34} {s['itl_ms']['p50']:7.1f}ms {s['itl_ms']['p90']:7.1f}ms {s['output_tokens_per_s']:9.1f} {s['output_tokens']:7d}")
PY
}
lg 2 4 >/dev/null # warm-up (and the grammar's first compilation)
lg 1 1 --json-schema "$tmp/schema.json" >/dev/null
printf '%-6s %-34s %9s %9s %9s %7s\n' round run itl_p50 itl_p90 out_tok/s tokens
for round in $(seq "$ROUNDS"); do
  for c in 1 16; do
    n=$((c == 1 ? 6 : 32))
    row "$round" "batch $c free" "$(lg "$c" "$n")"
    row "$round" "batch $c constrained" "$(lg "$c" "$n" --json-schema "$tmp/schema.json")"
  done
  for kind in free constrained; do
    extra=()
    [[ $kind == constrained ]] && extra=(--json-schema "$tmp/schema.json")
    lg 8 64 "${extra[@]}" >"$tmp/beside.json" &
    other=$!
    sleep 1
    row "$round" "8 free beside 8 $kind" "$(lg 8 24)"
    wait "$other"
  done
done
