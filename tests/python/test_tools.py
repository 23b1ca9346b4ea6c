"""Tool calling through the openai SDK on the default model (its template has no tool support, so the tools reach it
through the fallback system prompt and calls are Hermes `<tool_call>` blocks). `required` and named choices are
enforced by a grammar: the arguments always validate against the function's schema."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field


class WeatherArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=24)
    unit: Literal["celsius", "fahrenheit"]


class TimeArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timezone: str = Field(max_length=24)


def tool(name: str, args: type[BaseModel], description: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": args.model_json_schema()}}


TOOLS = [
    tool("get_weather", WeatherArgs, "Current weather in a city"),
    tool("get_time", TimeArgs, "Current time in a timezone"),
]
ARGS = {"get_weather": WeatherArgs, "get_time": TimeArgs}
PROMPTS = ["What is the weather in Paris?", "What time is it in Tokyo?", "Is it raining in London?", "Hello!"]


def check_calls(message, allowed: set[str]) -> None:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call")
        assert call.function.name in allowed, call
        ARGS[call.function.name].model_validate_json(call.function.arguments)


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_required_yields_valid_calls(client, model, mode):
    sampling = {"temperature": 0} if mode == "greedy" else {"temperature": 0.9, "seed": 7}
    for prompt in PROMPTS:
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], tools=TOOLS, tool_choice="required", max_tokens=100, **sampling
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        check_calls(choice.message, {"get_weather", "get_time"})


def test_named_function_is_the_one_called(client, model):
    for prompt in PROMPTS:
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            max_tokens=100,
            temperature=0,
        )
        assert r.choices[0].finish_reason == "tool_calls"
        check_calls(r.choices[0].message, {"get_time"})


def test_auto_answers_in_text_or_calls(client, model):
    """`auto` describes the tools to the model (the fallback system prompt) and lets it choose."""
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        r = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=60, temperature=0)
        bare = client.chat.completions.create(model=model, messages=messages, max_tokens=1, temperature=0)
        assert r.usage.prompt_tokens > bare.usage.prompt_tokens + 100, "the tools were not in the prompt"
        choice = r.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            for call in choice.message.tool_calls:
                json.loads(call.function.arguments)
        else:
            assert choice.message.content is not None and choice.finish_reason in ("stop", "length")


def test_multi_turn_with_a_tool_result_continues(client, model):
    first = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=100,
        temperature=0,
    )
    call = first.choices[0].message.tool_calls[0]
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})},
    ]
    kw = dict(model=model, tools=TOOLS, tool_choice="none", max_tokens=24, temperature=0)
    r = client.chat.completions.create(messages=messages, **kw)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason in ("stop", "length")
    # The call (written out as the model would write it) and its result were rendered.
    alone = client.chat.completions.create(messages=messages[:1], **kw)
    call_tokens = len(call.function.arguments) // 8 + 8
    assert r.usage.prompt_tokens > alone.usage.prompt_tokens + call_tokens


def test_streamed_tool_call_deltas_assemble_to_the_same_calls(client, model):
    kw = dict(
        model=model,
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=TOOLS,
        tool_choice="required",
        max_tokens=100,
        temperature=0,
    )
    plain = client.chat.completions.create(**kw).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [(c.function.name, c.function.arguments) for c in plain]


def _stream(client, **kw) -> tuple[str | None, list[tuple[str, str]], str | None, int]:
    """Assembles a streamed choice 0: content, calls, finish_reason, and the number of content chunks."""
    content, calls, finish, pieces = None, {}, None, 0
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            if c.delta.content:
                content = (content or "") + c.delta.content
                pieces += 1
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, ["", ""])
                entry[0] += d.function.name or ""
                entry[1] += d.function.arguments or ""
    return content, [tuple(v) for _, v in sorted(calls.items())], finish, pieces


def test_auto_streams_text_and_calls_as_the_plain_answer(client, model):
    """With `auto`, text streams as it comes (more than one chunk for a text answer) and the assembled stream equals
    the non-streaming answer, calls included."""
    for prompt in PROMPTS:
        kw = dict(model=model, messages=[{"role": "user", "content": prompt}], tools=TOOLS, max_tokens=60, temperature=0)
        plain = client.chat.completions.create(**kw).choices[0]
        content, calls, finish, pieces = _stream(client, **kw)
        assert content == plain.message.content, prompt
        assert calls == [(c.function.name, c.function.arguments) for c in plain.message.tool_calls or []], prompt
        assert finish == plain.finish_reason, prompt
        if not plain.message.tool_calls and len(plain.message.content) > 40:
            assert pieces > 1, f"{prompt}: a text answer came in one chunk"


@pytest.mark.parametrize(
    "extra,field",
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ],
)
def test_bad_tool_requests_are_400(client, model, extra, field):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8, extra_body=extra)
    assert ei.value.body["param"] == field, ei.value.body


def test_tool_call_parser_flag_overrides_the_template_format(start_server, model):
    """`--tool-call-parser llama3_json` on a model whose template says nothing about tools (Hermes by default): the
    grammar makes the model write Llama-3 JSON calls, and they are parsed as such into `tool_calls`."""
    base = start_server("--tool-call-parser", "llama3_json")
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
    for prompt in PROMPTS[:2]:
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], tools=TOOLS, tool_choice="required", max_tokens=100,
            temperature=0, logprobs=True,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        check_calls(choice.message, {"get_weather", "get_time"})
        # The raw tokens are Llama-3 JSON (`"parameters"`), not a `<tool_call>` block.
        text = "".join(t.token for t in choice.logprobs.content)
        assert "<tool_call>" not in text and '"parameters"' in text, text
