"""/v1/responses with the official client (strict response validation): basic, streamed events in order,
a function call and its output round trip, previous_response_id as a session (cached tokens, the same output
as the conversation sent as chat messages, again after a restart), tenants, retrieve/delete/cancel."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import jsonschema
import openai
import pytest
from openai import OpenAI

from tests.conftest import ServerProcess, started

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                          "required": ["city"], "additionalProperties": False}}
EVENTS_OF_A_TEXT_ANSWER = ["response.created", "response.in_progress", "response.output_item.added",
                           "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                           "response.content_part.done", "response.output_item.done", "response.completed"]


def _client(srv: ServerProcess, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=srv.base_url + "/v1", api_key=key, _strict_response_validation=True, max_retries=0,
                  timeout=120)


def test_basic_retrieve_delete(client, model_name):
    r = client.responses.create(model=model_name, input="What is the capital of France?", max_output_tokens=30,
                                temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert "Paris" in r.output_text
    assert r.usage.input_tokens > 10 and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    again = client.responses.retrieve(r.id)
    assert again.id == r.id and again.output_text == r.output_text
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    short = client.responses.create(model=model_name, input="Tell me a long story about a dragon.",
                                    max_output_tokens=5, instructions="You are a storyteller.", temperature=0,
                                    store=False)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    with pytest.raises(openai.NotFoundError):  # store: false keeps nothing
        client.responses.retrieve(short.id)


def test_streamed_events_in_order(client, model_name):
    kw = dict(model=model_name, input="Name three colors.", max_output_tokens=40, temperature=0)
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    collapsed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert collapsed == EVENTS_OF_A_TEXT_ANSWER
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-1].response
    assert text == done.output_text == whole.output_text
    assert client.responses.retrieve(done.id).output_text == text


def test_function_call_round_trip(client, model_name):
    first = client.responses.create(model=model_name, input="What is the weather in Paris?", tools=[WEATHER],
                                    tool_choice="required", parallel_tool_calls=False, max_output_tokens=60,
                                    temperature=0)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    follow = client.responses.create(
        model=model_name, previous_response_id=first.id, tools=[WEATHER], max_output_tokens=30, temperature=0,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 degrees, sunny"}])
    assert follow.status == "completed" and follow.previous_response_id == first.id
    assert follow.usage.input_tokens_details.cached_tokens > 0
    # Streamed, a required call comes as output_item.added, argument deltas, then done.
    events = list(client.responses.create(model=model_name, input="Weather in Rome?", tools=[WEATHER],
                                          tool_choice="required", parallel_tool_calls=False, max_output_tokens=60,
                                          temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == args and json.loads(args)["city"]
    assert kinds[-1] == "response.completed"


@pytest.mark.slow
def test_previous_response_id_is_a_durable_session(tmp_path: Path, model_files):
    """cached_tokens > 0 and the chat oracle's output on a follow-up, again after a restart (the SSD tier
    holds both the stored response and its KV); another API key gets 404."""
    args = ("--kv-cache-gb", "0.1", "--api-key", "key-a,key-b", "--ssd-dir", str(tmp_path / "ssd"))
    questions = ["Name three fruits.", "Which of them is the sweetest?", "And the sourest?"]
    with started({"s": ServerProcess(*args, log=tmp_path / "one.log")}) as procs:
        a, b = _client(procs["s"], "key-a"), _client(procs["s"], "key-b")
        model = a.models.list().data[0].id
        first = a.responses.create(model=model, input=questions[0], max_output_tokens=40, temperature=0)
        second = a.responses.create(model=model, input=questions[1], previous_response_id=first.id,
                                    max_output_tokens=40, temperature=0)
        assert second.usage.input_tokens_details.cached_tokens > 0
        chat = a.chat.completions.create(model=model, max_tokens=40, temperature=0, messages=[
            {"role": "user", "content": questions[0]}, {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": questions[1]}])
        assert second.output_text == chat.choices[0].message.content
        with pytest.raises(openai.NotFoundError):
            b.responses.retrieve(second.id)
        with pytest.raises(openai.NotFoundError):
            b.responses.create(model=model, input="hi", previous_response_id=second.id)
    with started({"s": ServerProcess(*args, log=tmp_path / "two.log")}) as procs:
        a = _client(procs["s"], "key-a")
        third = a.responses.create(model=model, input=questions[2], previous_response_id=second.id,
                                   max_output_tokens=40, temperature=0)
        assert third.usage.input_tokens_details.cached_tokens > 0
        chat = a.chat.completions.create(model=model, max_tokens=40, temperature=0, messages=[
            {"role": "user", "content": questions[0]}, {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": questions[1]}, {"role": "assistant", "content": second.output_text},
            {"role": "user", "content": questions[2]}])
        assert third.output_text == chat.choices[0].message.content
        assert a.responses.retrieve(first.id).output_text == first.output_text


def test_cancel_a_running_response(client, model_name, server):
    stream = client.responses.create(model=model_name, input="Write a very long story about the sea.",
                                     max_output_tokens=2000, temperature=0, stream=True)
    events = []
    rid = None
    for e in stream:
        events.append(e)
        if e.type == "response.output_text.delta" and rid is None:
            rid = events[0].response.id
            threading.Thread(target=client.responses.cancel, args=(rid,)).start()
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "cancelled"
    assert events[-1].response.usage.output_tokens < 2000
    assert client.responses.retrieve(rid).status == "cancelled"
    with pytest.raises(openai.BadRequestError):  # only a running response can be cancelled
        client.responses.cancel(rid)
    deadline = time.monotonic() + 5
    while server.metric("strata_requests_running"):
        assert time.monotonic() < deadline, "the cancelled request kept running"
        time.sleep(0.1)


def test_store_false_keeps_no_kv(client, model_name, server):
    """A stored response's chain is a session the server keeps; one with store: false leaves none behind."""
    import httpx

    kw = dict(model=model_name, input="Describe a quiet harbour at dawn in one short sentence.",
              max_output_tokens=4, temperature=0)
    kept = client.responses.create(**kw)
    gone = client.responses.create(store=False, **kw)
    sessions = server.base_url + "/v1/sessions/resp_"
    assert httpx.get(sessions + kept.id, timeout=30).status_code == 200
    assert httpx.get(sessions + gone.id, timeout=30).status_code == 404
