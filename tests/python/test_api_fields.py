"""The API surface a new user of the openai SDK touches beyond generation: `models.retrieve`, message roles, and the
request fields the SDK can send that Ferrite honours, ignores (documented in README) or refuses with a 400 naming
the field."""

from __future__ import annotations

import openai
import pytest

from conftest import ALIAS

USER = [{"role": "user", "content": "Say hi."}]


def test_models_retrieve(client, model):
    for name in (model, ALIAS):
        m = client.models.retrieve(name)
        assert m.id == name and m.object == "model"


def test_models_retrieve_unknown_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as ei:
        client.models.retrieve("no-such-model")
    assert ei.value.status_code == 404
    assert ei.value.code == "model_not_found"
    assert ei.value.body["param"] == "model"


def test_unknown_role_is_400_naming_messages(client, model):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=model, messages=[{"role": "wizard", "content": "hi"}], max_tokens=1)
    assert ei.value.body["param"] == "messages"
    assert "wizard" in ei.value.body["message"]


def test_developer_role_renders_as_system(client, model):
    """`developer` is OpenAI's new name for the system role: the same prompt tokens as `system`."""
    usage = []
    for role in ("developer", "system"):
        r = client.chat.completions.create(
            model=model, messages=[{"role": role, "content": "Be brief."}, *USER], max_tokens=4, temperature=0
        )
        usage.append((r.usage.prompt_tokens, r.choices[0].message.content))
    assert usage[0] == usage[1]


@pytest.mark.parametrize(
    "field,value",
    [
        ("store", True),
        ("service_tier", "priority"),
        ("modalities", ["text", "audio"]),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("reasoning_effort", "low"),
        ("web_search_options", {}),
        ("functions", [{"name": "f", "parameters": {"type": "object"}}]),
    ],
)
def test_unservable_fields_are_400_naming_them(client, model, field, value):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=model, messages=USER, max_tokens=1, **{field: value})
    assert ei.value.body["param"] == field


def test_ignored_fields_change_nothing(client, model):
    """`user`, `metadata`, `store: false`, `service_tier: auto`, `modalities: [text]`, `prediction` and
    `tool_choice: none` are accepted and leave the greedy answer as it is."""
    base = client.chat.completions.create(model=model, messages=USER, max_tokens=8, temperature=0)
    r = client.chat.completions.create(
        model=model,
        messages=USER,
        max_tokens=8,
        temperature=0,
        user="u-1",
        metadata={"k": "v"},
        store=False,
        service_tier="auto",
        modalities=["text"],
        prediction={"type": "content", "content": "Hi there"},
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        tool_choice="none",
    )
    assert r.choices[0].message.content == base.choices[0].message.content


def test_max_completion_tokens_is_honoured(client, model):
    r = client.chat.completions.create(model=model, messages=USER, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3
    assert r.choices[0].finish_reason in ("length", "stop")
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Count from 1 to 50."}], max_completion_tokens=3, temperature=0
    )
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_stop_list_of_four_is_honoured(client, model):
    base = client.completions.create(model=model, prompt="Once upon a time", max_tokens=24, temperature=0).choices[0].text
    word = base.split()[3]
    stops = ["zzz-1", "zzz-2", "zzz-3", word]
    r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=24, temperature=0, stop=stops)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[: base.index(word)]
