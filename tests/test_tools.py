"""Tool calls: required and named calls always parse and match their function's schema (jsonschema, many
seeds, temperature 1); streamed deltas assemble into the non-streamed calls; parallel calls only when
allowed; a tool transcript renders right; auto calls are read in each parser's format, whole or streamed."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema
import pytest

from strata.engine.grammar import GrammarCompiler
from strata.engine.tokenizer import Tokenizer
from strata.server.protocol import ChatCompletionRequest
from strata.server.tool_calls import ToolCallStream, parse_tool_output
from strata.server.tools import template_messages, tool_grammar, tool_plan
from tests.conftest import ServerProcess, started

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20},
                                                    "hour24": {"type": "boolean"}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris and the time in Tokyo?"}]


def _check_calls(message, allowed: set[str]) -> list[tuple[str, dict]]:
    calls = []
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in allowed
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        calls.append((call.function.name, args))
    return calls


def _assert_auto_answer_is_its_output_parsed(client, model: str, tokenizer: Tokenizer, messages: list[dict],
                                             answer, max_tokens: int) -> None:
    """What tool_choice auto promises (chat.py's _message, tool_calls.parse_tool_output): the message is what
    the template's parser reads in the generated text (its calls, or the text itself as content), and
    finish_reason is "tool_calls" exactly when calls were read in an output that stopped. The generated text
    is the greedy completion of the same prompt (the chat request's tokens, tools rendered)."""
    body = ChatCompletionRequest(model=model, messages=messages, tools=TOOLS)
    plan = tool_plan(body, tokenizer.template_source, None)
    rendered, tools = template_messages(body.messages, plan, tokenizer.template_takes_tools)
    raw = client.completions.create(model=model, prompt=tokenizer.encode_chat(rendered, True, tools),
                                    max_tokens=max_tokens, temperature=0).choices[0]
    content, calls = parse_tool_output(plan, raw.text)
    (choice,) = answer.choices
    assert choice.message.content == content, raw.text
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []] == \
        [(c.name, c.arguments) for c in calls], raw.text
    assert choice.finish_reason == ("tool_calls" if calls and raw.finish_reason == "stop" else raw.finish_reason)


def test_required_calls_match_their_schemas(client, model_name):
    # One call per answer (parallel calls could go on until max_tokens at temperature 1).
    r = client.chat.completions.create(model=model_name, messages=ASK, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=100, temperature=1.0, seed=1, n=10)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        assert len(_check_calls(c.message, set(SCHEMAS))) == 1


def test_named_call_matches_its_schema(client, model_name):
    r = client.chat.completions.create(
        model=model_name, messages=ASK, tools=TOOLS, max_tokens=100, temperature=1.0, seed=2, n=10,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    for c in r.choices:
        assert c.finish_reason == "stop"  # as OpenAI, for a named call
        assert [name for name, _ in _check_calls(c.message, {"get_time"})] == ["get_time"]


def test_streamed_deltas_assemble_into_the_same_calls(client, model_name):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        kw = dict(model=model_name, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=150,
                  temperature=1.0, seed=3, n=2)
        whole = client.chat.completions.create(**kw)
        calls: list[dict[int, dict]] = [{}, {}]
        finish = [None, None]
        for chunk in client.chat.completions.create(stream=True, **kw):
            for c in chunk.choices:
                finish[c.index] = c.finish_reason or finish[c.index]
                for d in c.delta.tool_calls or []:
                    if d.id is not None:  # the first delta of a call: id and name
                        assert d.index not in calls[c.index] and d.function.name
                        calls[c.index][d.index] = {"name": d.function.name, "arguments": ""}
                    calls[c.index][d.index]["arguments"] += d.function.arguments or ""
        for i, c in enumerate(whole.choices):
            assert [calls[i][k] for k in sorted(calls[i])] == [
                {"name": t.function.name, "arguments": t.function.arguments} for t in c.message.tool_calls]
            assert finish[i] == c.finish_reason


def test_parallel_calls_only_when_allowed(tokenizer, model_files):
    """The required grammar takes two calls when parallel calls are allowed and exactly one when not."""
    compiler = GrammarCompiler(model_files.directory, 49152, [2])
    one = '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]'
    two = one[:-1] + ', {"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}]'
    bad = '[{"name": "get_time", "arguments": {"city": "Paris"}}]'
    for parallel in (True, False):
        body = ChatCompletionRequest(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                     parallel_tool_calls=parallel)
        plan = tool_plan(body, "", None)
        grammar = compiler.compile(tool_grammar(plan)[0])
        for text, ok in ((one, True), (two, parallel), (bad, False)):
            state = grammar.matcher()
            accepted = all(state.accept(t) for t in tokenizer.encode(text, add_special_tokens=False))
            assert (accepted and state.accept(2)) == ok, (text, parallel)


def test_a_tool_transcript_renders_and_continues(client, model_name, tokenizer):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    body = ChatCompletionRequest(model="m", messages=history, tools=TOOLS)
    messages, tools = template_messages(body.messages, tool_plan(body, "", None), takes_tools=False)
    text = tokenizer.render_chat(messages, True, tools)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in text
    assert "<tool_response>\n18 degrees, sunny\n</tool_response>" in text
    assert '"name": "get_time"' in text  # the tools, described in the system message
    r = client.chat.completions.create(model=model_name, messages=history, tools=TOOLS, max_tokens=30,
                                       temperature=0)
    _assert_auto_answer_is_its_output_parsed(client, model_name, tokenizer, history, r, max_tokens=30)
    # Without tools the same transcript still renders its calls and results.
    r2 = client.chat.completions.create(model=model_name, messages=history, max_tokens=5, temperature=0)
    assert r2.usage.prompt_tokens < r.usage.prompt_tokens


AUTO_OUTPUTS = {
    "hermes": ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
               '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
               '{"zone": "Asia/Tokyo"}}\n</tool_call>'),
    "llama3_json": ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
                    '{"name": "get_time", "parameters": {"zone": "Asia/Tokyo"}}'),
    "mistral": ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
                '{"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}]'),
}


@pytest.mark.parametrize("parser", sorted(AUTO_OUTPUTS))
@pytest.mark.parametrize("parallel", [True, False])
def test_auto_calls_parse_whole_and_streamed_alike(parser, parallel):
    body = ChatCompletionRequest(model="m", messages=ASK, tools=TOOLS, tool_choice="auto",
                                 parallel_tool_calls=parallel)
    plan = tool_plan(body, "", parser)
    text = AUTO_OUTPUTS[parser]
    content, calls = parse_tool_output(plan, text)
    expected = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"zone": "Asia/Tokyo"})]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == expected[: 2 if parallel else 1]
    assert content == ("Let me check." if parser == "hermes" else None)
    rng = random.Random(0)
    for _ in range(20):  # the same text in random pieces
        stream, deltas, pos = ToolCallStream(plan), [], 0
        while pos < len(text):
            step = rng.randint(1, 7)
            deltas += stream.feed(text[pos:pos + step])
            pos += step
        deltas += stream.finish()
        streamed = [d["tool_calls"][0]["function"] for d in deltas if "tool_calls" in d]
        assert [(f["name"], f["arguments"]) for f in streamed] == [(c.name, c.arguments) for c in calls]
        assert "".join(d.get("content", "") for d in deltas).strip() == (content or "")
    plain = "No tools needed: it is 4."
    assert parse_tool_output(plan, plain) == (plain, [])


HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}
{% endif %}You may call tools. <tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
For each call write <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'tool' %}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% elif message.tool_calls %}<|im_start|>assistant
{% for call in message.tool_calls %}<tool_call>{"name": "{{ call.function.name }}", "arguments": \
{{ call.function.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>
{% elif not (tools and message.role == 'system') %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.mark.slow
def test_auto_with_a_template_that_takes_tools(tmp_path: Path, model_files):
    """A model whose chat template renders tools itself (Hermes/Qwen kind): tools reach the template, auto
    answers are text or calls in that format, and required calls still match their schemas."""
    from openai import OpenAI

    model = tmp_path / "hermes-model"
    model.mkdir()
    for f in model_files.directory.iterdir():
        if f.name != "chat_template.jinja":
            (model / f.name).symlink_to(f)
    (model / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    srv = ServerProcess("--model", str(model), "--kv-cache-gb", "0.3", log=tmp_path / "server.log")
    with started({"hermes": srv}):
        client = OpenAI(base_url=srv.base_url + "/v1", api_key="unused", _strict_response_validation=True,
                        max_retries=0, timeout=120)
        name = client.models.list().data[0].id
        plain = client.chat.completions.create(model=name, messages=ASK, max_tokens=1)
        auto = client.chat.completions.create(model=name, messages=ASK, tools=TOOLS, max_tokens=60,
                                              temperature=0)
        assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the template rendered the tools
        _assert_auto_answer_is_its_output_parsed(client, name, Tokenizer(model), ASK, auto, max_tokens=60)
        req = client.chat.completions.create(model=name, messages=ASK, tools=TOOLS, tool_choice="required",
                                             parallel_tool_calls=False, max_tokens=100, temperature=1.0, seed=4,
                                             n=4)
        for c in req.choices:
            _check_calls(c.message, set(SCHEMAS))
