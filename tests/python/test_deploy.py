"""The Helm chart against the real binary: every flag and variable the chart sets exists in `ferrite --help`; the
exact router and worker commands it renders (flags, environment, probes) run here as local processes and serve a
chat completion behind an API key; and every metric the chart's alerts and Grafana dashboard use is exported.

Needs `helm` (scripts/deploy-tools.sh installs it into .tools/bin; FERRITE_HELM overrides).
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from conftest import REPO, _free_port, _stop, _tail

CHART = REPO / "deploy" / "helm" / "ferrite"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
KEY = "sk-test-0123456789"


def _binary() -> Path:
    return Path(os.environ.get("FERRITE_BIN", REPO / "target" / "release" / "ferrite"))


def _helm() -> str:
    helm = os.environ.get("FERRITE_HELM", str(REPO / ".tools" / "bin" / "helm"))
    if not Path(helm).is_file():
        pytest.fail(f"helm not found at {helm}: run scripts/deploy-tools.sh")
    return helm


def render(*args: str) -> list[dict]:
    out = subprocess.run(
        [_helm(), "template", "ferrite", str(CHART), "--namespace", "llm", *args], check=True, capture_output=True, text=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def containers(docs: list[dict], component: str) -> list[dict]:
    """The main container of the component's StatefulSet (router or worker)."""
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"].endswith(f"-{component}")]
    return sts["spec"]["template"]["spec"]["containers"]


def help_text(sub: str) -> str:
    top = subprocess.run([str(_binary()), "--help"], check=True, capture_output=True, text=True).stdout
    return top + subprocess.run([str(_binary()), sub, "--help"], check=True, capture_output=True, text=True).stdout


VALUE_SETS = [[]] + [["-f", str(p)] for p in EXAMPLES] + [
    ["--set", "router.raft.enabled=false"],
    ["--set", "apiKeys.enabled=true", "--set", "apiKeys.keys={k1}", "--set", "apiKeys.protectMetrics=true"],
]


@pytest.mark.parametrize("values", VALUE_SETS, ids=lambda v: " ".join(v) or "default")
def test_every_flag_and_env_var_the_chart_sets_exists_in_ferrite_help(values):
    docs = render(*values)
    for component in ("router", "worker"):
        known = help_text(component)
        flags = set(re.findall(r"--[a-z][a-z0-9-]+", known))
        for c in containers(docs, component):
            words = " ".join(c.get("command", []) + c.get("args", []))
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", words):
                assert flag in flags, f"{component}: the chart passes {flag}, which `ferrite {component} --help` lacks"
            for env in c.get("env", []):
                name = env["name"]
                if name.startswith("FERRITE_"):
                    assert re.search(rf"\b{name}\b", known), f"{component}: the chart sets {name}, which `ferrite {component} --help` lacks"


def _localize(env: list[dict], values: dict[str, str], secrets: dict[str, str]) -> dict[str, str]:
    """The container's environment with its cluster addresses and paths swapped for local ones."""
    out = {}
    for e in env:
        name = e["name"]
        if "valueFrom" in e:
            out[name] = secrets.get(name, "pod-0")
        else:
            out[name] = values.get(name, str(e["value"]))
    for name, value in out.items():
        out[name] = re.sub(r"\$\((\w+)\)", lambda m: out.get(m.group(1), ""), value)
    return out


def _wait(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}\n{_tail(log)}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    pytest.fail(f"{what} not ready at {url} within {timeout:.0f} s\n{_tail(log)}")


@pytest.fixture(scope="module", params=["static", "raft"])
def chart_cluster(request):
    """One router and one CPU worker started with exactly the command, arguments and environment the chart renders
    for the CPU example (API keys on; workers listed statically, or registering with the router's raft group, whose
    container runs the chart's shell line with the pod's host name), localized: 0.0.0.0 → 127.0.0.1 with free
    ports, pod DNS names → 127.0.0.1, pod paths → temporary folders, the key Secret → a file."""
    raft = request.param == "raft"
    docs = render("-f", str(CHART / "examples" / "cpu.yaml"), "--set", f"router.raft.enabled={str(raft).lower()}",
                  "--set", "router.replicas=1", "--set", "apiKeys.enabled=true", "--set", f"apiKeys.keys={{{KEY}}}")
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    tmp = Path(tempfile.mkdtemp(prefix="ferrite-chart-"))
    (tmp / "keys").write_text(secret["stringData"]["keys"])
    (tmp / "bin").mkdir()
    (tmp / "bin" / "ferrite").symlink_to(_binary().resolve())
    grpc, metrics, http, raft_port = _free_port(), _free_port(), _free_port(), _free_port()
    model_dir = os.environ.get("FERRITE_MODEL_DIR") or str(Path.home() / ".cache" / "ferrite" / "models")
    local = {
        "FERRITE_WORKER_LISTEN": f"127.0.0.1:{grpc}",
        "FERRITE_WORKER_METRICS_LISTEN": f"127.0.0.1:{metrics}",
        "FERRITE_WORKERS": f"http://127.0.0.1:{grpc}",
        "FERRITE_ADVERTISE": f"http://127.0.0.1:{grpc}",
        "FERRITE_REGISTER_WITH": f"127.0.0.1:{raft_port}",
        "FERRITE_RAFT_LISTEN": f"127.0.0.1:{raft_port}",
        "FERRITE_RAFT_ADVERTISE": f"127.0.0.1:{raft_port}",
        "FERRITE_RAFT_PEERS": f"1=127.0.0.1:{raft_port}",
        "FERRITE_DATA_DIR": str(tmp / "data"),
        "FERRITE_HOST": "127.0.0.1",
        "FERRITE_PORT": str(http),
        "FERRITE_MODEL_DIR": model_dir,
        "FERRITE_KERNEL_CACHE_DIR": str(tmp / "kernels"),
        "FERRITE_API_KEY_FILE": str(tmp / "keys"),
        "HOME": str(tmp),
        "FERRITE_LOG_FORMAT": "text",
    }
    procs = []
    try:
        for component in ("router", "worker") if raft else ("worker", "router"):
            (c,) = containers(docs, component)
            env = _localize(c["env"], local, {})
            # Every cluster address must have been localized, or the test would talk to a cluster.
            for k, v in env.items():
                assert "0.0.0.0" not in v and ".svc" not in v, (component, k, v)
            argv = c.get("command", []) + c.get("args", [])
            assert (argv[0] == "/bin/sh") == (raft and component == "router"), argv
            if argv[0] != "/bin/sh":
                argv = ["ferrite", *argv]
            log = tmp / f"{component}.log"
            full_env = {"PATH": f"{tmp / 'bin'}:{os.environ.get('PATH', '')}", "HOSTNAME": f"ferrite-{component}-0", **env}
            with open(log, "wb") as f:
                procs.append((subprocess.Popen(argv, env=full_env, stdout=f, stderr=subprocess.STDOUT, cwd=tmp), log))
            if component == "worker":
                probe = c["readinessProbe"]["httpGet"]
                _wait(f"http://127.0.0.1:{metrics}{probe['path']}", procs[-1][0], log, component)
        (router,) = containers(docs, "router")
        probe = router["readinessProbe"]["httpGet"]
        _wait(f"http://127.0.0.1:{http}{probe['path']}", procs[0 if raft else 1][0], tmp / "router.log", "router")
        yield {"base": f"http://127.0.0.1:{http}", "worker_metrics": f"http://127.0.0.1:{metrics}", "docs": docs, "mode": request.param}
    finally:
        for p, _ in procs:
            _stop(p)


def test_the_chart_commands_serve_a_chat_completion_behind_an_api_key(chart_cluster):
    base = chart_cluster["base"]
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8)
    assert r.choices[0].message.content
    assert r.usage.completion_tokens > 0


def test_a_missing_or_wrong_api_key_is_refused_with_401(chart_cluster):
    base = chart_cluster["base"]
    for key in ("sk-wrong", KEY + "x"):
        bad = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.code == "invalid_api_key"
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": "x", "messages": []}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    # Probes and (unprotected) metrics stay open.
    assert httpx.get(f"{base}/v1/health/ready", timeout=10).status_code == 200
    assert httpx.get(f"{base}/metrics", timeout=10).status_code == 200


def test_the_chart_probes_answer_on_the_rendered_paths(chart_cluster):
    for component, port_of in (("worker", {"metrics": chart_cluster["worker_metrics"]}), ("router", {"http": chart_cluster["base"]})):
        (c,) = containers(chart_cluster["docs"], component)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = c[probe]["httpGet"]
            r = httpx.get(port_of[get["port"]] + get["path"], timeout=10)
            assert r.status_code == 200, (component, probe, r.text)


def _used_metrics() -> set[str]:
    """Metric names in the PrometheusRule and the Grafana dashboard (histogram suffixes stripped)."""
    docs = render("--set", "metrics.prometheusRule.enabled=true")
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    dashboard = json.loads((CHART / "dashboards" / "ferrite.json").read_text())
    for panel in dashboard["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
    for var in dashboard.get("templating", {}).get("list", []):
        if isinstance(var.get("query"), str):
            exprs.append(var["query"])
    names = set()
    for e in exprs:
        for n in re.findall(r"\b(ferrite_[a-z0-9_]+|raft_[a-z0-9_]+)\b", e):
            names.add(re.sub(r"_(bucket|sum|count)$", "", n))
    return names


def test_every_metric_the_alerts_and_dashboard_use_is_exported(chart_cluster):
    used = _used_metrics()
    assert len(used) >= 10, used
    client = openai.OpenAI(base_url=f"{chart_cluster['base']}/v1", api_key=KEY, max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    # One streamed request so every histogram and counter has a sample.
    for _ in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True):
        pass
    text = httpx.get(f"{chart_cluster['base']}/metrics", timeout=10).text + httpx.get(
        f"{chart_cluster['worker_metrics']}/metrics", timeout=10
    ).text
    exported = set(re.findall(r"^# TYPE (\w+) ", text, re.M))
    if chart_cluster["mode"] == "static":
        # Without raft there is no control plane to report on.
        used = {m for m in used if not m.startswith("ferrite_cluster_")}
    missing = sorted(used - exported)
    assert not missing, f"used by the chart's alerts or dashboard but not exported: {missing}"


def _self_signed(tmp: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 signed by it (PEM files: CA, certificate, key), as a
    cluster's cert-manager would mount them. (webpki refuses a CA certificate used as the server's own.)"""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject: str, issuer: x509.Name | None, issuer_key, public_key, ca: bool) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        b = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = build("ferrite-test-ca", None, ca_key, ca_key.public_key(), True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build("127.0.0.1", ca.subject, ca_key, key.public_key(), False)
    ca_path, cert_path, key_path = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_path, cert_path, key_path


def test_https_with_tls_cert_and_key_serves_the_openai_sdk():
    if os.environ.get("FERRITE_BASE_URL"):
        pytest.skip("needs to start its own server")
    tmp = Path(tempfile.mkdtemp(prefix="ferrite-tls-"))
    ca, cert, key = _self_signed(tmp)
    trust = ssl.create_default_context(cafile=str(ca))
    port = _free_port()
    log = tmp / "serve.log"
    cmd = [str(_binary()), "serve", "--host", "127.0.0.1", "--port", str(port), "--tls-cert", str(cert), "--tls-key", str(key)]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, _tail(log)
            try:
                if httpx.get(f"https://127.0.0.1:{port}/v1/health/ready", verify=trust, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        else:
            pytest.fail(f"HTTPS server not ready\n{_tail(log)}")
        client = openai.OpenAI(
            base_url=f"https://127.0.0.1:{port}/v1", api_key="none", max_retries=0, http_client=httpx.Client(verify=trust, timeout=60)
        )
        model = client.models.list().data[0].id
        r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
        assert r.choices[0].text
        # Plain HTTP on the HTTPS port gets no answer it can read; an unverified client refuses the certificate.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"https://127.0.0.1:{port}/v1/models", timeout=5)
    finally:
        _stop(proc)


def _sample(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.M)
    assert m, f"{name}{labels} not in the scrape"
    return float(m.group(1))


def test_router_token_and_latency_metrics_count_a_request(chart_cluster):
    base = chart_cluster["base"]
    before = httpx.get(f"{base}/metrics", timeout=10).text
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    r = client.completions.create(model=model, prompt="Count: one, two,", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    after = httpx.get(f"{base}/metrics", timeout=10).text

    def delta(name: str) -> float:
        return _sample(after, name) - _sample(before, name)

    assert delta("ferrite_router_generated_tokens_total") == r.usage.completion_tokens == 6
    assert delta("ferrite_router_prompt_tokens_total") == r.usage.prompt_tokens
    assert _sample(after, "ferrite_router_finished_total", '{finish_reason="length"}') >= 1
    # 6 tokens in 6 chunks: 5 gaps between them.
    assert delta("ferrite_router_itl_seconds_count") >= 5


def test_grpc_between_router_and_worker_runs_over_tls():
    """`ferrite worker --tls-cert/--tls-key` and `ferrite router --worker https://... --worker-ca`: requests flow; a
    router that does not trust the worker's certificate never routes to it."""
    if os.environ.get("FERRITE_BASE_URL"):
        pytest.skip("needs to start its own processes")
    tmp = Path(tempfile.mkdtemp(prefix="ferrite-grpc-tls-"))
    ca, cert, key = _self_signed(tmp)
    (tmp / "other").mkdir()
    other, _, _ = _self_signed(tmp / "other")
    grpc, metrics = _free_port(), _free_port()
    procs = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = tmp / f"{name}.log"
        with open(log, "wb") as f:
            p = subprocess.Popen([str(_binary()), *args], stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        procs.append((p, log))
        return p

    try:
        w = start("worker", "worker", "--listen", f"127.0.0.1:{grpc}", "--metrics-listen", f"127.0.0.1:{metrics}",
                  "--threads", "1", "--tls-cert", str(cert), "--tls-key", str(key))
        _wait(f"http://127.0.0.1:{metrics}/health/ready", w, tmp / "worker.log", "worker")
        good, bad = _free_port(), _free_port()
        r = start("router", "router", "--port", str(good), "--worker", f"https://127.0.0.1:{grpc}", "--worker-ca", str(ca))
        _wait(f"http://127.0.0.1:{good}/v1/health/ready", r, tmp / "router.log", "router")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{good}/v1", api_key="none", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        out = client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0)
        assert out.usage.completion_tokens > 0
        # Trusting another CA: the handshake fails, so the worker is never ready for this router.
        r2 = start("router2", "router", "--port", str(bad), "--worker", f"https://127.0.0.1:{grpc}", "--worker-ca", str(other))
        time.sleep(3)
        assert r2.poll() is None, _tail(tmp / "router2.log")
        assert httpx.get(f"http://127.0.0.1:{bad}/v1/health/ready", timeout=10).status_code == 503
        # An https:// worker with no CA to check it against is a configuration error.
        r3 = start("router3", "router", "--port", str(_free_port()), "--worker", f"https://127.0.0.1:{grpc}")
        assert r3.wait(timeout=30) != 0, "an https:// worker without --worker-ca must be refused at start"
    finally:
        for p, _ in procs:
            _stop(p)
