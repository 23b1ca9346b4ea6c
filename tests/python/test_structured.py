"""Structured outputs through the openai SDK: `client.chat.completions.parse` with Pydantic models, `json_object`, a
JSON Schema with enums, nested objects, arrays and required fields, the vLLM `guided_*` extras on both endpoints,
streaming, and the 400 for a schema the worker cannot compile. The default model is tiny (135M): every output here
is valid only because the grammar masks the tokens."""

from __future__ import annotations

import json
import re
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    # `additionalProperties: false` in the schema (what `parse` sends anyway), so the grammar ends after the fields.
    model_config = ConfigDict(extra="forbid")


class Pet(Strict):
    name: str = Field(max_length=16)
    species: Literal["cat", "dog", "bird", "fish"]
    age: int = Field(ge=0, le=30)


class Address(Strict):
    city: str = Field(max_length=16)
    zip: int = Field(ge=0, le=99999)


class Person(Strict):
    name: str = Field(max_length=16)
    role: Literal["admin", "user", "guest"]
    address: Address
    tags: list[Literal["red", "green", "blue"]] = Field(max_length=3)
    nickname: str | None = None


PROMPTS = [
    "Describe a pet.",
    "Tell me about your cat.",
    "My dog is called Rex.",
    "Invent a bird.",
    "A fish in a bowl.",
    "Give me a pet as JSON.",
    "Name an old animal.",
    "What is the youngest pet you know?",
    "Write a record for a pet shop.",
    "Pick any animal.",
]


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_parse_returns_a_pydantic_instance(client, model, mode):
    sampling = {"temperature": 0} if mode == "greedy" else {"temperature": 0.9, "seed": 1234}
    for prompt in PROMPTS:
        r = client.chat.completions.parse(
            model=model, messages=[{"role": "user", "content": prompt}], response_format=Pet, max_tokens=120, **sampling
        )
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (prompt, choice.message.content)
        assert isinstance(choice.message.parsed, Pet), (prompt, choice.message.content)


def test_schema_with_enums_nested_objects_arrays_and_required_fields(client, model):
    schema = Person.model_json_schema()
    for i, prompt in enumerate(["A user record.", "An admin from Paris.", "Someone who likes blue."]):
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            response_format={"type": "json_schema", "json_schema": {"name": "Person", "schema": schema}},
            max_tokens=160,
            temperature=0.7,
            seed=i,
        )
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        Person.model_validate_json(r.choices[0].message.content)  # raises when the schema is not met


# JSON mode bounds nothing but the syntax, so a 135M model can ramble until `max_tokens` (OpenAI warns of the same);
# these prompts and settings (all deterministic) finish on CPU.
JSON_OBJECT_CASES = [
    ("Give me JSON.", {"temperature": 0}),
    ("A JSON object with keys a and b.", {"temperature": 0}),
    ('Return {"ok": true}.', {"temperature": 0}),
    ("A user as JSON.", {"temperature": 0.7, "seed": 1}),
    ("Return a JSON object describing a book.", {"temperature": 0, "frequency_penalty": 0.5}),
]


@pytest.mark.parametrize("prompt,sampling", JSON_OBJECT_CASES)
def test_json_object_output_parses(client, model, prompt, sampling):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        response_format={"type": "json_object"},
        max_tokens=200,
        **sampling,
    )
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop", text
    assert isinstance(json.loads(text), dict), text


def test_response_format_text_is_free(client, model):
    kw = dict(model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8, temperature=0)
    free = client.chat.completions.create(**kw).choices[0].message.content
    text = client.chat.completions.create(**kw, response_format={"type": "text"}).choices[0].message.content
    assert free == text


def test_completions_with_response_format_and_guided_extras(client, model):
    r = client.completions.create(
        model=model,
        prompt="A pet record:",
        max_tokens=120,
        temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "Pet", "schema": Pet.model_json_schema()}}},
    )
    Pet.model_validate_json(r.choices[0].text)
    r = client.completions.create(
        model=model, prompt="Is water wet?", max_tokens=8, temperature=0.8, seed=3, n=4, extra_body={"guided_choice": ["yes", "no", "maybe"]}
    )
    assert all(c.text in ("yes", "no", "maybe") and c.finish_reason == "stop" for c in r.choices), r.choices
    r = client.completions.create(model=model, prompt="A date:", max_tokens=16, temperature=0, extra_body={"guided_regex": r"\d{4}-\d{2}-\d{2}"})
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", r.choices[0].text), r.choices[0].text
    lark = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]+/'
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "2+2?"}], max_tokens=16, temperature=0, extra_body={"guided_grammar": lark}
    )
    assert re.fullmatch(r"The answer is [0-9]+\.", r.choices[0].message.content), r.choices[0].message.content


def test_streamed_structured_output_equals_the_plain_one(client, model):
    kw = dict(
        model=model,
        messages=[{"role": "user", "content": "Describe a pet."}],
        response_format={"type": "json_schema", "json_schema": {"name": "Pet", "schema": Pet.model_json_schema()}},
        max_tokens=120,
        temperature=0,
    )
    plain = client.chat.completions.create(**kw).choices[0].message.content
    parts = []
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            parts.append(c.delta.content or "")
    assert "".join(parts) == plain
    Pet.model_validate_json(plain)


@pytest.mark.parametrize(
    "response_format,field",
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nosuchtype"}}}, "response_format"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}, "response_format"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format"),
        ({"type": "yaml"}, "response_format"),
    ],
)
def test_bad_schema_is_400_naming_response_format(client, model, response_format, field):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], response_format=response_format, max_tokens=8
        )
    assert ei.value.body["param"] == field, ei.value.body


def test_bad_guided_grammar_is_400(client, model):
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=model, prompt="x", max_tokens=4, extra_body={"guided_regex": "(unclosed"})
    assert ei.value.body["param"] == "guided_regex", ei.value.body
    assert "compile" in ei.value.body["message"]
