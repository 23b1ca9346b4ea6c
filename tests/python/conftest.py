"""Fixtures for the end-to-end suite: one `ferrite serve` process for the whole session.

Environment:
  FERRITE_BIN            server binary (default: <repo>/target/release/ferrite)
  FERRITE_REFERENCE_DIR  directory holding reference.json (default: <repo>/tests/data/reference)
  FERRITE_BASE_URL       use an already running server instead of starting one (it must have been
                         started with `--served-model-name test-alias`)
  FERRITE_READY_TIMEOUT  seconds to wait for /v1/health/ready (default 60)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

REPO = Path(__file__).resolve().parents[2]
ALIAS = "test-alias"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
REQUEST_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _start_server(extra_args: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str, Path]:
    binary = Path(os.environ.get("FERRITE_BIN", REPO / "target" / "release" / "ferrite"))
    if not binary.is_file():
        pytest.fail(f"server binary not found: {binary} (build with `cargo build --release --bin ferrite` or set FERRITE_BIN)")
    ready_timeout = float(os.environ.get("FERRITE_READY_TIMEOUT", "60"))
    log = Path(tempfile.mkstemp(prefix="ferrite-serve-", suffix=".log")[1])
    last_error = ""
    # The port is picked, then bound by the server: retry if someone else took it in between.
    for _attempt in range(3):
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [str(binary), "serve", "--host", "127.0.0.1", "--port", str(port), "--served-model-name", ALIAS, *extra_args]
        with open(log, "ab") as f:
            f.write(f"$ {' '.join(cmd)}\n".encode())
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                last_error = f"server exited with {proc.returncode}"
                break
            try:
                if httpx.get(f"{base}/v1/health/ready", timeout=2.0).status_code == 200:
                    return proc, base, log
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        else:
            last_error = f"not ready within {ready_timeout:.0f} s"
            _stop(proc)
            break  # a slow start will not get faster on another port
    pytest.fail(f"ferrite serve failed to start: {last_error}\n--- log {log} ---\n{_tail(log)}")


@pytest.fixture(scope="session")
def base_url():
    """Base URL (no /v1) of a ready server."""
    external = os.environ.get("FERRITE_BASE_URL")
    if external:
        yield external.rstrip("/")
        return
    proc, base, log = _start_server()
    try:
        yield base
    finally:
        _stop(proc)
        if os.environ.get("FERRITE_KEEP_LOG"):
            print(f"\nferrite serve log: {log}")
        else:
            log.unlink(missing_ok=True)


@pytest.fixture
def start_server():
    """Starts extra `ferrite serve` processes with more arguments (stopped at the end of the test): returns the base
    URL. Skipped when the suite runs against an external server."""
    if os.environ.get("FERRITE_BASE_URL"):
        pytest.skip("needs to start its own server")
    started = []

    def start(*extra_args: str) -> str:
        proc, base, log = _start_server(tuple(extra_args))
        started.append((proc, log))
        return base

    yield start
    for proc, log in started:
        _stop(proc)
        log.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def client(base_url) -> openai.OpenAI:
    # No retries: a 429/5xx must surface as a failure, not be hidden by the SDK's backoff.
    c = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)
    yield c
    c.close()


@pytest.fixture(scope="session")
def http(base_url) -> httpx.Client:
    with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as c:
        yield c


@pytest.fixture(scope="session")
def models_list(http) -> dict:
    r = http.get("/v1/models")
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="session")
def model(models_list) -> str:
    """The served model's own id (not the alias)."""
    ids = [m["id"] for m in models_list["data"]]
    if DEFAULT_MODEL_ID in ids:
        return DEFAULT_MODEL_ID
    others = [i for i in ids if i != ALIAS]
    assert others, f"/v1/models lists no model besides the alias: {ids}"
    return others[0]


def reference_dir() -> Path:
    return Path(os.environ.get("FERRITE_REFERENCE_DIR", REPO / "tests" / "data" / "reference"))


def load_reference() -> dict:
    path = reference_dir() / "reference.json"
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def reference() -> dict:
    return load_reference()
