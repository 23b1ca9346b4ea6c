#!/usr/bin/env bash
# Ferrite vs llama.cpp's C++ llama-server vs the llama-cpp-python server on the default model, one server after the
# other (run it on an otherwise idle machine), then the router's own latency against the no-compute backend.
#
#   LLAMA_SERVER=/path/to/llama-server LLAMA_CPP_PYTHON=/path/to/venv/bin/python scripts/bench-servers.sh [OUT_DIR]
#
# llama-server: build it from the llama.cpp sources vendored in the llama-cpp-python sdist (PyPI):
#   cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON && cmake --build build --target llama-server
# Either server is skipped when its variable is unset; ROUTER_ONLY=1 runs only the router-latency part. Results: OUT_DIR/<server>-c<N>.json (loadgen --json) and a
# summary on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-out}
mkdir -p "$OUT"
FERRITE=${FERRITE_BIN:-target/release/ferrite}
MODEL=$(scripts/fetch-model.sh)
CONCURRENCY=${CONCURRENCY:-1 4 16}

# shellcheck source=scripts/lib.sh
source scripts/lib.sh

load() { # name port
  local name=$1 port=$2
  for c in $CONCURRENCY; do
    "$FERRITE" loadgen --base-url "http://127.0.0.1:$port/v1" --concurrency "$c" --requests $((4 * c)) \
      --prompt-tokens 128 --output-tokens 64 --warmup 1 --json >"$OUT/$name-c$c.json"
    python3 - "$OUT/$name-c$c.json" "$name" "$c" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
def g(*keys):
    v = d
    for k in keys:
        v = v.get(k, {}) if isinstance(v, dict) else {}
    return v if v != {} else None
print(f"{sys.argv[2]:>18} c={sys.argv[3]:>2}: {d.get('output_tokens_per_s', 0):7.1f} tok/s  "
      f"TTFT p50/p99 {g('ttft_ms','p50')}/{g('ttft_ms','p99')} ms  ITL p50 {g('itl_ms','p50')} ms  "
      f"errors {d.get('errors', 0)}")
PY
  done
}

run_server() { # name port health_url command...
  local name=$1 port=$2 health=$3
  shift 3
  "$@" >"$OUT/$name.log" 2>&1 &
  local pid=$!
  wait_ready "$health"
  load "$name" "$port"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

if [[ -z ${ROUTER_ONLY:-} ]]; then
run_server ferrite 8300 http://127.0.0.1:8300/v1/health/ready "$FERRITE" serve --port 8300 --model "$MODEL"
if [[ -n ${LLAMA_SERVER:-} ]]; then
  run_server llama-server 8301 http://127.0.0.1:8301/health \
    "$LLAMA_SERVER" -m "$MODEL" --port 8301 -t 2 -tb 2 -np 4 -c 8192 --no-warmup
fi
if [[ -n ${LLAMA_CPP_PYTHON:-} ]]; then
  run_server llama-cpp-python 8302 http://127.0.0.1:8302/v1/models \
    "$LLAMA_CPP_PYTHON" -m llama_cpp.server --model "$MODEL" --port 8302 --n_threads 2 --n_threads_batch 2 \
    --interrupt_requests False --n_ctx 4096
fi
fi

# The router's own latency: the no-compute backend, then the router's histograms (a fresh server per concurrency).
for c in 1 16; do
  "$FERRITE" serve --port 8303 --backend instant --max-concurrent-requests 64 --model "$MODEL" >"$OUT/instant.log" 2>&1 &
  pid=$!
  wait_ready http://127.0.0.1:8303/v1/health/ready
  "$FERRITE" loadgen --base-url http://127.0.0.1:8303/v1 --concurrency $c --requests $((32 * c)) --prompt-tokens 128 \
    --output-tokens 128 --json >"$OUT/instant-c$c.json"
  curl -s http://127.0.0.1:8303/metrics >"$OUT/instant-metrics-c$c.txt"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  echo "router's own latency (instant backend, loadgen concurrency $c):"
  scripts/metrics-quantile.py ferrite_router_prepare_seconds 0.5 0.99 <"$OUT/instant-metrics-c$c.txt"
  scripts/metrics-quantile.py ferrite_router_token_seconds 0.5 0.99 <"$OUT/instant-metrics-c$c.txt"
done
