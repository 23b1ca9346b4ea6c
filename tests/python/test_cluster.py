"""The official openai SDK through every router of a raft cluster: three `ferrite router --raft-id` processes (one
bootstraps, two join) and two CPU workers (one thread each) that register with `--register-with`. Chat completions
succeed through each router, and `GET /v1/cluster` agrees on all three (leader, voters, workers and their epochs).
Every wait is bounded; the processes are stopped at the end.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import DEFAULT_MODEL_ID, REPO, _free_port, _stop, _tail


def _binary() -> Path:
    return Path(os.environ.get("FERRITE_BIN", REPO / "target" / "release" / "ferrite"))


def _wait(what: str, limit_s: float, probe):
    """Calls `probe` every 0.2 s until it returns something truthy; fails after `limit_s`."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            got = probe()
        except httpx.HTTPError:
            got = None
        if got:
            return got
        time.sleep(0.2)
    pytest.fail(f"timed out after {limit_s:.0f} s waiting for {what}")


def _summary(view: dict) -> tuple:
    """What every router must agree on: leader, voters, and each worker's address, state and epoch."""
    voters = sorted(r["id"] for r in view["routers"] if r["membership"] == "voter")
    workers = sorted((w["addr"], w["state"], w["epoch"]) for w in view["workers"])
    return view["leader_id"], voters, workers


@pytest.fixture
def cluster():
    if os.environ.get("FERRITE_BASE_URL"):
        pytest.skip("starts its own routers and workers")
    if not _binary().is_file():
        pytest.fail(f"server binary not found: {_binary()} (build with `cargo build --release --bin ferrite`)")
    tmp = Path(tempfile.mkdtemp(prefix="ferrite-raft-"))
    procs: list[tuple[subprocess.Popen, Path]] = []

    def spawn(name: str, args: list[str]) -> None:
        log = tmp / f"{name}.log"
        with open(log, "wb") as f:
            procs.append((subprocess.Popen([str(_binary()), *args], stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL), log))

    raft = {i: f"127.0.0.1:{_free_port()}" for i in (1, 2, 3)}
    http = {i: _free_port() for i in (1, 2, 3)}
    peers = [a for i, addr in raft.items() for a in ("--raft-peer", f"{i}={addr}")]
    for i in (1, 2, 3):
        args = ["router", "--host", "127.0.0.1", "--port", str(http[i]), "--raft-id", str(i), "--raft-listen", raft[i]]
        args += ["--data-dir", str(tmp / f"data{i}"), *peers] + (["--bootstrap"] if i == 1 else [])
        spawn(f"router{i}", args)
    workers = []
    for n in range(2):
        port = _free_port()
        addr = f"http://127.0.0.1:{port}"
        workers.append(addr)
        spawn(f"worker{n}", ["worker", "--backend", "cpu", "--threads", "1", "--kv-cache-mib", "32", "--listen", f"127.0.0.1:{port}",
                             "--advertise", addr, "--register-with", ",".join(raft.values())])
    try:
        yield {"http": http, "workers": workers}
    except BaseException:
        for p, log in procs:
            print(f"--- {log.name} ---\n{_tail(log)}")
        raise
    finally:
        for p, _ in procs:
            _stop(p)


def test_openai_sdk_through_every_router_and_the_cluster_view_agrees(cluster):
    views = lambda: [httpx.get(f"http://127.0.0.1:{port}/v1/cluster", timeout=2.0).json() for port in cluster["http"].values()]

    def agreed():
        s = [_summary(v) for v in views()]
        want = sorted(cluster["workers"])
        ok = s[0][0] is not None and s[0][1] == [1, 2, 3] and [w[0] for w in s[0][2]] == want
        return ok and all(w[1] == "active" for w in s[0][2]) and all(x == s[0] for x in s)

    _wait("three routers agreeing on a leader, three voters and two active workers", 120, agreed)
    for i, port in cluster["http"].items():
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60.0, max_retries=0)
        # A router admits a worker its cluster lists once its gRPC `Info` check passed: wait for the first success.
        def chat():
            try:
                return client.chat.completions.create(
                    model=DEFAULT_MODEL_ID, messages=[{"role": "user", "content": f"Say hello to router {i}."}], max_tokens=8, temperature=0
                )
            except openai.APIStatusError as e:
                assert e.status_code == 503, e
                return None

        r = _wait(f"a chat completion through router {i}", 30, chat)
        assert r.choices[0].message.content, r
        assert r.usage.completion_tokens > 0, r
    # After the traffic, every router still shows the same cluster.
    assert agreed(), [_summary(v) for v in views()]
