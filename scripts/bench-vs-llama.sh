#!/usr/bin/env bash
# Ferrite against llama.cpp's llama-server on the default model, issue 18's workloads, both servers up side by side
# and every workload run interleaved (Ferrite, llama-server, Ferrite, llama-server, ...) so the host's drift hits both
# alike. Each round uses new prompts (loadgen --seed), so no round finds an earlier round's prompt in either cache.
#
#   LLAMA_SERVER=/path/to/llama-server scripts/bench-vs-llama.sh [OUT_DIR] [ROUNDS]
#
# Cap the instruction set on both sides to measure the AVX2 path on an AVX-512 host: FERRITE_CPU_ISA=avx2 here, and a
# llama-server built with -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF (from the
# llama.cpp sources vendored in the llama-cpp-python sdist on PyPI; scripts/bench-servers.sh shows the build line).
# Uncapped, name the AVX-512 flags instead of -DGGML_NATIVE=ON where the VM hides AMX: a native build on a Sapphire
# Rapids VM stopped with SIGILL in its AMX kernel (see BENCHMARKS.md, session 10).
# WORKLOADS picks a subset (names below). Results: OUT_DIR/<workload>-r<round>-<server>.json and a table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LLAMA_SERVER:?set LLAMA_SERVER to a llama-server binary}"
OUT=${1:-bench-vs-llama}
ROUNDS=${2:-2}
mkdir -p "$OUT"
FERRITE=${FERRITE_BIN:-target/release/ferrite}
MODEL=$(scripts/fetch-model.sh)
THREADS=${THREADS:-2}
WORKLOADS=${WORKLOADS:-decode p200-c1 p200-c4 p200-c16 prefix-c1 prefix-c4 prefix-c16 long-1000 long-2000 long-4000}

# shellcheck source=scripts/lib.sh
source scripts/lib.sh

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
"$FERRITE" serve --port 8300 --model "$MODEL" --threads "$THREADS" --max-model-len 8192 >"$OUT/ferrite.log" 2>&1 &
pids+=($!)
# 4 slots of 8,192 tokens each: the 16-stream workloads queue on them as in issue 18's measurements, and one slot
# holds the 4,000-token prompt.
"$LLAMA_SERVER" -m "$MODEL" --port 8301 -t "$THREADS" -tb "$THREADS" -np 4 -c 32768 --no-warmup >"$OUT/llama-server.log" 2>&1 &
pids+=($!)
wait_ready http://127.0.0.1:8300/v1/health/ready
wait_ready http://127.0.0.1:8301/health
grep -m1 -o "CPU instruction set[^,]*" "$OUT/ferrite.log" || true
grep -m1 "system_info" "$OUT/llama-server.log" || true

args_of() { # workload -> loadgen arguments
  case $1 in
    decode) echo "--concurrency 1 --requests 3 --prompt-tokens 16 --output-tokens 256" ;;
    p200-c*) local c=${1#p200-c}; echo "--concurrency $c --requests $((c < 2 ? 4 : 2 * c)) --prompt-tokens 200 --output-tokens 64" ;;
    prefix-c*) local c=${1#prefix-c}
      echo "--concurrency $c --requests $((c < 2 ? 4 : 2 * c)) --prompt-tokens 600 --shared-prefix 400 --output-tokens 64" ;;
    long-*) echo "--concurrency 1 --requests 1 --prompt-tokens ${1#long-} --output-tokens 1 --timeout-s 600" ;;
    *) echo "unknown workload $1" >&2; return 1 ;;
  esac
}

seed=0
for w in $WORKLOADS; do
  for r in $(seq 1 "$ROUNDS"); do
    for s in ferrite:8300 llama-server:8301; do
      seed=$((seed + 1))
      # shellcheck disable=SC2046
      "$FERRITE" loadgen --base-url "http://127.0.0.1:${s#*:}/v1" $(args_of "$w") --seed "$seed" --json \
        >"$OUT/$w-r$r-${s%%:*}.json"
    done
  done
done

python3 - "$OUT" "$ROUNDS" $WORKLOADS <<'PY'
import json, sys
out, rounds, workloads = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def load(w, r, s):
    return json.load(open(f"{out}/{w}-r{r}-{s}.json"))
print("| workload | metric | Ferrite | llama-server | Ferrite ÷ llama-server (better > 1) |")
print("|---|---|---|---|---|")
for w in workloads:
    metrics = [("TTFT p50 ms", lambda d: d["ttft_ms"]["p50"], False)] if w.startswith("long") else [
        ("output tok/s", lambda d: d["output_tokens_per_s"], True),
        ("TTFT p50 ms", lambda d: d["ttft_ms"]["p50"], False),
        ("ITL p50 ms", lambda d: d["itl_ms"]["p50"], False),
        ("ITL p99 ms", lambda d: d["itl_ms"]["p99"], False),
    ]
    for name, get, higher in metrics:
        f = [get(load(w, r, "ferrite")) for r in range(1, rounds + 1)]
        l = [get(load(w, r, "llama-server")) for r in range(1, rounds + 1)]
        ratio = [(a / b if higher else b / a) if a and b else float("nan") for a, b in zip(f, l)]
        fmt = lambda xs: " / ".join(f"{x:.1f}" if x is not None else "-" for x in xs)
        print(f"| {w} | {name} | {fmt(f)} | {fmt(l)} | {' / '.join(f'{x:.2f}×' for x in ratio)} |")
    for r in range(1, rounds + 1):
        for s in ("ferrite", "llama-server"):
            d = load(w, r, s)
            if d["errors"]:
                print(f"  {w} round {r} {s}: {d['errors']} errors, first: {d.get('first_error')}")
PY
