#!/usr/bin/env bash
# Runs every check: formatting, clippy (lints denied) on the default and the `cuda` feature sets, the Rust workspace
# tests (one optimized build, with the `cuda` feature so the CUDA code compiles and every kernel is compiled by NVRTC;
# the GPU tests skip without a device), then the Python suite that drives `ferrite serve` (and router + worker
# processes) with the official `openai` SDK.
set -euo pipefail
cd "$(dirname "$0")/.."
FEATURES="ferrite/cuda,ferrite-tests/cuda"

if [[ ! -x .venv-py/bin/python ]]; then
  python3 -m venv .venv-py
fi
# NVRTC 13.0 (not newer: driver 580's JIT takes PTX ISA <= 9.0) compiles the kernels in the tests; no GPU needed.
.venv-py/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt "nvidia-cuda-nvrtc==13.0.*"
NVRTC_LIB=$(.venv-py/bin/python -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')
export LD_LIBRARY_PATH="$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export FERRITE_REQUIRE_NVRTC=1

cargo fmt --all --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo clippy --release --workspace --all-targets --features "$FEATURES" -- -D warnings
# The binary first: tests/tests/cluster_raft.rs starts `ferrite router` and `ferrite worker` processes.
cargo build --release --bin ferrite --features cuda
cargo test --release --workspace --features "$FEATURES" "$@"
.venv-py/bin/python -m pytest tests/python -q
