"""AdaSkip in the serving path: mixed batches in the engine, the `skip` field and header, response
headers, errors, and session KV that was computed with skipping never being reused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from strata.engine.config import EngineConfig
from strata.engine.llm_engine import LLMEngine, RequestRejected
from strata.engine.request import Request, SkipRequest
from strata.engine.sampling_params import SamplingParams
from strata.engine.sequence import Sequence
from strata.engine.skip.calibrate import run_calibration
from strata.engine.skip.policy import make_policy
from strata.engine.skip.profile import PROFILE_FILE, SkipProfile
from strata.engine.skip_setup import load_profile
from tests.conftest import POOL_BYTES_PER_TOKEN, ServerProcess, started

QUESTION = [{"role": "user", "content": "Tell me about the moon."}]
TURN_2 = "How far away is it?"


def _link_model(src: Path, dst: Path, other_weights: bool = False) -> Path:
    """The model at `src` without its profile; with `other_weights`, under another fingerprint (a changed
    config), so that the profile shipped for the default model does not apply either."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != PROFILE_FILE and f.is_file():
            if other_weights and f.name == "config.json":
                (dst / f.name).write_text(json.dumps(json.loads(f.read_text()) | {"strata_test_marker": 1}))
            else:
                (dst / f.name).symlink_to(f)
    return dst


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, model_files) -> tuple[Path, Path]:
    """The default model twice: with a tiny AdaSkip profile (2 texts of 256 tokens) and without one."""
    root = tmp_path_factory.mktemp("skip-models")
    calibrated = _link_model(model_files.directory, root / "calibrated")
    run_calibration(str(calibrated), requests=2, min_tokens=256, chunk=256, progress=False)
    return calibrated, _link_model(model_files.directory, root / "uncalibrated", other_weights=True)


@pytest.fixture(scope="module")
def engine(model_dirs) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", model=str(model_dirs[0]), kv_cache_gb=0.1, session_cache=False))


def run(engine: LLMEngine, requests: list[Request], seqs: dict[str, Sequence] | None = None
        ) -> dict[str, tuple[list[int], list[float]]]:
    """Greedy tokens and their logprobs per request, from an empty device cache (no prefix reuse)."""
    for key in engine.kv.cache.keys():
        engine.kv.cache.drop(key)
    for r in requests:
        engine.add_request(r)
        if seqs is not None:
            seqs[r.request_id] = engine._seqs[r.request_id]
    out: dict[str, tuple[list[int], list[float]]] = {r.request_id: ([], []) for r in requests}
    while engine.has_work():
        for o in engine.step():
            toks, lps = out[o.request_id]
            toks += o.new_token_ids
            lps += [lp.logprob for lp in o.logprobs]
    return out


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=True)


def test_mixed_batch_matches_each_alone_and_budget_zero_is_plain(engine):
    ids = engine.tokenizer.encode_chat(QUESTION)
    other = engine.tokenizer.encode_chat([{"role": "user", "content": "Name three colors, please."}])
    specs = {"plain": (ids, None), "zero": (ids, SkipRequest(0, "e2e")), "e2e": (ids, SkipRequest(16, "e2e")),
             "decode": (ids, SkipRequest(16, "decode")), "prefill": (other, SkipRequest(12, "prefill"))}
    together = run(engine, [Request(k, p, greedy(8), skip=s) for k, (p, s) in specs.items()])
    alone = {k: run(engine, [Request(k, p, greedy(8), skip=s)])[k] for k, (p, s) in specs.items()}
    assert {k: v[0] for k, v in together.items()} == {k: v[0] for k, v in alone.items()}
    # Budget 0 is the plain path exactly (bit-identical logprobs), and skipping really changes the output.
    assert alone["zero"] == alone["plain"]
    assert alone["e2e"][0] != alone["plain"][0]
    assert alone["decode"][0][0] == alone["plain"][0][0] and alone["decode"][0] != alone["plain"][0]
    assert engine.stats.skip_requests["e2e"] >= 2 and engine.stats.skip_sublayers["attn"] > 0


@pytest.mark.parametrize("mode", ["e2e", "decode"])
def test_skipped_attention_layers_allocate_no_kv_blocks(engine, mode):
    """At a layer whose attention a request skips, it holds blocks only for tokens computed before the
    skip began (none in e2e, the prompt in decode mode); every other layer holds all its tokens."""
    ids = engine.tokenizer.encode_chat(QUESTION)
    layers, pool = engine.model.cfg.num_hidden_layers, engine.pool
    for key in engine.kv.cache.keys():
        engine.kv.cache.drop(key)
    assert pool.num_used == 0
    engine.add_request(Request(mode, ids, greedy(40), skip=SkipRequest(16, mode)))
    seq = engine._seqs[mode]
    checked = 0
    while engine.has_work():
        engine.step()
        if seq.is_finished:
            break
        skipped = seq.skip.attn_skipped
        assert 0 not in skipped and (skipped or mode == "decode" and seq.num_output_tokens == 1)
        checked += bool(skipped)
        for layer in range(layers):
            tokens = (0 if mode == "e2e" else seq.num_prompt_tokens) if layer in skipped else seq.num_computed
            assert len(seq.blocks.layers[layer]) == pool.blocks_for(tokens), (layer, seq.num_computed)
        assert pool.num_used == seq.blocks.num_blocks
    assert checked >= 30 and pool.num_used == 0  # nothing is kept: the request's KV was computed skipping


def test_skip_requests_are_checked_before_they_run(engine, model_dirs, tmp_path):
    with pytest.raises(RequestRejected, match="between 0 and 58"):
        engine.add_request(Request("big", [1, 2, 3], greedy(2), skip=SkipRequest(59, "e2e")))
    with pytest.raises(RequestRejected, match="mode"):
        engine.add_request(Request("mode", [1, 2, 3], greedy(2), skip=SkipRequest(2, "both")))
    bare = LLMEngine(EngineConfig(dtype="float32", model=str(model_dirs[1]), kv_cache_gb=0.02))
    assert bare.skips.profile is None
    with pytest.raises(RequestRejected, match="strata calibrate --model"):
        bare.add_request(Request("np", [1, 2, 3], greedy(2), skip=SkipRequest(4, "e2e")))
    with pytest.raises(ValueError, match="strata calibrate"):  # a default that can never work fails at start
        LLMEngine(EngineConfig(dtype="float32", model=str(model_dirs[1]), kv_cache_gb=0.02, skip_sublayers=4))
    # A profile calibrated for other weights is ignored, with a warning.
    profile = SkipProfile.load(model_dirs[0] / PROFILE_FILE)
    foreign = _link_model(model_dirs[1], tmp_path / "foreign")
    profile.fingerprint = "0" * 64
    profile.save(foreign / PROFILE_FILE)
    assert LLMEngine(EngineConfig(dtype="float32", model=str(foreign), kv_cache_gb=0.02)).skips.profile is None


@pytest.mark.slow
def test_preempted_skipping_sequences_recompute_to_the_same_output(engine, model_dirs):
    """A tiny pool forces preemption (recompute) of skipping sequences, past the online window W = 20."""
    prompts = [engine.tokenizer.encode_chat(QUESTION),
               engine.tokenizer.encode_chat([{"role": "user", "content": "Write a haiku about rain."}])]
    specs = [SkipRequest(8, "e2e"), SkipRequest(8, "decode")]
    reqs = lambda: [Request(f"q{i}", p, greedy(40), skip=s)  # noqa: E731
                    for i, (p, s) in enumerate(zip(prompts, specs, strict=True))]
    ref = run(engine, reqs())
    small = LLMEngine(EngineConfig(dtype="float32", model=str(model_dirs[0]),
                                   kv_cache_gb=8 * 16 * POOL_BYTES_PER_TOKEN / 2**30, max_num_batched_tokens=24,
                                   session_cache=False))
    seqs: dict[str, Sequence] = {}
    squeezed = run(small, reqs(), seqs)
    assert small.stats.preemptions > 0
    assert {k: v[0] for k, v in squeezed.items()} == {k: v[0] for k, v in ref.items()}
    # Recomputed decode steps were replayed, not counted again: one step per generated token fed back.
    assert [s.skip.decode_steps for s in seqs.values()] == [len(v[0]) - 1 for v in squeezed.values()]
    assert all(s.skip.extra.ffn for s in seqs.values())  # the online step ran (W = 20 < 40 tokens)
    assert small.stats.skip_requests == {"e2e": 1, "decode": 1}  # once per request, not per recomputation
    assert small.blocks_in_use == 0


# --- the real server ---


@pytest.fixture(scope="module")
def servers(model_dirs, tmp_path_factory) -> Iterator[dict[str, ServerProcess]]:
    """Calibrated (sessions on); uncalibrated with sessions off (the reference); a baseline policy."""
    logs = tmp_path_factory.mktemp("skip-servers")
    calibrated, bare = (str(d) for d in model_dirs)
    procs = {
        "calibrated": ServerProcess("--model", calibrated, "--kv-cache-gb", "0.1", log=logs / "calibrated.log"),
        "bare": ServerProcess("--model", bare, "--kv-cache-gb", "0.1", "--no-session-cache", log=logs / "bare.log"),
        "baseline": ServerProcess("--model", bare, "--kv-cache-gb", "0.05", "--skip-policy", "early-exit",
                                  "--skip-mode", "decode", log=logs / "baseline.log"),
    }
    with started(procs):
        yield procs


def client_of(srv: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=120,
                         _strict_response_validation=True)


def chat(srv: ServerProcess, msgs: list[dict], n: int = 4, **kw) -> tuple[str, httpx.Headers, int, int]:
    """Greedy reply: (text, response headers, prompt tokens, completion tokens)."""
    c = client_of(srv)
    raw = c.chat.completions.with_raw_response.create(model=c.models.list().data[0].id, messages=msgs,
                                                      max_tokens=n, temperature=0, **kw)
    r = raw.parse()
    return r.choices[0].message.content or "", raw.headers, r.usage.prompt_tokens, r.usage.completion_tokens


def respond(srv: ServerProcess, text: str, n: int = 4, **kw) -> tuple[str, httpx.Headers]:
    """Greedy reply through /v1/responses: (text, response headers)."""
    c = client_of(srv)
    raw = c.responses.with_raw_response.create(model=c.models.list().data[0].id, input=text, max_output_tokens=n,
                                               temperature=0, **kw)
    return raw.parse().output_text, raw.headers


SKIP_HEADERS = ("x-skip-policy", "x-skip-mode", "x-skipped-sublayers")


def names(skip_set) -> str:
    return ",".join([f"attn{i}" for i in sorted(skip_set.attn)] + [f"ffn{i}" for i in sorted(skip_set.ffn)])


def test_skip_by_body_and_header_reports_what_was_skipped(servers, model_dirs):
    srv = servers["calibrated"]
    profile = SkipProfile.load(model_dirs[0] / PROFILE_FILE)
    fixed = {m: names(make_policy("adaskip", m, profile.num_layers, profile).fixed) for m in (4, 8)}
    _, h, _, _ = chat(srv, QUESTION, extra_body={"skip": {"sublayers": 8, "mode": "decode"}})
    assert (h["x-skip-policy"], h["x-skip-mode"]) == ("adaskip", "decode")
    assert h["x-skipped-sublayers"] == fixed[8]
    _, h, _, _ = chat(srv, QUESTION, extra_headers={"X-Skip-Sublayers": "4"})
    assert (h["x-skip-mode"], h["x-skipped-sublayers"]) == ("e2e", fixed[4])  # the server's --skip-mode
    _, h, _, _ = chat(srv, QUESTION, extra_headers={"X-Skip-Sublayers": "4"}, extra_body={"skip": {"sublayers": 8}})
    assert h["x-skipped-sublayers"] == fixed[8]  # the body wins
    _, h, _, _ = chat(srv, QUESTION)
    assert (h["x-skip-policy"], h["x-skipped-sublayers"]) == ("none", "none")
    # Completions, streamed: the headers come with the first chunk.
    c = client_of(srv)
    with httpx.stream("POST", srv.base_url + "/v1/completions", headers={"X-Skip-Sublayers": "4"}, timeout=120,
                      json={"model": c.models.list().data[0].id, "prompt": "The moon is", "max_tokens": 3,
                            "stream": True}) as r:
        assert r.status_code == 200 and r.headers["x-skipped-sublayers"] == fixed[4]
        assert r.read().decode().rstrip().endswith("data: [DONE]")
    text = httpx.get(srv.base_url + "/metrics").text
    assert 'strata_skip_requests_total{mode="e2e",policy="adaskip"}' in text
    assert srv.metric("strata_skip_profile_loaded") == 1


def test_responses_skip_as_chat_does(servers):
    """The Responses endpoint takes the same `skip` field and header and answers as chat does for the same
    input (a response is a session's turn: chat's gets a session of its own too, so that neither reuses
    the other's prefix): the same skipped output and the same headers, streamed or not."""
    srv = servers["calibrated"]
    question = QUESTION[0]["content"]

    def chat_turn(name: str, headers: dict[str, str], **kw) -> tuple[str, httpx.Headers]:
        text, h, _, _ = chat(srv, QUESTION, n=12, extra_headers={"X-Session-ID": f"as-responses-{name}"} | headers,
                             **kw)
        return text, h

    plain, _ = chat_turn("plain", {})
    for name, headers, body in (("header", {"X-Skip-Sublayers": "16"}, {}),
                                ("body", {}, {"skip": {"sublayers": 16, "mode": "decode"}}),
                                ("both", {"X-Skip-Sublayers": "4"}, {"skip": {"sublayers": 16}})):
        text, h = chat_turn(name, headers, extra_body=body)
        assert text != plain and h["x-skip-policy"] == "adaskip"  # skipping changes this answer
        got, rh = respond(srv, question, n=12, extra_headers=headers, extra_body=body)
        assert got == text
        assert [rh[k] for k in SKIP_HEADERS] == [h[k] for k in SKIP_HEADERS]
    got, rh = respond(srv, question, n=12)
    assert got == plain and rh["x-skip-policy"] == "none" and rh["x-skipped-sublayers"] == "none"
    # Streamed, the headers come before the first event.
    _, h = chat_turn("streamed", {"X-Skip-Sublayers": "16"})
    c = client_of(srv)
    with httpx.stream("POST", srv.base_url + "/v1/responses", headers={"X-Skip-Sublayers": "16"}, timeout=120,
                      json={"model": c.models.list().data[0].id, "input": question, "max_output_tokens": 12,
                            "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and [r.headers[k] for k in SKIP_HEADERS] == [h[k] for k in SKIP_HEADERS]
        last = r.read().decode().rsplit("event: ", 1)[1]
        assert last.startswith(("response.completed", "response.incomplete"))
    with pytest.raises(openai.BadRequestError) as e:
        respond(srv, question, extra_headers={"X-Skip-Sublayers": "99"})
    assert e.value.param == "X-Skip-Sublayers"


@pytest.mark.parametrize(("body", "headers", "param"), [
    ({"skip": {"sublayers": -1}}, {}, "skip.sublayers"),
    ({"skip": {"sublayers": 59}}, {}, "skip.sublayers"),
    ({"skip": {"sublayers": 4, "mode": "both"}}, {}, "skip.mode"),
    ({"skip": 4}, {}, "skip"),
    ({}, {"X-Skip-Sublayers": "many"}, "X-Skip-Sublayers"),
    ({}, {"X-Skip-Sublayers": "-3"}, "X-Skip-Sublayers"),
    ({}, {"X-Skip-Sublayers": "99"}, "X-Skip-Sublayers"),
])
def test_bad_skip_values_are_400_with_param(servers, body, headers, param):
    with pytest.raises(openai.BadRequestError) as e:
        chat(servers["calibrated"], QUESTION, extra_body=body, extra_headers=headers)
    assert e.value.param == param


def test_no_profile_is_a_400_saying_how_to_calibrate(servers):
    for kw in ({"extra_body": {"skip": {"sublayers": 4}}}, {"extra_headers": {"X-Skip-Sublayers": "2"}}):
        with pytest.raises(openai.BadRequestError, match=r"strata calibrate --model") as e:
            chat(servers["bare"], QUESTION, **kw)
        assert e.value.param == "skip"
    assert servers["bare"].metric("strata_skip_profile_loaded") == 0
    assert chat(servers["bare"], QUESTION, n=2)[1]["x-skip-policy"] == "none"


def test_baseline_policy_needs_no_profile(servers):
    _, h, _, _ = chat(servers["baseline"], QUESTION, extra_headers={"X-Skip-Sublayers": "4"})
    assert (h["x-skip-policy"], h["x-skip-mode"]) == ("early-exit", "decode")
    assert h["x-skipped-sublayers"] == "attn28,attn29,ffn28,ffn29"


def test_session_kv_computed_with_skipping_is_never_reused(servers):
    srv, ref = servers["calibrated"], servers["bare"]
    session = {"X-Session-ID": "skip-then-plain"}
    before = srv.metric("strata_skip_kv_not_saved_total")
    # Turn 1 skips attention in decode only: its prompt's KV is the full model's, its answer's is not.
    text, h, prompt_1, completion_1 = chat(srv, QUESTION, n=12, extra_headers=session,
                                           extra_body={"skip": {"sublayers": 8, "mode": "decode"}})
    assert h["x-skipped-sublayers"].startswith("attn")
    assert srv.metric("strata_skip_kv_not_saved_total") - before == completion_1 - 1  # the last token never ran
    info = httpx.get(srv.base_url + "/v1/sessions/skip-then-plain").json()
    assert info["tokens"] == prompt_1  # the stored entry stops where skipping began
    # Turn 2 skips nothing: it reuses only turn 1's prompt and answers as a server without sessions.
    msgs = QUESTION + [{"role": "assistant", "content": text}, {"role": "user", "content": TURN_2}]
    got, h, _, _ = chat(srv, msgs, n=12, extra_headers=session)
    assert int(h["x-cached-tokens"]) == prompt_1 and h["x-skip-policy"] == "none"
    assert got == chat(ref, msgs, n=12)[0]


def test_the_default_model_skips_out_of_the_box(client, model_name, model_files):
    """strata ships the default model's AdaSkip profile (a full calibration): X-Skip-Sublayers works on a
    fresh install, without `strata calibrate`."""
    profile = load_profile(model_files.directory, model_files.fingerprint)
    assert profile is not None and profile.requests >= 20 and len(profile.ranking) == 2 * 30
    raw = client.chat.completions.with_raw_response.create(
        model=model_name, messages=QUESTION, max_tokens=4, extra_headers={"X-Skip-Sublayers": "4"})
    assert raw.headers["X-Skip-Policy"] == "adaskip"
    assert len(raw.headers["X-Skipped-Sublayers"].split(",")) == 4
