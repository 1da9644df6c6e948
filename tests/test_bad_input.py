"""Bad input gets the right 4xx with the OpenAI error body, and the server stays healthy."""

from __future__ import annotations

import json
import re

import httpx
import pytest

LONG = "word " * 9000

CHAT_CASES = [
    # (name, body, expected status, expected param or None)
    ("missing messages", {}, 400, "messages"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("messages not a list", {"messages": "hi"}, 400, "messages"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ("content wrong type", {"messages": [{"role": "user", "content": 5}]}, 400, None),
    ("message not an object", {"messages": ["hi"]}, 400, None),
    ("negative max_tokens", {"max_tokens": -1}, 400, "max_tokens"),
    ("zero max_tokens", {"max_tokens": 0}, 400, "max_tokens"),
    ("huge max_tokens", {"max_tokens": 10**9}, 400, "max_tokens"),
    ("max_tokens wrong type", {"max_tokens": "many"}, 400, "max_tokens"),
    ("temperature too high", {"temperature": 3.5}, 400, "temperature"),
    ("temperature negative", {"temperature": -0.1}, 400, "temperature"),
    ("top_p zero", {"top_p": 0}, 400, "top_p"),
    ("n zero", {"n": 0}, 400, "n"),
    ("n too large", {"n": 1000}, 400, "n"),
    ("presence_penalty out of range", {"presence_penalty": 5}, 400, "presence_penalty"),
    ("top_logprobs out of range", {"logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ("top_logprobs without logprobs", {"top_logprobs": 2}, 400, None),
    ("logit_bias bad key", {"logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("logit_bias out of vocab", {"logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ("stop wrong type", {"stop": 5}, 400, "stop"),
    ("stream wrong type", {"stream": "yes please"}, 400, "stream"),
    ("tool name with spaces", {"tools": [{"type": "function", "function": {"name": "get weather"}}]}, 400,
     "tools"),
    ("tool_choice naming no tool", {"tools": [{"type": "function", "function": {"name": "f"}}],
                                    "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400,
     "tool_choice"),
    ("tool_choice required without tools", {"tool_choice": "required"}, 400, "tool_choice"),
    ("json_schema without its schema", {"response_format": {"type": "json_schema"}}, 400, "response_format"),
    ("unknown response_format type", {"response_format": {"type": "yaml"}}, 400, "response_format"),
    ("two structured output specs", {"response_format": {"type": "json_object"},
                                     "structured_outputs": {"regex": "a+"}}, 400, "structured_outputs"),
    ("image content", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://x"}}]}]}, 400, None),
    ("too-long prompt", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("logit_bias over 300 entries", {"logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias"),
    ("logit_bias superscript digit", {"logit_bias": {"\u00b2": 1}}, 400, "logit_bias"),
    ("17 stop strings", {"stop": [f"s{i}" for i in range(17)]}, 400, "stop"),
    ("stop string over 512 chars", {"stop": ["x" * 513]}, 400, "stop"),
    ("single stop over 512 chars", {"stop": "x" * 513}, 400, "stop"),
    ("repetition_penalty tiny", {"repetition_penalty": 1e-300}, 400, "repetition_penalty"),
    ("seed beyond int64", {"seed": 2**64}, 400, "seed"),
    ("unknown model", {"model": "gpt-9"}, 404, "model"),
]


# Extremes that must be served (200), each compared with greedy decoding where it should equal it.
ACCEPTED = [
    ("temperature 1e-45", {"temperature": 1e-45}, True),
    ("temperature 0 exactly", {"temperature": 0}, True),
    ("top_p 1e-9", {"top_p": 1e-9, "temperature": 1.0}, True),
    ("top_p 5e-324", {"top_p": 5e-324, "temperature": 1.0}, True),  # 0 in float32
    ("top_k 10**9", {"top_k": 10**9, "temperature": 1.0, "seed": 7}, False),
    ("logit_bias 300 entries", {"logit_bias": {str(i): 0.5 for i in range(300)}}, False),
    ("16 stop strings of 512 chars", {"stop": [chr(0x4e00 + i) * 512 for i in range(16)], "temperature": 0}, True),
    ("seed int64 max", {"seed": 2**63 - 1, "n": 2}, False),
    ("seed int64 min", {"seed": -(2**63)}, False),
    ("repetition_penalty 0.01", {"repetition_penalty": 0.01, "temperature": 1e-6}, False),
]

# Python's json reads (and writes) NaN and Infinity; none of them is a valid number for any float field.
NON_FINITE = [
    ("temperature", "NaN"), ("temperature", "Infinity"), ("top_p", "NaN"), ("min_p", "NaN"),
    ("presence_penalty", "-Infinity"), ("frequency_penalty", "NaN"), ("repetition_penalty", "Infinity"),
]


def _post(server, path: str, **kw) -> httpx.Response:
    return httpx.post(server.base_url + path, timeout=60, **kw)


def _assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param), err
    return err


@pytest.mark.parametrize("name,patch,status,param", CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def test_chat_bad_input(server, model_name, name, patch, status, param):
    body = {"model": model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4} | patch
    if name == "missing messages":
        body.pop("messages")
    _assert_error(_post(server, "/v1/chat/completions", json=body), status, param)


def test_too_long_prompt_says_limit_and_count(server, model_name):
    messages = [{"role": "user", "content": LONG}]
    # The server's own count of the templated prompt, and its context limit, as /tokenize reports them.
    tokenized = _post(server, "/tokenize", json={"model": model_name, "messages": messages})
    assert tokenized.status_code == 200, tokenized.text
    count, limit = tokenized.json()["count"], tokenized.json()["max_model_len"]
    assert count > limit
    err = _assert_error(_post(server, "/v1/chat/completions", json={"model": model_name, "messages": messages}), 400)
    assert err["code"] == "context_length_exceeded"
    # The message names exactly these two numbers: the limit, then the prompt's tokens.
    assert [int(n) for n in re.findall(r"[0-9]+", err["message"])] == [limit, count], err["message"]


def test_malformed_json(server):
    err = _assert_error(_post(server, "/v1/chat/completions", content=b'{"model": ', headers={
        "content-type": "application/json"}), 400)
    assert "JSON" in err["message"]


def test_json_not_an_object(server):
    _assert_error(_post(server, "/v1/chat/completions", json=[1, 2, 3]), 400)


def test_wrong_content_type(server, model_name):
    _assert_error(_post(server, "/v1/chat/completions", content=b"model=x", headers={
        "content-type": "application/x-www-form-urlencoded"}), 415)


def test_oversize_body(server, model_name):
    big = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * (9 * 2**20) + b'"}]}'
    _assert_error(_post(server, "/v1/chat/completions", content=big, headers={"content-type": "application/json"}),
                  413)


def test_completions_bad_input(server, model_name):
    cases = [
        ({"prompt": ""}, 400), ({"prompt": []}, 400), ({"prompt": [10**8]}, 400), ({"prompt": 5}, 400),
        ({"prompt": [-38]}, 400), ({"prompt": [[1, 2], [-1]]}, 400),
        ({"prompt": "x", "best_of": 3}, 400), ({"prompt": "x", "suffix": "y"}, 400),
        ({"prompt": "x", "logprobs": 9}, 400), ({}, 400),
    ]
    for patch, status in cases:
        _assert_error(_post(server, "/v1/completions", json={"model": model_name, "max_tokens": 2} | patch), status)


def test_responses_metadata_within_openai_limits(server, model_name):
    """16 pairs, keys up to 64 characters, values up to 512: beyond any of them a 400 naming metadata."""
    body = {"model": model_name, "input": "hi", "max_output_tokens": 1, "store": False}
    at_limits = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    assert _post(server, "/v1/responses", json=body | {"metadata": at_limits}).status_code == 200
    for metadata in ({str(i): "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}):
        _assert_error(_post(server, "/v1/responses", json=body | {"metadata": metadata}), 400, "metadata")


def test_unknown_route_and_method(server):
    _assert_error(httpx.get(server.base_url + "/v1/nothing-here"), 404)
    _assert_error(httpx.get(server.base_url + "/v1/chat/completions"), 405)
    _assert_error(httpx.get(server.base_url + "/v1/models/gpt-9"), 404)


def test_detokenize_out_of_vocab(server):
    _assert_error(_post(server, "/detokenize", json={"tokens": [10**9]}), 400, "tokens")
    _assert_error(_post(server, "/tokenize", json={}), 400)


def test_server_stays_healthy_after_bad_input(server, client, model_name):
    assert httpx.get(server.base_url + "/health").status_code == 200
    r = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Say hi."}],
                                       max_tokens=5, temperature=0)
    assert r.choices[0].message.content


@pytest.mark.parametrize("name,patch,greedy", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_chat_accepted_extremes(server, model_name, name, patch, greedy):
    body = {"model": model_name, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 6}
    r = _post(server, "/v1/chat/completions", json=body | patch)
    assert r.status_code == 200, r.text
    texts = [c["message"]["content"] for c in r.json()["choices"]]
    assert all(isinstance(t, str) for t in texts)
    if greedy:
        ref = _post(server, "/v1/chat/completions", json=body | {"temperature": 0}).json()
        assert texts == [ref["choices"][0]["message"]["content"]]


@pytest.mark.parametrize("field,literal", NON_FINITE, ids=[f"{f}={v}" for f, v in NON_FINITE])
def test_non_finite_numbers(server, model_name, field, literal):
    # json.dumps writes float("nan") as NaN, as a client built on Python's json would.
    raw = json.dumps({"model": model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                      field: float(literal)})
    err = _assert_error(_post(server, "/v1/chat/completions", content=raw.encode(), headers={
        "content-type": "application/json"}), 400, field)
    assert literal in raw and "finite" in err["message"]
    raw = json.dumps({"model": model_name, "prompt": "hi", "max_tokens": 2, "logit_bias": {"5": float(literal)}})
    _assert_error(_post(server, "/v1/completions", content=raw.encode(), headers={
        "content-type": "application/json"}), 400, "logit_bias")
