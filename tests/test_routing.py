"""The router (deploy/haproxy/router.cfg.template) with real HAProxy, three real strata servers and a real
redis-server as the shared KV tier: bounded-load consistent hashing keeps a session on its server while that
server is within the bound and moves it to the next server on the ring when it is not (its next turn then
loads its KV from the shared tier and answers what recomputation answers); a Responses chain without any
header stays on one server (the route key travels inside the response ids); X-Strata-Route and the
router's /router/metrics say why each request went where it went; a killed server's sessions are answered
by the others."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy"))
from cluster import Cluster, Instance, RedisServer  # noqa: E402

pytestmark = pytest.mark.slow
QUESTIONS = ["Name a color.", "Name an animal.", "Name a city.", "Name a fruit.", "Name a planet."]


class Routed:
    """The three servers behind the router, a client of each, and the conversations held so far."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.router = OpenAI(base_url=cluster.router_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        self.model = self.router.models.list().data[0].id
        self.by_address = {inst.address: inst for inst in cluster.instances}
        self.history: dict[str, list[dict]] = {}

    def turn(self, session: str) -> tuple[Instance, str, int, str]:
        """One turn of `session` through the router: (server, decision, cached tokens, cache tier)."""
        msgs = self.history.get(session, []) + [{"role": "user", "content": QUESTIONS[len(self.history.get(
            session, [])) // 2]}]
        raw = self.router.chat.completions.with_raw_response.create(
            model=self.model, messages=msgs, max_tokens=8, temperature=0, extra_headers={"X-Session-ID": session})
        reply = raw.parse()
        self.history[session] = msgs + [{"role": "assistant", "content": reply.choices[0].message.content}]
        return (self.by_address[raw.headers["x-strata-upstream"]], raw.headers["x-strata-route"],
                reply.usage.prompt_tokens_details.cached_tokens, raw.headers["x-cache-tier"])

    def recomputed(self, session: str, inst: Instance) -> str:
        """The session's last answer as `inst` computes it from scratch (no session, so no stored KV)."""
        direct = OpenAI(base_url=inst.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = direct.chat.completions.create(model=self.model, messages=self.history[session][:-1], max_tokens=8,
                                               temperature=0)
        return reply.choices[0].message.content or ""

    def session_on(self, inst: Instance, taken: set[str]) -> str:
        """A new session key whose first request the ring sends to `inst`."""
        for n in range(300):
            key = f"probe-{n}"
            if key in taken:
                continue
            r = httpx.post(self.cluster.router_url + "/tokenize", json={"prompt": "hi"},
                           headers={"X-Session-ID": key}, timeout=30)
            taken.add(key)
            if r.headers["x-strata-upstream"] == inst.address:
                return key
        raise AssertionError(f"no key of 300 goes to {inst.name}")


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routed]:
    base = tmp_path_factory.mktemp("routing")
    store = RedisServer(base / "redis")
    cluster = Cluster(base / "cluster", ["--dtype", "float32", "--kv-cache-gb", "0.1", *store.strata_args()],
                      upstream_header=True)
    try:
        cluster.add(3)
        yield Routed(cluster)
    finally:
        cluster.stop()
        store.stop()


@contextmanager
def _busy(routed: Routed, session: str, count: int) -> Iterator[None]:
    """`count` long streamed generations of `session` open through the router until the block ends."""
    stop, started = threading.Event(), threading.Semaphore(0)

    def hold() -> None:
        body = {"model": routed.model, "messages": [{"role": "user", "content": "Count to a thousand."}],
                "max_tokens": 2000, "ignore_eos": True, "temperature": 0, "stream": True}
        with httpx.Client(base_url=routed.cluster.router_url, timeout=300) as c, c.stream(
                "POST", "/v1/chat/completions", json=body, headers={"X-Session-ID": session}) as r:
            for _ in r.iter_lines():
                started.release()
                if stop.is_set():
                    return

    pool = ThreadPoolExecutor(count)
    try:
        for _ in range(count):
            pool.submit(hold)
            assert started.acquire(timeout=120), "a held stream did not start"
        yield
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


def test_sessions_keep_their_server_below_the_bound(routed: Routed):
    sessions = [f"steady-{i}" for i in range(6)]
    first = {s: routed.turn(s) for s in sessions}
    assert all(decision == "new" for _, decision, _, _ in first.values())
    for s in sessions:
        inst, decision, cached, _ = routed.turn(s)
        assert (inst, decision) == (first[s][0], "affinity") and cached > 0, s


def test_above_the_bound_a_session_moves_and_its_next_turn_hits_the_shared_tier(routed: Routed):
    taken: set[str] = set()
    home = routed.cluster.instances[0]
    session = routed.session_on(home, taken)
    inst, decision, _, _ = routed.turn(session)
    assert (inst, decision) == (home, "affinity")  # the probe made the key known
    routed.cluster.wait_uploaded()

    # A stream of another session on the same server: it carries all the router's load, which is above the
    # bound (1.5x the mean of the requests in flight), so the session's next turn goes to the next server on
    # its ring.
    with _busy(routed, routed.session_on(home, taken), 1):
        inst, decision, cached, tier = routed.turn(session)
    assert inst is not home and decision == "overflow", (inst.name, decision)
    assert tier == "remote" and cached > 0, (tier, cached)
    assert routed.history[session][-1]["content"] == routed.recomputed(session, home)

    # The bound no longer applies: the session goes back to its first server.
    inst, decision, cached, _ = routed.turn(session)
    assert (inst, decision) == (home, "home") and cached > 0


def test_a_responses_chain_without_a_header_stays_on_one_server(routed: Routed):
    raw = routed.router.responses.with_raw_response.create(model=routed.model, input="Tell me about the moon.",
                                                           max_output_tokens=16, temperature=0)
    first = raw.parse()
    maker = raw.headers["x-strata-upstream"]
    assert raw.headers["x-strata-route"] == "no-key"
    previous = first.id
    for question in ("How far away is it?", "Could people live there?", "What is its gravity?"):
        raw = routed.router.responses.with_raw_response.create(
            model=routed.model, previous_response_id=previous, input=question, max_output_tokens=16, temperature=0)
        reply = raw.parse()
        assert raw.headers["x-strata-upstream"] == maker
        assert raw.headers["x-strata-route"] == "affinity"
        assert reply.usage.input_tokens_details.cached_tokens > 0
        assert reply.id[5:21] == first.id[5:21]  # the chain's route key, carried from id to id
        previous = reply.id
    # A retrieve by id goes to the chain's server too.
    r = httpx.get(f"{routed.cluster.router_url}/v1/responses/{previous}", timeout=30)
    assert r.status_code == 200 and r.headers["x-strata-upstream"] == maker


def test_requests_without_a_key_are_placed_by_load(routed: Routed):
    raw = routed.router.chat.completions.with_raw_response.create(
        model=routed.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert raw.headers["x-strata-route"] == "no-key"


def test_the_router_counts_its_decisions_per_server(routed: Routed):
    counts = routed.cluster.router_metrics()
    decisions = {d for _, d in counts}
    assert {"new", "affinity", "overflow", "home", "no-key"} <= decisions, counts
    assert {s for s, _ in counts} <= {inst.name for inst in routed.cluster.instances}


def test_a_killed_servers_sessions_are_answered_by_the_others(routed: Routed):
    sessions = [f"steady-{i}" for i in range(6)]
    routed.cluster.wait_uploaded()
    victim = routed.turn(sessions[0])[0]
    routed.cluster.wait_uploaded()
    routed.cluster.kill(victim)
    inst, decision, cached, tier = routed.turn(sessions[0])
    assert inst is not victim and decision == "failover", (inst.name, decision)
    assert tier == "remote" and cached > 0
    assert routed.history[sessions[0]][-1]["content"] == routed.recomputed(sessions[0], inst)
    for s in sessions[1:]:  # every session is answered, wherever it lived
        assert routed.turn(s)[0] is not victim
