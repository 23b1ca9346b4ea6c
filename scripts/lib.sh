# Helpers shared by the benchmark scripts (sourced, not run).

# Waits up to 120 s for a URL to answer (a server's health check).
wait_ready() { # url
  for _ in $(seq 1 120); do
    curl -sf "$1" >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "server at $1 did not become ready" >&2
  return 1
}
