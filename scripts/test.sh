#!/usr/bin/env bash
# Runs every test of the workspace: one optimized build (the model tests need optimized code), then the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --workspace "$@"
