"""`ferrite serve --workers N`: one command, N embedded workers behind the router."""

from __future__ import annotations

import concurrent.futures

import httpx


def test_serve_with_two_workers_spreads_a_burst_over_both(start_server):
    base = start_server("--workers", "2", "--threads", "2")
    model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]

    def one(i: int) -> str:
        r = httpx.post(
            f"{base}/v1/completions",
            json={"model": model, "prompt": f"Note {i}: the number {i * 7919} is", "max_tokens": 8, "temperature": 0, "ignore_eos": True},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        return r.headers["x-ferrite-worker"]

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        served = list(pool.map(one, range(8)))
    assert len(set(served)) == 2, served
    # The router's own metrics name both workers; the workers' series are not mixed in.
    text = httpx.get(f"{base}/metrics", timeout=10).text
    assert sum(1 for line in text.splitlines() if line.startswith("ferrite_router_routed_total{")) == 2, text
    assert "ferrite_worker_running" not in text
