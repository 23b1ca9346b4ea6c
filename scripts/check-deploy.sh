#!/usr/bin/env bash
# Checks the Helm chart: `helm lint --strict`, then `helm template` with the default values and every example, each
# rendering validated against the Kubernetes schemas (kubernetes-validate, strict: unknown fields fail) and linted
# as YAML. The Prometheus Operator kinds (ServiceMonitor, PrometheusRule) have no bundled schema; their content is
# checked by tests/python/test_deploy.py (every metric they use exists). Tools: scripts/deploy-tools.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deploy-tools.sh >/dev/null
HELM=.tools/bin/helm
CHART=deploy/helm/ferrite
KUBE_VERSION=1.34.0
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

$HELM lint --strict "$CHART"
for values in "" "$CHART"/examples/*.yaml; do
  name=$(basename "${values:-default}" .yaml)
  # Everything optional switched on, so every template renders at least once.
  $HELM template ferrite "$CHART" --namespace llm --kube-version "$KUBE_VERSION" ${values:+-f "$values"} \
    --set metrics.serviceMonitor.enabled=true --set metrics.prometheusRule.enabled=true \
    --set metrics.grafanaDashboard.enabled=true >"$out/$name.yaml"
  .tools/venv/bin/kubernetes-validate --strict --quiet -k "$KUBE_VERSION" "$out/$name.yaml" 2>&1 \
    | { grep -v "Couldn't find schema for kind \(ServiceMonitor\|PrometheusRule\)" || true; } | tee "$out/$name.log"
  if [[ -s "$out/$name.log" ]]; then
    echo "kubernetes-validate: $name failed" >&2
    exit 1
  fi
  .tools/venv/bin/yamllint -d '{extends: relaxed, rules: {line-length: disable, indentation: {indent-sequences: whatever}}}' "$out/$name.yaml"
  echo "chart ok with ${values:-default values}"
done
