#!/usr/bin/env bash
# Builds (here, with the `cuda` feature) everything scripts/gpu-check.sh runs on a GPU machine and packs it into
# .gpu/ (git-ignored): the ferrite binary, the kernel parity and CUDA reference test binaries and the kernels crate's
# unit tests (cuBLASLt descriptors and handle, NVRTC compilation; xz-compressed), the
# transformers reference, and the default model split in two parts (a GPU call carries at most 64 MiB, the model is
# 94 MiB: carry `.gpu` with part a, then `.gpu/model.part-b` in the next call while the machine is warm).
set -euo pipefail
cd "$(dirname "$0")/.."
FEATURES="ferrite/cuda,ferrite-tests/cuda"
rm -rf .gpu && mkdir -p .gpu/reference

bins() { # cargo args... -> executable paths of the built test targets
  cargo test --release --no-run --message-format=json "$@" 2>/dev/null |
    python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])'
}
libtests() { # cargo args... -> executable path of the selected library's unit tests
  cargo test --release --no-run --message-format=json "$@" 2>/dev/null |
    python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"] and m["profile"]["test"]:
        print(m["executable"])'
}
cargo build --release -p ferrite --bin ferrite --features cuda
cp target/release/ferrite .gpu/ferrite
cp "$(bins --workspace --features "$FEATURES" --test parity)" .gpu/parity
cp "$(bins --workspace --features "$FEATURES" --test cuda_reference)" .gpu/cuda_reference
cp "$(libtests -p ferrite-kernels --features ferrite-kernels/cuda --lib)" .gpu/kernels
xz -T2 -6 .gpu/ferrite .gpu/parity .gpu/cuda_reference .gpu/kernels
cp tests/data/reference/reference.json tests/data/reference/logits_*.f32 .gpu/reference/
model=$(scripts/fetch-model.sh)
head -c 50000000 "$model" > .gpu/model.part-a
tail -c +50000001 "$model" > .gpu/model.part-b
du -sh .gpu/* | sort -h
