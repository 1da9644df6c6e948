"""Structured outputs against the real server: every sample, at temperature 1 on many seeds, follows the
schema (checked by jsonschema), the regex or the choice; streamed equals non-streamed; bad specs get 400."""

from __future__ import annotations

import json
import math
import re

import jsonschema
import openai
import pytest

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}, "zip": {"type": "string",
                                                                               "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Make up a user of a web site and describe them as JSON."}]


def _schema_format(schema: dict, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": strict}}


def test_nested_schema_holds_on_many_seeds_at_temperature_one(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=ASK, max_tokens=160, temperature=1.0, seed=1,
                                       n=10, response_format=_schema_format(PERSON))
    assert len(r.choices) == 10
    for c in r.choices:  # n choices: n seeds
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), PERSON)


def test_json_object(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=ASK, max_tokens=120, temperature=1.0, seed=3,
                                       n=4, response_format={"type": "json_object"})
    assert len(r.choices) == 4
    for c in r.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)
        else:  # an object can go on for ever: what was cut is still the start of an object
            assert c.finish_reason == "length" and c.message.content.startswith("{")
    assert any(c.finish_reason == "stop" for c in r.choices)


def test_regex_choice_and_grammar(client, model_name):
    msgs = [{"role": "user", "content": "Give me an order code."}]
    r = client.chat.completions.create(model=model_name, messages=msgs, max_tokens=20, temperature=1.0, seed=4,
                                       n=6, extra_body={"structured_outputs": {"regex": r"[A-Z]{2}-[0-9]{3}"}})
    assert len(r.choices) == 6
    assert all(re.fullmatch(r"[A-Z]{2}-[0-9]{3}", c.message.content) for c in r.choices)
    choices = ["positive", "negative", "neutral"]
    r = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Sentiment of: I love this!"}], max_tokens=10,
        temperature=1.0, seed=5, n=6, extra_body={"structured_outputs": {"choice": choices}})
    assert len(r.choices) == 6
    assert all(c.message.content in choices and c.finish_reason == "stop" for c in r.choices)
    r = client.chat.completions.create(
        model=model_name, messages=msgs, max_tokens=10, temperature=1.0, seed=6, n=4,
        extra_body={"structured_outputs": {"grammar": 'root ::= "yes" | "no" | "maybe " [0-9]'}})
    assert len(r.choices) == 4
    assert all(re.fullmatch(r"yes|no|maybe [0-9]", c.message.content) for c in r.choices)


def test_streamed_n3_equals_non_streamed(client, model_name):
    kw = dict(model=model_name, messages=ASK, max_tokens=160, temperature=1.0, seed=11, n=3,
              response_format=_schema_format(PERSON))
    whole = client.chat.completions.create(**kw)
    assert len(whole.choices) == 3
    parts = ["", "", ""]
    finish = [None, None, None]
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            parts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    assert parts == [c.message.content for c in whole.choices]
    assert finish == ["stop"] * 3
    for p in parts:
        jsonschema.validate(json.loads(p), PERSON)


def test_logprobs_follow_the_grammar(client, model_name):
    # A regex with one match: at each step the grammar allows exactly the tokens that are a prefix of what is
    # left of it, and once it is written, only a stop token. Logprobs are those of the masked distribution.
    target = "Paris, France"
    r = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Capital of France?"}], max_tokens=20,
        temperature=0, logprobs=True, top_logprobs=20, extra_body={"structured_outputs": {"regex": target}})
    assert r.choices[0].message.content == target
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content[:-1]) == target  # then the stop token
    written = ""
    forced = 0
    for step in content:
        left = target[len(written):]
        # Fewer than 20 tokens are allowed at each step (at most one per prefix of `left`): all of them
        # are in top_logprobs, the rest of which the grammar forbids.
        if left:
            is_allowed = [bool(t.token) and left.startswith(t.token) for t in step.top_logprobs]
        else:  # all of it is written: only the stop token, the one picked, may follow
            is_allowed = [i == 0 for i in range(len(step.top_logprobs))]
        allowed = [t for t, ok in zip(step.top_logprobs, is_allowed, strict=True) if ok]
        forbidden = [t for t, ok in zip(step.top_logprobs, is_allowed, strict=True) if not ok]
        assert step.token in [t.token for t in allowed]
        assert forbidden and all(t.logprob == -9999.0 for t in forbidden), (left, step.top_logprobs)
        assert all(t.logprob > -9999.0 for t in allowed), (left, step.top_logprobs)
        assert sum(math.exp(t.logprob) for t in allowed) == pytest.approx(1.0, abs=1e-3), (left, step.top_logprobs)
        if len(allowed) == 1:  # a forced token has all the mass
            forced += 1
            assert step.logprob == pytest.approx(0.0, abs=1e-4)
        written += step.token
    assert forced >= 1  # at least the stop token


def test_completions_and_sessions_and_skipping(client, model_name):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    r = client.completions.create(model=model_name, prompt="Is the sky blue? Answer in JSON: ", max_tokens=30,
                                  temperature=0, extra_body={"structured_outputs": {"json": schema}})
    jsonschema.validate(json.loads(r.choices[0].text), schema)
    msgs = [{"role": "user", "content": "Is water wet? Answer in JSON."}]
    fmt = _schema_format(schema)
    first = client.chat.completions.create(model=model_name, messages=msgs, max_tokens=30, temperature=0,
                                           response_format=fmt, extra_headers={"X-Session-Id": "so-session"})
    msgs += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And is fire hot?"}]
    again = client.chat.completions.create(model=model_name, messages=msgs, max_tokens=30, temperature=0,
                                           response_format=fmt, extra_headers={"X-Session-Id": "so-session"})
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    jsonschema.validate(json.loads(again.choices[0].message.content), schema)
    skipped = client.chat.completions.create(model=model_name, messages=msgs, max_tokens=30, temperature=0,
                                             response_format=fmt, extra_body={"skip": {"sublayers": 4}})
    jsonschema.validate(json.loads(skipped.choices[0].message.content), schema)


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format.json_schema.schema"),
    ({"extra_body": {"structured_outputs": {"regex": "[a-"}}}, "structured_outputs.regex"),
    ({"extra_body": {"structured_outputs": {"grammar": "root ::= undefined_rule"}}}, "structured_outputs.grammar"),
    ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["a"]}}}, None),
    ({"response_format": {"type": "json_schema"}}, None),
])
def test_a_spec_that_cannot_compile_is_a_400_naming_it(client, model_name, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name, messages=ASK, max_tokens=5, **extra)
    body = e.value.body
    assert body["type"] == "invalid_request_error"
    if param is not None:
        assert body["param"] == param and param in body["message"]
    # the server is still fine
    r = client.chat.completions.create(model=model_name, messages=ASK, max_tokens=3)
    assert r.choices[0].message.content
