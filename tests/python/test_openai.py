"""End-to-end tests of `ferrite serve` through the official `openai` client (plus raw httpx where the SDK hides
the wire format). Every request is greedy or seeded and bounded (max_tokens <= 32, except the disconnect tests,
which end their requests early).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout

import httpx
import openai
import pytest

from conftest import ALIAS, REPO, REQUEST_TIMEOUT_S, _free_port, _stop, load_reference

EOS_ID = 2
IM_END = "<|im_end|>"

try:
    _REF = load_reference()
    CASES = _REF["cases"]
except OSError as e:  # reported by test_reference_available; parametrized tests collect as empty
    _REF, CASES = None, {}
    _REF_ERROR = str(e)

COMPLETION_CASES = sorted(k for k, c in CASES.items() if c["kind"] == "completion")
CHAT_CASES = sorted(k for k, c in CASES.items() if c["kind"] == "chat")


def expected_text(case: dict) -> str:
    """Reference text as the server returns it: special tokens skipped (the reference decodes the eos as <|im_end|>)."""
    text = case["greedy_text"]
    if text.endswith(IM_END):
        text = text[: -len(IM_END)]
    assert IM_END not in text
    return text


def expected_finish(case: dict) -> str:
    return "stop" if case["greedy_ids"][-1] == EOS_ID else "length"


def limerick() -> list[dict]:
    return CASES["chat_limerick"]["messages"]


def once_upon_text() -> str:
    return CASES["once_upon"]["greedy_text"]


def stream_choices(client, chat: bool, **kw) -> tuple[dict[int, dict], list]:
    """Streams a completion (or chat completion) and assembles it per choice index: ({index: {"text", "finish",
    "logprobs", "chunks"}}, chunks). Checks that a choice gets nothing after its finish_reason, and (chat) that each
    choice's first chunk carries the assistant role. "logprobs" holds the non-empty logprobs of the choice's chunks in
    order (completions: the chunk's `logprobs` object; chat: the entries of `logprobs.content`)."""
    create = client.chat.completions.create if chat else client.completions.create
    choices: dict[int, dict] = {}
    chunks = []
    with create(stream=True, **kw) as stream:
        for chunk in stream:
            chunks.append(chunk)
            if chat:
                assert chunk.object == "chat.completion.chunk"
            for c in chunk.choices:
                s = choices.setdefault(c.index, {"text": "", "finish": None, "logprobs": [], "chunks": []})
                assert s["finish"] is None, f"choice {c.index} got a chunk after its finish_reason: {chunk}"
                if chat and not s["chunks"]:
                    assert c.delta.role == "assistant", f"choice {c.index}'s first chunk has no assistant role: {chunk}"
                s["chunks"].append(c)
                s["text"] += (c.delta.content if chat else c.text) or ""
                if c.logprobs is not None:
                    s["logprobs"].extend((c.logprobs.content or []) if chat else [c.logprobs])
                if c.finish_reason is not None:
                    s["finish"] = c.finish_reason
    return choices, chunks


def stream_completion(client, **kw):
    """(text, finish_reason, chunks) of a streamed completion with one choice."""
    choices, chunks = stream_choices(client, chat=False, **kw)
    assert set(choices) == {0}, f"choice indices {sorted(choices)}"
    return choices[0]["text"], choices[0]["finish"], chunks


def stream_chat(client, **kw):
    """(content, finish_reason, chunks) of a streamed chat completion with one choice; checks the role comes first."""
    choices, chunks = stream_choices(client, chat=True, **kw)
    assert set(choices) == {0}, f"stream had no choice chunks or more than one: {sorted(choices)}"
    return choices[0]["text"], choices[0]["finish"], chunks


def metric(text: str, name: str, labels: dict | None = None) -> float | None:
    """Value of one Prometheus sample (None if absent)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if labels is None or all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(4))
    return None


def error_envelope(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"]
    return err


def test_reference_available():
    assert _REF is not None, f"reference.json not readable: {_REF_ERROR}"
    assert COMPLETION_CASES and CHAT_CASES


# ---------------------------------------------------------------------------------------------------------------------
# 0. Service endpoints and /v1/models
# ---------------------------------------------------------------------------------------------------------------------


def test_health_endpoints(http):
    for path in ("/v1/health/live", "/v1/health/ready", "/health"):
        r = http.get(path)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"


def test_metrics_endpoint(http):
    r = http.get("/metrics")
    assert r.status_code == 200
    assert metric(r.text, "ferrite_worker_running") is not None, r.text[:2000]
    assert metric(r.text, "ferrite_worker_kv_blocks", {"state": "used"}) is not None, r.text[:2000]


def test_router_latency_histograms(client, model, http):
    """The router's own time (before the worker, and per streamed token) is exported for Prometheus."""
    stream_completion(client, model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
    text = http.get("/metrics").text
    prepared = metric(text, "ferrite_router_prepare_seconds_count", {"endpoint": "completions"})
    tokens = metric(text, "ferrite_router_token_seconds_count", {"endpoint": "completions"})
    assert prepared and prepared >= 1, text[:3000]
    assert tokens and tokens >= 8, text[:3000]


def test_models_list(client, model):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert model in ids and ALIAS in ids, ids
    for m in models.data:
        assert m.object == "model"


# ---------------------------------------------------------------------------------------------------------------------
# 1. The seed snippets, streamed and not
# ---------------------------------------------------------------------------------------------------------------------


def test_seed_completion(client, model):
    kw = dict(model=model, prompt="Once upon a time", max_tokens=16, temperature=0)
    resp = client.completions.create(**kw)
    assert resp.object == "text_completion"
    assert len(resp.choices) == 1 and resp.choices[0].index == 0
    text = resp.choices[0].text
    assert text and once_upon_text().startswith(text), text
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 16

    streamed, finish, _ = stream_completion(client, **kw)
    assert streamed == text
    assert finish == "length"


def test_seed_chat(client, model):
    kw = dict(model=model, messages=limerick(), max_tokens=32, temperature=0)
    resp = client.chat.completions.create(**kw)
    assert resp.object == "chat.completion"
    msg = resp.choices[0].message
    assert msg.role == "assistant"
    assert msg.content == expected_text(CASES["chat_limerick"])
    assert resp.choices[0].finish_reason == "stop"

    streamed, finish, _ = stream_chat(client, **kw)
    assert streamed == msg.content
    assert finish == "stop"


def test_raw_sse_wire_format(http, model):
    """The SDK hides framing: check `data: ` events, JSON chunks and the final `data: [DONE]`."""
    body = {"model": model, "messages": limerick(), "max_tokens": 8, "temperature": 0, "stream": True}
    events = []
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line or line.startswith(":"):
                continue
            assert line.startswith("data: "), line
            events.append(line[len("data: ") :])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Greedy output equals the transformers reference
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", COMPLETION_CASES)
def test_reference_completion(client, model, name):
    case = CASES[name]
    resp = client.completions.create(
        model=model, prompt=case["prompt_text"], max_tokens=len(case["greedy_ids"]), temperature=0
    )
    choice = resp.choices[0]
    assert choice.text == expected_text(case)
    assert choice.finish_reason == expected_finish(case)
    assert resp.usage.prompt_tokens == len(case["prompt_ids"])


@pytest.mark.parametrize("name", CHAT_CASES)
def test_reference_chat(client, model, name):
    case = CASES[name]
    resp = client.chat.completions.create(
        model=model, messages=case["messages"], max_tokens=len(case["greedy_ids"]), temperature=0
    )
    choice = resp.choices[0]
    assert choice.message.content == expected_text(case)
    assert choice.finish_reason == expected_finish(case)
    # The reference prompt is the model's chat template (with its default system prompt) applied to the messages.
    assert resp.usage.prompt_tokens == len(case["prompt_ids"])


# ---------------------------------------------------------------------------------------------------------------------
# 3. Usage numbers
# ---------------------------------------------------------------------------------------------------------------------


def test_usage_completion(client, model):
    case = CASES["once_upon"]
    n = len(case["greedy_ids"])
    assert case["greedy_ids"][-1] != EOS_ID
    resp = client.completions.create(model=model, prompt=case["prompt_text"], max_tokens=n, temperature=0)
    u = resp.usage
    assert u.prompt_tokens == len(case["prompt_ids"])
    assert u.completion_tokens == n
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details is not None and u.prompt_tokens_details.cached_tokens is not None


def test_usage_chat_stopped_at_eos(client, model):
    case = CASES["chat_capital"]
    n = len(case["greedy_ids"])
    assert case["greedy_ids"][-1] == EOS_ID
    resp = client.chat.completions.create(model=model, messages=case["messages"], max_tokens=n, temperature=0)
    u = resp.usage
    assert u.prompt_tokens == len(case["prompt_ids"])
    # Generated tokens, with or without the eos that ended the sequence.
    assert u.completion_tokens in (n - 1, n), u
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_prefix_cache_reports_cached_tokens(client, model):
    # A nonce up front keeps the first request a cache miss even against a long-running server.
    prompt = f"[{uuid.uuid4().hex}] " + CASES["long_context"]["prompt_text"]
    kw = dict(model=model, prompt=prompt, max_tokens=4, temperature=0)
    first = client.completions.create(**kw).usage
    assert first.prompt_tokens > 64
    assert first.prompt_tokens_details is not None
    assert (first.prompt_tokens_details.cached_tokens or 0) == 0
    second = client.completions.create(**kw).usage
    assert second.prompt_tokens == first.prompt_tokens
    cached = second.prompt_tokens_details.cached_tokens
    assert 0 < cached <= second.prompt_tokens, second


# ---------------------------------------------------------------------------------------------------------------------
# 4. Sampling options and response shapes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [" city", ["metropolis", "Haven"]], ids=["string", "list"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_stop_strings_completion(client, model, stop, stream):
    ref = once_upon_text()
    stops = [stop] if isinstance(stop, str) else stop
    cut = min(ref.index(s) for s in stops)
    kw = dict(model=model, prompt="Once upon a time", max_tokens=32, temperature=0, stop=stop)
    if stream:
        text, finish, _ = stream_completion(client, **kw)
    else:
        choice = client.completions.create(**kw).choices[0]
        text, finish = choice.text, choice.finish_reason
    assert text == ref[:cut]
    assert finish == "stop"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_stop_string_chat(client, model, stream):
    ref = expected_text(CASES["chat_limerick"])
    kw = dict(model=model, messages=limerick(), max_tokens=32, temperature=0, stop=["marvel"])
    if stream:
        text, finish, _ = stream_chat(client, **kw)
    else:
        choice = client.chat.completions.create(**kw).choices[0]
        text, finish = choice.message.content, choice.finish_reason
    assert text == ref[: ref.index("marvel")]
    assert finish == "stop"


# Sampled requests below: temperature 1 with `ignore_eos`, so every sample has its full length. Samples of 24 tokens
# from these prompts have log-probabilities of -47 to -125 nats (measured), so two independent samples practically
# never coincide: different seeds (or the n choices of one request) giving the same text means the
# server did not sample, or did not use the seed.
SAMPLED_TOKENS = 24
SAMPLED = dict(max_tokens=SAMPLED_TOKENS, temperature=1.0, extra_body={"ignore_eos": True})


def _create(client, model, kind: str, **kw):
    if kind == "completion":
        return client.completions.create(model=model, prompt="Once upon a time", **kw)
    return client.chat.completions.create(model=model, messages=limerick(), **kw)


def _texts(resp, kind: str) -> list[str]:
    assert sorted(c.index for c in resp.choices) == list(range(len(resp.choices)))
    choices = sorted(resp.choices, key=lambda c: c.index)
    return [c.text if kind == "completion" else c.message.content for c in choices]


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_n2_sampled_choices_differ(client, model, kind):
    """n=2 at temperature 1: two independent samples (per-choice seeds), each of full length."""
    resp = _create(client, model, kind, n=2, seed=7, **SAMPLED)
    texts = _texts(resp, kind)
    assert len(texts) == 2 and all(texts), texts
    assert texts[0] != texts[1], f"both choices sampled the same text: {texts[0]!r}"
    assert resp.usage.completion_tokens == 2 * SAMPLED_TOKENS  # summed over choices
    if kind == "chat":
        assert all(c.message.role == "assistant" for c in resp.choices)


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_n2_greedy_choices_equal(client, model, kind):
    """n=2 greedy: both choices are the greedy text (the same as with n=1)."""
    kw = dict(max_tokens=16, temperature=0)
    single = _texts(_create(client, model, kind, **kw), kind)
    resp = _create(client, model, kind, n=2, **kw)
    texts = _texts(resp, kind)
    assert len(texts) == 2 and texts[0]
    assert texts == single * 2, (texts, single)


def test_logprobs_completion(client, model):
    resp = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=3)
    choice = resp.choices[0]
    lp = choice.logprobs
    assert lp is not None
    n = resp.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == choice.text  # ASCII continuation: tokens decode piecewise
    assert all(isinstance(o, int) for o in lp.text_offset) and lp.text_offset == sorted(lp.text_offset)
    for tok, tok_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert isinstance(tok, str) and isinstance(tok_lp, float) and tok_lp <= 1e-6
        assert isinstance(top, dict) and 1 <= len(top) <= 4  # up to 3 (+ the sampled token, vLLM-style)
        assert all(isinstance(k, str) and isinstance(v, float) and v <= 1e-6 for k, v in top.items())
        # Greedy: the chosen token is the most likely one.
        assert math.isclose(tok_lp, max(top.values()), abs_tol=1e-4), (tok, tok_lp, top)


def test_logprobs_chat(client, model):
    resp = client.chat.completions.create(
        model=model, messages=limerick(), max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = resp.choices[0]
    content = choice.logprobs.content
    assert len(content) == resp.usage.completion_tokens == 8
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert isinstance(t.token, str) and isinstance(t.logprob, float) and t.logprob <= 1e-6
        if t.bytes is not None:
            assert bytes(t.bytes).decode("utf-8", errors="replace") == t.token
        assert len(t.top_logprobs) == 3
        vals = [x.logprob for x in t.top_logprobs]
        assert vals == sorted(vals, reverse=True)
        assert all(isinstance(x.token, str) for x in t.top_logprobs)
        assert math.isclose(t.logprob, vals[0], abs_tol=1e-4)


def test_logprobs_absent_by_default(client, model):
    resp = client.chat.completions.create(model=model, messages=limerick(), max_tokens=2, temperature=0)
    assert resp.choices[0].logprobs is None


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_seed_reproduces_sampling(client, model, kind):
    """At temperature 1, each seed gives its own sample (so temperature and seed are honored: a server sampling
    greedily, or with one fixed seed, gives one text), and the same seed gives the same text again (a server ignoring
    `seed` gives a fresh sample)."""
    seeds = [1, 2, 3, 1234, 99991]

    def once(seed: int) -> str:
        resp = _create(client, model, kind, seed=seed, **SAMPLED)
        assert resp.usage.completion_tokens == SAMPLED_TOKENS
        return _texts(resp, kind)[0]

    texts = {seed: once(seed) for seed in seeds}
    assert all(texts.values()), texts
    assert len(set(texts.values())) == len(seeds), f"seeds gave colliding samples: {texts}"
    for seed in (seeds[0], seeds[-1]):
        assert once(seed) == texts[seed], f"seed {seed} did not reproduce its sample"


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_stream_include_usage(client, model, kind):
    kw = dict(model=model, max_tokens=8, temperature=0, stream_options={"include_usage": True})
    if kind == "completion":
        text, finish, chunks = stream_completion(client, prompt="Once upon a time", **kw)
    else:
        text, finish, chunks = stream_chat(client, messages=limerick(), **kw)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 8
    assert last.usage.total_tokens == last.usage.prompt_tokens + 8
    if kind == "completion":
        assert last.usage.prompt_tokens == len(CASES["once_upon"]["prompt_ids"])
    assert all(c.usage is None for c in chunks[:-1])
    assert text and finish == "length"


def test_stream_without_usage_has_no_usage_chunk(client, model):
    _, _, chunks = stream_chat(client, model=model, messages=limerick(), max_tokens=4, temperature=0)
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


# ---------------------------------------------------------------------------------------------------------------------
# 5. Errors
# ---------------------------------------------------------------------------------------------------------------------


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as ei:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=1)
    assert ei.value.status_code == 404
    assert ei.value.code == "model_not_found"


def test_unknown_model_chat(client):
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert ei.value.code == "model_not_found"


def test_temperature_out_of_range(client, model):
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=model, prompt="hi", max_tokens=1, temperature=3)
    assert ei.value.param == "temperature"
    assert ei.value.code == "invalid_value"


def test_prompt_too_long(client, model, models_list):
    # Past any context: the model's (8192 for SmolLM2) or whatever /v1/models advertises.
    limit = max([m.get("max_model_len") or 0 for m in models_list["data"]] + [8192])
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=model, prompt="hello " * (limit + 1000), max_tokens=16)
    assert ei.value.code == "context_length_exceeded"


def test_prompt_plus_max_tokens_too_long_chat(client, model, models_list):
    limit = max([m.get("max_model_len") or 0 for m in models_list["data"]] + [8192])
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello " * (limit + 1000)}], max_tokens=16
        )
    assert ei.value.code == "context_length_exceeded"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_malformed_json(http, path):
    r = http.post(path, content=b'{"model": "x", "prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = error_envelope(r)
    assert err["type"] == "invalid_request_error"
    assert isinstance(err["code"], str) and err["code"]


def test_wrong_field_type(http, model):
    r = http.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": "many"})
    assert r.status_code == 400, r.text
    error_envelope(r)


def test_max_tokens_zero(client, model, http):
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=model, prompt="hi", max_tokens=0)
    assert ei.value.status_code == 400
    r = http.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
    )
    assert r.status_code == 400, r.text
    error_envelope(r)


def test_error_envelope_on_404(http):
    r = http.post("/v1/completions", json={"model": "no-such-model", "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 404
    err = error_envelope(r)
    assert err["code"] == "model_not_found"


# ---------------------------------------------------------------------------------------------------------------------
# 6. Concurrency and client disconnects
# ---------------------------------------------------------------------------------------------------------------------


def test_concurrent_streams(client, model):
    """16 streams at once (continuous batching): all finish, and greedy text still matches the reference."""
    chat_case = CASES["chat_capital"]

    def job(i: int):
        if i % 2 == 0:
            return ("completion",) + stream_completion(
                client, model=model, prompt="Once upon a time", max_tokens=16, temperature=0
            )[:2]
        return ("chat",) + stream_chat(
            client, model=model, messages=chat_case["messages"], max_tokens=len(chat_case["greedy_ids"]), temperature=0
        )[:2]

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(job, range(16), timeout=180))
    assert len(results) == 16
    for kind, text, finish in results:
        if kind == "completion":
            assert finish == "length" and once_upon_text().startswith(text) and text, text
        else:
            assert finish == "stop" and text == expected_text(chat_case), text


def test_disconnect_frees_resources(base_url, http, model):
    before = http.get("/metrics").text
    aborts_before = metric(before, "ferrite_worker_aborts_total")
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": True}
    got = 0
    with httpx.Client(base_url=base_url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    got += 1
                    if got == 3:
                        break
    assert got == 3
    # Client gone: the sequence must be aborted and its KV blocks freed.
    deadline = time.monotonic() + 5.0
    running = used = None
    while time.monotonic() < deadline:
        text = http.get("/metrics").text
        running = metric(text, "ferrite_worker_running")
        used = metric(text, "ferrite_worker_kv_blocks", {"state": "used"})
        if running == 0 and used == 0:
            break
        time.sleep(0.1)
    assert running == 0 and used == 0, f"running={running} kv used={used} 5 s after the disconnect"
    if aborts_before is not None:
        assert metric(text, "ferrite_worker_aborts_total") > aborts_before, "the disconnected request was not aborted"


def test_body_too_large_gives_413(http, model):
    """A body over --max-body-bytes (default 4 MiB) is refused with 413 and the OpenAI envelope."""
    r = http.post("/v1/completions", json={"model": model, "prompt": "x" * (5 << 20), "max_tokens": 1})
    assert r.status_code == 413, r.text[:500]
    assert error_envelope(r)["code"]


def _wait_http(proc: subprocess.Popen, url: str, status: int = 200, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"process exited with {proc.returncode}"
        try:
            if httpx.get(url, timeout=2).status_code == status:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer {status}"
        time.sleep(0.25)


def test_no_worker_gives_503_until_one_is_up():
    """`ferrite router` listens before any worker: readiness and requests answer 503 (OpenAI envelope, through the
    SDK); once a `ferrite worker` is up it serves; when the worker goes away, 503 again."""
    if os.environ.get("FERRITE_BASE_URL"):
        pytest.skip("needs to start its own router and worker")
    binary = os.environ.get("FERRITE_BIN", str(REPO / "target" / "release" / "ferrite"))
    port, wport, mport = _free_port(), _free_port(), _free_port()
    base = f"http://127.0.0.1:{port}"
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=REPO)
    router = subprocess.Popen(
        [binary, "router", "--host", "127.0.0.1", "--port", str(port), "--worker", f"http://127.0.0.1:{wport}"], **quiet
    )
    worker = None
    c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)

    def expect_503():
        with pytest.raises(openai.APIStatusError) as err:
            c.completions.create(model=model, prompt="Hello", max_tokens=4)
        assert err.value.status_code == 503
        envelope = err.value.response.json()["error"]
        assert envelope["code"] and envelope["message"]

    try:
        _wait_http(router, f"{base}/v1/health/live")
        assert httpx.get(f"{base}/v1/health/ready", timeout=5).status_code == 503
        model = c.models.list().data[0].id
        expect_503()
        worker = subprocess.Popen(
            [binary, "worker", "--listen", f"127.0.0.1:{wport}", "--metrics-listen", f"127.0.0.1:{mport}"], **quiet
        )
        _wait_http(router, f"{base}/v1/health/ready")
        assert c.completions.create(model=model, prompt="Hello", max_tokens=2).usage.completion_tokens == 2
        _stop(worker)
        _wait_http(router, f"{base}/v1/health/ready", status=503, timeout=20)
        expect_503()
    finally:
        if worker is not None:
            _stop(worker)
        _stop(router)


def test_queue_full_gives_429(start_server):
    """With one request allowed in flight, a second gets 429 (the SDK's RateLimitError, OpenAI envelope). Closing the
    first stream aborts it on the worker (it could not have finished on its own: it asks for far more tokens than the
    CPU model makes in the wait), and the server serves again."""
    base = start_server("--max-concurrent-requests", "1")
    c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)
    # 4000 tokens without eos: minutes of work at the CPU model's ~50-100 tok/s; the wait below is at most 10 s.
    budget = 4000
    body = {
        "model": ALIAS, "prompt": "Once upon a time", "max_tokens": budget, "temperature": 0, "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(base_url=base, timeout=60) as h:
        before = h.get("/metrics").text
        aborts_before = metric(before, "ferrite_worker_aborts_total")
        assert aborts_before is not None, before[:2000]
        with h.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # the first request is running
            assert metric(h.get("/metrics").text, "ferrite_worker_running") == 1
            with pytest.raises(openai.RateLimitError) as err:
                c.completions.create(model=ALIAS, prompt="Hello", max_tokens=4)
            assert err.value.status_code == 429
            envelope = err.value.response.json()["error"]
            assert envelope["type"] and envelope["code"] and envelope["message"]
        # The first stream is closed: the router must abort it on the worker.
        deadline = time.monotonic() + 10
        while True:
            text = h.get("/metrics").text
            running, aborts = metric(text, "ferrite_worker_running"), metric(text, "ferrite_worker_aborts_total")
            if running == 0 and aborts > aborts_before:
                break
            assert time.monotonic() < deadline, f"10 s after the disconnect: running={running} aborts={aborts}"
            time.sleep(0.1)
        generated = metric(text, "ferrite_worker_generated_tokens_total")
        assert generated < budget, f"the request ran to its end ({generated} tokens) instead of being aborted"
        assert metric(text, "ferrite_worker_kv_blocks", {"state": "used"}) == 0
    # Its permit came back: the server serves again.
    deadline = time.monotonic() + 10
    while True:
        try:
            out = c.completions.create(model=ALIAS, prompt="Hello", max_tokens=4)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "still 429 10 s after the first request ended"
            time.sleep(0.2)
    assert out.usage.completion_tokens == 4


# ---------------------------------------------------------------------------------------------------------------------
# 7. --served-model-name alias
# ---------------------------------------------------------------------------------------------------------------------


def test_alias_completion(client, model):
    kw = dict(prompt="Once upon a time", max_tokens=8, temperature=0)
    via_alias = client.completions.create(model=ALIAS, **kw)
    direct = client.completions.create(model=model, **kw)
    assert via_alias.choices[0].text == direct.choices[0].text
    assert via_alias.choices[0].text


def test_alias_chat_stream(client, model):
    text, finish, chunks = stream_chat(client, model=ALIAS, messages=limerick(), max_tokens=8, temperature=0)
    assert text and finish == "length"
    assert expected_text(CASES["chat_limerick"]).startswith(text)


# ---------------------------------------------------------------------------------------------------------------------
# 8. Streaming equals non-streaming: several prompts, n > 1, logprobs, echo; a worker failing mid-stream
# ---------------------------------------------------------------------------------------------------------------------


def _plain_choices(resp, chat: bool) -> dict[int, dict]:
    out = {}
    for c in resp.choices:
        assert c.index not in out, f"index {c.index} twice"
        text = c.message.content if chat else c.text
        out[c.index] = {"text": text, "finish": c.finish_reason, "logprobs": c.logprobs}
    return out


def _assert_stream_equals_plain(client, chat: bool, **kw) -> dict[int, dict]:
    """Runs `kw` streamed and not: each choice streams exactly the non-streaming text and finish_reason."""
    create = client.chat.completions.create if chat else client.completions.create
    plain = _plain_choices(create(**kw), chat)
    streamed, _ = stream_choices(client, chat, **kw)
    assert sorted(streamed) == sorted(plain), f"streamed indices {sorted(streamed)}, plain {sorted(plain)}"
    for i in sorted(plain):
        got, want = streamed[i]["text"], plain[i]["text"]
        assert got == want, f"choice {i}: streamed {got!r} != {want!r}"
        assert streamed[i]["finish"] is not None, f"choice {i} streamed no finish_reason"
        assert streamed[i]["finish"] == plain[i]["finish"], f"choice {i}"
    return plain


def test_stream_prompt_list_completion(client, model):
    """Several prompts of different lengths in one streamed request: each choice streams all its tokens, from the
    first (the short prompts' first tokens come before the long prompt has started)."""
    long_prompt = CASES["long_context"]["prompt_text"] * 2  # ~400 tokens: prefilled over more than one step
    prompts = ["Once upon a time", CASES["capital_raw"]["prompt_text"], long_prompt, "Hi"]
    plain = _assert_stream_equals_plain(client, False, model=model, prompt=prompts, max_tokens=12, temperature=0)
    assert len(plain) == len(prompts)
    assert plain[0]["text"] == once_upon_text()[: len(plain[0]["text"])] and plain[0]["text"]
    assert all(c["text"] for c in plain.values())


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_stream_n2(client, model, kind, mode):
    """n=3 streamed: each index streams the non-streaming text of that choice and its own finish_reason. Sampled (one
    seed: the same choices streamed or not) tells the indices apart; greedy checks the three are the greedy text."""
    sampling = dict(max_tokens=12, temperature=0) if mode == "greedy" else dict(seed=11, **SAMPLED)
    kw = dict(model=model, n=3, **sampling)
    chat = kind == "chat"
    if chat:
        kw["messages"] = limerick()
    else:
        kw["prompt"] = "Once upon a time"
    plain = _assert_stream_equals_plain(client, chat, **kw)
    texts = [plain[i]["text"] for i in range(3)]
    if mode == "greedy":
        assert texts[0] and texts == [texts[0]] * 3, texts
    else:
        assert len(set(texts)) == 3, texts


def test_stream_logprobs_completion(client, model):
    """Streamed completion chunks carry logprobs whose tokens concatenate to the text, equal to the non-streaming
    ones (tokens, text offsets, logprobs and top logprobs within 1e-4)."""
    kw = dict(model=model, prompt="Once upon a time", max_tokens=12, temperature=0, logprobs=3)
    plain = client.completions.create(**kw).choices[0]
    choices, _ = stream_choices(client, False, **kw)
    s = choices[0]
    content_chunks = [c for c in s["chunks"] if c.finish_reason is None]
    assert content_chunks and all(c.logprobs is not None for c in content_chunks), "a content chunk has no logprobs"
    tokens = [t for lp in s["logprobs"] for t in lp.tokens]
    token_lps = [v for lp in s["logprobs"] for v in lp.token_logprobs]
    tops = [t for lp in s["logprobs"] for t in lp.top_logprobs]
    offsets = [o for lp in s["logprobs"] for o in lp.text_offset]
    assert "".join(tokens) == s["text"] == plain.text
    lp = plain.logprobs
    assert tokens == lp.tokens
    assert offsets == lp.text_offset, "streamed text_offset differs from the non-streaming one"
    assert len(token_lps) == len(lp.token_logprobs) == 12
    for a, b in zip(token_lps, lp.token_logprobs):
        assert math.isclose(a, b, abs_tol=1e-4), (token_lps, lp.token_logprobs)
    for a, b in zip(tops, lp.top_logprobs):
        assert set(a) == set(b), (a, b)
        assert all(math.isclose(a[k], b[k], abs_tol=1e-4) for k in a), (a, b)


def test_stream_logprobs_chat(client, model):
    """Streamed chat chunks carry logprobs (tokens concatenating to the content) equal to the non-streaming ones."""
    kw = dict(model=model, messages=limerick(), max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    plain = client.chat.completions.create(**kw).choices[0]
    choices, _ = stream_choices(client, True, **kw)
    s = choices[0]
    content_chunks = [c for c in s["chunks"] if c.delta.content]
    assert content_chunks and all(c.logprobs is not None for c in content_chunks), "a content chunk has no logprobs"
    got = s["logprobs"]
    want = plain.logprobs.content
    assert "".join(t.token for t in got) == s["text"] == plain.message.content
    assert [t.token for t in got] == [t.token for t in want] and len(got) == 12
    for a, b in zip(got, want):
        assert math.isclose(a.logprob, b.logprob, abs_tol=1e-4), (a, b)
        assert [x.token for x in a.top_logprobs] == [x.token for x in b.top_logprobs], (a, b)
        assert all(math.isclose(x.logprob, y.logprob, abs_tol=1e-4) for x, y in zip(a.top_logprobs, b.top_logprobs))


@pytest.mark.parametrize("prompts", [1, 2], ids=["one_prompt", "two_prompts"])
def test_stream_echo_completion(client, model, prompts):
    """echo streamed: the prompt comes first, then the generated text; the same as the non-streaming echo."""
    texts = ["Once upon a time", CASES["capital_raw"]["prompt_text"]][:prompts]
    kw = dict(model=model, max_tokens=8, temperature=0)
    generated = _plain_choices(client.completions.create(prompt=texts, **kw), False)
    plain = _assert_stream_equals_plain(client, False, prompt=texts, echo=True, **kw)
    streamed, _ = stream_choices(client, False, prompt=texts, echo=True, **kw)
    for i, prompt in enumerate(texts):
        assert plain[i]["text"] == prompt + generated[i]["text"], (plain[i], prompt, generated[i])
        first = next(c.text for c in streamed[i]["chunks"] if c.text)
        assert first.startswith(prompt), f"choice {i}'s first text is {first!r}, not the prompt"


def _start_router_and_worker():
    """A `ferrite worker` and a `ferrite router` in front of it, both ready: (router, worker, base_url, logs)."""
    binary = os.environ.get("FERRITE_BIN", str(REPO / "target" / "release" / "ferrite"))
    port, wport = _free_port(), _free_port()
    base = f"http://127.0.0.1:{port}"
    logs = tempfile.mkdtemp(prefix="ferrite-midstream-")
    procs = []

    def spawn(name: str, args: list[str]) -> subprocess.Popen:
        f = open(os.path.join(logs, f"{name}.log"), "wb")
        p = subprocess.Popen([binary, *args], stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)
        f.close()
        procs.append(p)
        return p

    try:
        worker = spawn("worker", ["worker", "--listen", f"127.0.0.1:{wport}"])
        router = spawn(
            "router", ["router", "--host", "127.0.0.1", "--port", str(port), "--worker", f"http://127.0.0.1:{wport}"]
        )
        _wait_http(router, f"{base}/v1/health/ready")
        assert worker.poll() is None
    except BaseException:
        for p in procs:
            _stop(p)
        raise
    return router, worker, base, logs


def _log_tails(logs: str) -> str:
    out = []
    for name in sorted(os.listdir(logs)):
        with open(os.path.join(logs, name), errors="replace") as f:
            out.append(f"--- {name} ---\n" + "\n".join(f.read().splitlines()[-20:]))
    return "\n".join(out)


def test_stream_worker_killed_mid_stream_gives_error_event():
    """A worker dying after the headers were sent: the router ends the stream with an OpenAI error event
    (`data: {"error": {...}}`, no `event:` line, no `[DONE]`), which the SDK raises as `openai.APIError`, within
    seconds (not a hang, not a silently truncated stream)."""
    if os.environ.get("FERRITE_BASE_URL"):
        pytest.skip("needs to start its own router and worker")
    router, worker, base, logs = _start_router_and_worker()
    c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        # Enough tokens (no eos) that both requests are still running when the worker is killed.
        body = dict(model=c.models.list().data[0].id, prompt="Once upon a time", max_tokens=4000, temperature=0)
        with httpx.Client(base_url=base, timeout=60) as h:
            with h.stream("POST", "/v1/completions", json={**body, "ignore_eos": True, "stream": True}) as raw:
                assert raw.status_code == 200
                raw_lines = raw.iter_lines()
                first_raw = next(line for line in raw_lines if line.startswith("data: "))
                assert "error" not in json.loads(first_raw[len("data: ") :])
                sdk = c.completions.create(stream=True, extra_body={"ignore_eos": True}, **body)
                first = next(iter(sdk))
                assert first.choices and first.choices[0].text is not None
                worker.kill()  # SIGKILL: no goodbye on the gRPC stream
                worker.wait(timeout=10)

                def drain_sdk():
                    try:
                        for _ in sdk:
                            pass
                    except Exception as e:  # noqa: BLE001 - the test inspects it
                        return e
                    return None

                def drain_raw():
                    return [line for line in raw_lines if line]

                deadline = time.monotonic() + 30
                sdk_result, raw_result = pool.submit(drain_sdk), pool.submit(drain_raw)
                try:
                    err = sdk_result.result(timeout=30)
                    rest = raw_result.result(timeout=max(0.0, deadline - time.monotonic()))
                except FuturesTimeout:
                    pytest.fail(f"the stream did not end within 30 s of the worker's death\n{_log_tails(logs)}")
        # The SDK raised the server's error event (APIConnectionError and httpx errors would mean a broken stream).
        assert err is not None, "the SDK stream ended without an error: the client cannot tell the answer is cut short"
        assert type(err) is openai.APIError, f"{type(err).__name__}: {err}"
        assert isinstance(err.body, dict) and {"message", "type", "code"} <= set(err.body), err.body
        assert err.body["message"] and err.message == err.body["message"]
        # On the wire: data lines only, the last one the error envelope, no [DONE].
        assert rest, "no event after the first one"
        assert all(line.startswith("data: ") or line.startswith(":") for line in rest), rest[-5:]
        data = [line[len("data: ") :] for line in rest if line.startswith("data: ")]
        assert "[DONE]" not in data, rest[-5:]
        last = json.loads(data[-1])
        assert set(last) == {"error"}, last
        assert {"message", "type", "param", "code"} <= set(last["error"]) and last["error"]["message"], last
        assert all("error" not in json.loads(d) for d in data[:-1])
        assert router.poll() is None, "the router died with its worker"
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        _stop(worker)
        _stop(router)
        c.close()
        shutil.rmtree(logs, ignore_errors=True)
