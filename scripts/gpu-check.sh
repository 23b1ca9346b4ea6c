#!/usr/bin/env bash
# The whole GPU check in one go, on a GPU machine with no Rust toolchain and no network (driver 580 / CUDA 13, the
# CUDA libraries from pip wheels, PyTorch for the baseline). Run scripts/gpu-pack.sh on a development machine first
# and bring .gpu/ along. Steps (GPU_CHECK_STEPS, comma-separated, default all):
#   parity     kernel parity against the CPU twins on fresh random inputs (FERRITE_REQUIRE_CUDA=1: no skipping)
#   kernels    the kernels crate's CUDA unit tests: cuBLASLt descriptors and handle (FERRITE_REQUIRE_CUDA=1: the
#              library must load and the handle open), NVRTC compilation and the kernel cache (FERRITE_REQUIRE_NVRTC=1)
#   reference  the default model end to end against the transformers reference (needs both model parts)
#   bench      `ferrite gpu-bench`: Llama-3.1-8B shape, random bf16 weights, decode at batch 1/8/32/64 with 1k
#              context, 1k-token prefill, next to the card's measured copy bandwidth and GEMM rate
#   nccl       the same with the all-reduces through NCCL at world size 1, plus an all-reduce of 8 KiB to 2 MiB
#   torch      the PyTorch eager baseline of the same shape on the same card (scripts/gpu/torch_baseline.py)
#   small      `ferrite gpu-bench` on the default model (needs both model parts)
#   serve      `ferrite serve --backend cuda` on the default model, one chat completion over HTTP
# Logs and JSON go to $OUT (default .gpu/out); the last lines printed are a summary.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=.gpu
OUT=${OUT:-$DIR/out}
STEPS=${GPU_CHECK_STEPS:-parity,kernels,reference,bench,nccl,torch,small,serve}
mkdir -p "$OUT"

for f in "$DIR"/*.xz; do
  [[ -e $f ]] || continue
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$f" "${f%.xz}"
  chmod +x "${f%.xz}"
done
if [[ -f $DIR/model.part-a && -f $DIR/model.part-b ]]; then
  cat "$DIR/model.part-a" "$DIR/model.part-b" > "$DIR/model.gguf"
fi

# CUDA libraries: the driver's libcuda, and cuBLAS / NVRTC from the Python environment's nvidia wheels.
NV=$(python3 -c 'import nvidia, os; print(list(nvidia.__path__)[0])' 2>/dev/null || true)
LIBS=$( [[ -n $NV ]] && find "$NV" -maxdepth 3 -type d -name lib | tr '\n' ':')
# The NCCL wheel ships libnccl.so.2; cudarc looks for libnccl.so.
mkdir -p "$DIR/lib"
NCCL=$( [[ -n $NV ]] && find "$NV" -name 'libnccl.so.2' | head -n 1)
[[ -n $NCCL ]] && ln -sf "$NCCL" "$DIR/lib/libnccl.so"
export LD_LIBRARY_PATH="$PWD/$DIR/lib:${LIBS}/usr/local/nvidia/lib64:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export FERRITE_REQUIRE_CUDA=1 RUST_BACKTRACE=1

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit: /' | tee -a "$OUT/gpu.txt"

SUMMARY=()
step() { # name, command...
  local name=$1 t0=$SECONDS rc
  shift
  echo "=== $name: $*"
  "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 40 "$OUT/$name.log"
  SUMMARY+=("$name: rc=$rc ($((SECONDS - t0)) s)")
}
want() { [[ ",$STEPS," == *",$1,"* ]]; }

want parity && step parity "$DIR/parity" --test-threads=1 --nocapture
want kernels && FERRITE_REQUIRE_NVRTC=1 step kernels "$DIR/kernels" cuda:: --test-threads=1 --nocapture
if want reference; then
  if [[ -f $DIR/model.gguf ]]; then
    FERRITE_MODEL=$DIR/model.gguf FERRITE_REFERENCE_DIR=$DIR/reference \
      step reference "$DIR/cuda_reference" --test-threads=1 --nocapture
  else
    SUMMARY+=("reference: not run (model parts missing)")
  fi
fi
serve_smoke() {
  "$DIR/ferrite" serve --backend cuda --model "$DIR/model.gguf" --port 18080 --served-model-name smollm2 &
  local pid=$! ok=1
  for _ in $(seq 1 60); do
    python3 -c 'import urllib.request; urllib.request.urlopen("http://127.0.0.1:18080/health")' 2>/dev/null && break
    sleep 1
  done
  python3 - <<'PY' && ok=0
import json, urllib.request
body = {"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 24, "temperature": 0}
req = urllib.request.Request("http://127.0.0.1:18080/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
out = json.load(urllib.request.urlopen(req, timeout=60))
print(json.dumps(out, indent=1))
assert "Paris" in out["choices"][0]["message"]["content"]
# Sampled on the device (no logprobs) and on the host (logprobs): one seed, the same tokens.
def sampled(logprobs):
    body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 32, "temperature": 0.9, "top_p": 0.9,
            "presence_penalty": 0.5, "seed": 7, "n": 2, "logprobs": 1 if logprobs else None}
    req = urllib.request.Request("http://127.0.0.1:18080/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    return [c["text"] for c in json.load(urllib.request.urlopen(req, timeout=60))["choices"]]
device, host = sampled(False), sampled(True)
print("device-sampled:", device, "\nhost-sampled:  ", host)
assert device == host and device[0] != device[1]
# Structured output on the device path: a JSON Schema answer parses and has the required fields and types.
schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "population": {"type": "integer"}},
          "required": ["city", "population"], "additionalProperties": False}
body = {"model": "smollm2", "messages": [{"role": "user", "content": "The largest city of France, as JSON."}], "max_tokens": 64,
        "temperature": 0.7, "seed": 3, "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}}
req = urllib.request.Request("http://127.0.0.1:18080/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
answer = json.loads(json.load(urllib.request.urlopen(req, timeout=60))["choices"][0]["message"]["content"])
print("json_schema answer:", answer)
assert set(answer) == {"city", "population"} and isinstance(answer["city"], str) and isinstance(answer["population"], int)
PY
  kill $pid; wait $pid 2>/dev/null
  return $ok
}
want bench && step bench "$DIR/ferrite" gpu-bench --json-out "$OUT/ferrite_8b.json"
want nccl && step nccl "$DIR/ferrite" gpu-bench --nccl --batch 1,64 --steps 10 --json-out "$OUT/ferrite_nccl.json"
want torch && step torch python3 scripts/gpu/torch_baseline.py --out "$OUT/torch.json"
if [[ -f $DIR/model.gguf ]]; then
  want small && step small "$DIR/ferrite" gpu-bench --model "$DIR/model.gguf" --json-out "$OUT/ferrite_small.json"
  want serve && step serve serve_smoke
fi

echo "=== summary"
cat "$OUT/gpu.txt"
printf '%s\n' "${SUMMARY[@]}"
[ -f "$OUT/ferrite_8b.json" ] && python3 scripts/gpu/goals.py "$OUT/ferrite_8b.json" "$OUT/torch.json"
grep -h -E "rel err|FAILED|panicked|test result" "$OUT"/parity.log "$OUT"/kernels.log 2>/dev/null | grep -v " ok" | tail -n 12
# Start-up kernel choices (tuner) and anything it rejected, from the benchmark and reference logs.
grep -h -E "paged attention|prefill attention|decode linear layers|^  \([0-9]+, [0-9]+\): |programmatic dependent launch|disagrees|not used|cuBLASLt|kernel tuning done|CUDA kernels loaded" \
  "$OUT"/bench.log "$OUT"/reference.log 2>/dev/null | cut -c1-700 | sort -u | head -n 24
