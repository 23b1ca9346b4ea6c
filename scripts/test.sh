#!/usr/bin/env bash
# Runs every test: the Rust workspace (one optimized build; the model tests need optimized code), then the Python
# suite that drives `ferrite serve` with the official `openai` SDK.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --workspace "$@"
cargo build --release --bin ferrite
if [[ ! -x .venv-py/bin/python ]]; then
  python3 -m venv .venv-py
fi
.venv-py/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
.venv-py/bin/python -m pytest tests/python -q
