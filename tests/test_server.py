"""The real server in a subprocess, driven by the official openai client with strict response validation."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import httpx
import openai
import pytest

from tests.conftest import ServerProcess

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def test_capital_of_france(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=FRANCE, max_tokens=30, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    u = r.usage
    assert u.prompt_tokens > 10 and u.completion_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    # Without a session key only whole blocks of a shared prefix (the template's system prompt) are reused.
    assert 0 <= u.prompt_tokens_details.cached_tokens < u.prompt_tokens
    assert u.prompt_tokens_details.cached_tokens % 16 == 0


def test_stream_equals_non_stream_with_usage(client, model_name):
    full = client.chat.completions.create(model=model_name, messages=STORY, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=model_name, messages=STORY, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    # The same prompt again: its whole blocks are now cached.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (full.usage.prompt_tokens - 1) // 16 * 16


def test_completions_text_tokens_and_list_prompts(client, model_name):
    r = client.completions.create(model=model_name, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert "Paris" in r.choices[0].text
    ids = httpx.post(client.base_url.join("/tokenize").__str__().replace("/v1", ""),
                     json={"prompt": "The capital of France is"}).json()["tokens"]
    by_ids = client.completions.create(model=model_name, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    many = client.completions.create(model=model_name, prompt=["One, two,", "Red, green,"], max_tokens=4,
                                     temperature=0, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text  # greedy: both choices agree
    # The SDK's Completion type has no null finish_reason, which every streamed chunk but the last carries
    # (as OpenAI's own stream does): this one check runs without strict validation.
    lax = client.with_options()
    lax._strict_response_validation = False
    streamed = lax.completions.create(model=model_name, prompt="The capital of France is", max_tokens=8,
                                      temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_n_choices_and_seeds(client, model_name):
    kw = dict(model=model_name, messages=STORY, max_tokens=8, temperature=1.0, seed=1234,
              extra_body={"ignore_eos": True})
    a = client.chat.completions.create(n=3, **kw)
    b = client.chat.completions.create(n=3, **kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]  # same seed, same output
    assert len(set(texts)) > 1  # choices differ from each other
    assert a.usage.completion_tokens == 3 * 8  # ignore_eos: every choice runs to max_tokens
    streamed = client.chat.completions.create(n=3, stream=True, **kw)
    parts = ["", "", ""]
    for c in streamed:
        for ch in c.choices:
            parts[ch.index] += ch.delta.content or ""
    assert parts == texts


def test_stop_strings_never_emitted_also_in_stream(client, model_name):
    msgs = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    full = client.chat.completions.create(model=model_name, messages=msgs, max_tokens=40, temperature=0)
    text = full.choices[0].message.content
    stop = text[text.index("4") : text.index("4") + 3]
    r = client.chat.completions.create(model=model_name, messages=msgs, max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].message.content == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model=model_name, messages=msgs, max_tokens=40, temperature=0,
                                            stop=stop, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text[: text.index(stop)]


def test_logprobs(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=FRANCE, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        assert item.token == item.top_logprobs[0].token  # greedy picks the most likely token
    c = client.completions.create(model=model_name, prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.tokens) == 3 and len(c.choices[0].logprobs.top_logprobs[0]) == 2


@pytest.mark.slow
def test_concurrent_greedy_requests_match_alone(client, model_name):
    questions = ["Tell me a joke.", "What is 2+2?", "Name three colors.", "Why is the sky blue?",
                 "What is the capital of France?", "Write a haiku about rain.", "What is Python?", "Say hi."]

    def ask(q: str) -> str:
        r = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": q}],
                                           max_tokens=12, temperature=0)
        return r.choices[0].message.content

    alone = [ask(q) for q in questions]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, questions))
    assert together == alone


def test_models_tokenize_detokenize_version_health(client, model_name, server):
    m = client.models.retrieve(model_name)
    assert m.id == model_name and m.model_extra["max_model_len"] > 0
    base = server.base_url
    toks = httpx.post(base + "/tokenize", json={"messages": FRANCE}).json()
    assert toks["count"] == len(toks["tokens"]) > 5
    text = httpx.post(base + "/detokenize", json={"tokens": toks["tokens"]}).json()["prompt"]
    assert "capital of France" in text
    assert httpx.get(base + "/version").json()["version"]
    assert httpx.get(base + "/health").status_code == 200


def test_disconnect_mid_stream_frees_the_request(client, model_name, server):
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.base_url + "/v1/chat/completions", json={
            "model": model_name, "messages": STORY, "max_tokens": 2000, "stream": True, "ignore_eos": True,
        }) as resp:
            lines = resp.iter_lines()
            for _ in range(6):
                next(lines)
            assert server.metric("strata_requests_running") == 1
            assert server.metric("strata_kv_blocks_used") > 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if server.metric("strata_requests_running") == 0 and server.metric("strata_kv_blocks_used") == 0:
            break
        time.sleep(0.2)
    assert server.metric("strata_requests_running") == 0
    assert server.metric("strata_kv_blocks_used") == 0
    assert server.metric('strata_requests_finished_total{reason="abort"}') >= 1


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, model_files):
    srv = ServerProcess("--kv-cache-gb", "0.1", "--api-key", "key-a,key-b",
                        log=tmp_path_factory.mktemp("auth") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_api_key_auth(auth_server):
    base = auth_server.base_url + "/v1"
    good = openai.OpenAI(base_url=base, api_key="key-b", max_retries=0, _strict_response_validation=True)
    name = good.models.list().data[0].id
    r = good.chat.completions.create(model=name, messages=FRANCE, max_tokens=3, temperature=0)
    assert r.choices[0].message.content
    bad = openai.OpenAI(base_url=base, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=name, messages=FRANCE, max_tokens=3)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert httpx.get(auth_server.base_url + "/health").status_code == 200  # health stays open
    assert httpx.post(auth_server.base_url + "/tokenize", json={"prompt": "x"}).status_code == 401


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_and_exits(tmp_path, model_files):
    srv = ServerProcess("--kv-cache-gb", "0.1", "--shutdown-timeout", "300", log=tmp_path / "server.log")
    srv.wait_ready()
    c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
    name = c.models.list().data[0].id
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(c.chat.completions.create, model=name, messages=STORY, max_tokens=20, temperature=0,
                          extra_body={"ignore_eos": True})
        time.sleep(1.0)
        srv.proc.send_signal(signal.SIGTERM)
        r = fut.result(timeout=60)
    assert r.usage.completion_tokens == 20  # the in-flight request was finished, not cut
    assert srv.proc.wait(timeout=60) == 0
