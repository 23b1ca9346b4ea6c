#!/usr/bin/env python3
"""Raft control-plane figures for BENCHMARKS.md (standard library only).

Starts 3 `ferrite router --raft-id` processes and 2 CPU workers (one thread each) on loopback, then:
  1. leader failover: SIGKILL the leader KILLS times (default 10), each time timing from the kill until both survivors
     agree on a new leader (polling GET /v1/cluster every 20 ms), then restarting the killed router from its data
     directory; checks the workers keep their registration (same epoch) through every kill;
  2. requests through a leader kill: 2 loops of short greedy completions (max_tokens 2) against the survivors' HTTP
     ports while the leader is killed (requests to the killed router are not sent);
  3. dead worker: SIGKILL a worker and time until every router lists it dead (it leaves routing then).

Usage: scripts/bench-failover.py [--kills 10] [--bin target/release/ferrite]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def view(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/cluster", timeout=1) as r:
            return json.load(r)
    except (OSError, ValueError):
        return None


def complete(port: int, prompt: str) -> int | None:
    body = json.dumps({"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True})
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body.encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def wait(what: str, limit: float, probe, every: float = 0.02):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        got = probe()
        if got:
            return got
        time.sleep(every)
    raise SystemExit(f"timed out after {limit} s waiting for {what}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--bin", default=os.environ.get("FERRITE_BIN", str(REPO / "target" / "release" / "ferrite")))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ferrite-bench-failover-"))
    raft = {i: f"127.0.0.1:{free_port()}" for i in (1, 2, 3)}
    http = {i: free_port() for i in (1, 2, 3)}
    peers = [x for i, addr in raft.items() for x in ("--raft-peer", f"{i}={addr}")]
    procs: dict[str, subprocess.Popen] = {}

    def spawn(name: str, args: list[str]) -> None:
        log = open(tmp / f"{name}.log", "ab")
        procs[name] = subprocess.Popen([a.bin, *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def router(i: int, bootstrap: bool = False) -> None:
        args = ["router", "--host", "127.0.0.1", "--port", str(http[i]), "--raft-id", str(i), "--raft-listen", raft[i]]
        spawn(f"router{i}", args + ["--data-dir", str(tmp / f"data{i}"), *peers] + (["--bootstrap"] if bootstrap else []))

    def agreed(ids) -> int | None:
        vs = [view(http[i]) for i in ids]
        if any(v is None for v in vs):
            return None
        seen = {(v["leader_id"], tuple(sorted(r["id"] for r in v["routers"] if r["membership"] == "voter"))) for v in vs}
        (leader, voters), = seen if len(seen) == 1 else ((None, ()),)
        return leader if leader and voters == (1, 2, 3) else None

    def workers(i: int) -> list[tuple[str, str, int]]:
        v = view(http[i]) or {"workers": []}
        return sorted((w["addr"], w["state"], w["epoch"]) for w in v["workers"])

    try:
        for i in (1, 2, 3):
            router(i, bootstrap=i == 1)
        wait("three routers agreeing", 60, lambda: agreed((1, 2, 3)))
        waddrs = []
        for n in range(2):
            port = free_port()
            waddrs.append(f"http://127.0.0.1:{port}")
            spawn(f"worker{n}", ["worker", "--backend", "cpu", "--threads", "1", "--kv-cache-mib", "32", "--listen", f"127.0.0.1:{port}",
                                 "--advertise", waddrs[-1], "--register-with", ",".join(raft.values())])
        wait("two active workers on every router", 120,
             lambda: all([w[1] for w in workers(i)] == ["active", "active"] for i in (1, 2, 3)), every=0.2)
        registrations = workers(1)
        for i in (1, 2, 3):
            wait(f"a completion through router {i}", 30, lambda i=i: complete(http[i], "Hi") == 200, every=0.2)

        # 1 + 2: leader kills; the load runs during the first one.
        failovers, lost, load_result = [], 0, None
        for k in range(a.kills):
            leader = wait("agreement", 30, lambda: agreed((1, 2, 3)))
            survivors = [i for i in (1, 2, 3) if i != leader]
            stop, results, threads = threading.Event(), [], []
            if k == 0:
                def loop(port: int) -> None:
                    n = 0
                    while not stop.is_set():
                        results.append(complete(port, f"Request {n}:"))
                        n += 1
                threads = [threading.Thread(target=loop, args=(http[i],)) for i in survivors]
                for t in threads:
                    t.start()
                time.sleep(2)
            procs[f"router{leader}"].send_signal(signal.SIGKILL)
            procs[f"router{leader}"].wait()
            t0 = time.monotonic()

            def new_leader():
                vs = [view(http[i]) for i in survivors]
                ls = {v["leader_id"] if v else None for v in vs}
                (l,) = ls if len(ls) == 1 else (None,)
                return l if l and l != leader else None

            wait("a new leader", 30, new_leader)
            failovers.append(time.monotonic() - t0)
            if k == 0:
                time.sleep(3)
                stop.set()
                for t in threads:
                    t.join()
                ok = sum(1 for r in results if r == 200)
                load_result = (ok, len(results))
            if any(w for w in workers(survivors[0]) if w not in registrations):
                lost += 1
            router(leader)
            wait("the killed router back", 60, lambda: agreed((1, 2, 3)))

        unchanged = all(workers(i) == registrations for i in (1, 2, 3))

        # 3: a dead worker leaves routing.
        procs["worker1"].send_signal(signal.SIGKILL)
        procs["worker1"].wait()
        t0 = time.monotonic()
        wait("the worker dead on every router", 30,
             lambda: all(any(w[0] == waddrs[1] and w[1] == "dead" for w in workers(i)) for i in (1, 2, 3)))
        dead_s = time.monotonic() - t0

        f = sorted(failovers)
        print(f"leader failover over {len(f)} kills: p50 {statistics.median(f):.2f} s, max {f[-1]:.2f} s "
              f"(all: {', '.join(f'{x:.2f}' for x in failovers)})")
        print(f"registrations lost through the kills: {lost} (same workers, states and epochs on all 3 routers after the kills: {unchanged})")
        ok, total = load_result
        print(f"requests to the survivors through a leader kill: {ok}/{total} succeeded ({100 * ok / max(total, 1):.1f} %)")
        print(f"dead worker out of routing (listed dead on all 3 routers) after {dead_s:.2f} s (lease 5 s)")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        print(f"logs: {tmp}")


if __name__ == "__main__":
    main()
