"""Scale-out through the real router: real HAProxy (deploy/haproxy/router.cfg.template) hashing X-Session-ID
over real strata servers on loopback, each with its own SSD tier, sharing a real redis-server as the shared
KV tier. Sessions stick to one server and reuse their KV; growing from 2 to 3 servers moves sessions only
onto the new one, where they hit the shared tier; a server killed with -9 has its sessions answered by the
others (the router retries once) from the shared tier, and restarted it serves them again from its SSD tier.
Outputs served after a move equal those of a server with sessions off."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from openai import OpenAI

from tests.conftest import ServerProcess

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy"))
from cluster import Cluster, RedisServer  # noqa: E402

# About a third of the sessions move to a third server on the ring; with 24 of them the odds that none does
# (and the moves below go unchecked) are about 1e-4, whatever ports the servers got.
SESSIONS = [f"user-{i}" for i in range(24)]
QUESTIONS = ["Name a color.", "Name an animal.", "Name a city.", "Name a fruit.", "Name a planet.",
             "Name a tree."]


def _client(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="unused", _strict_response_validation=True, max_retries=0,
                  timeout=120)


class Conversations:
    """Each session's history, advanced one turn at a time through the router."""

    def __init__(self, router: OpenAI, reference: OpenAI) -> None:
        self.router, self.reference = router, reference
        self.model = router.models.list().data[0].id
        self.history: dict[str, list[dict]] = {s: [] for s in SESSIONS}

    def check_last(self, session: str) -> None:
        """The session's last answer equals what a server with sessions off answers."""
        msgs, answer = self.history[session][:-1], self.history[session][-1]["content"]
        expected = self.reference.chat.completions.create(model=self.model, messages=msgs, max_tokens=8,
                                                          temperature=0)
        assert answer == expected.choices[0].message.content, session

    def turn(self, session: str, check_reference: bool = False) -> tuple[str, int, str]:
        """One turn: (upstream address, cached tokens, cache tier)."""
        msgs = self.history[session] + [{"role": "user", "content": QUESTIONS[len(self.history[session]) // 2]}]
        raw = self.router.chat.completions.with_raw_response.create(
            model=self.model, messages=msgs, max_tokens=8, temperature=0, extra_headers={"X-Session-ID": session})
        reply = raw.parse()
        self.history[session] = msgs + [{"role": "assistant", "content": reply.choices[0].message.content}]
        if check_reference:
            self.check_last(session)
        return (raw.headers["x-strata-upstream"], reply.usage.prompt_tokens_details.cached_tokens,
                raw.headers["x-cache-tier"])


@pytest.mark.slow
def test_affinity_scale_out_kill_and_restart(tmp_path: Path):
    store = RedisServer(tmp_path / "redis")
    cluster = Cluster(tmp_path / "cluster", ["--dtype", "float32", "--kv-cache-gb", "0.1", *store.strata_args()],
                      upstream_header=True)
    reference = ServerProcess("--kv-cache-gb", "0.1", "--no-session-cache", log=tmp_path / "reference.log")
    try:
        cluster.add(2)
        reference.wait_ready()
        talk = Conversations(_client(cluster.router_url), _client(reference.base_url))

        # Two turns each: every later turn lands where the first did and reuses the session's KV.
        home = {s: talk.turn(s, check_reference=True)[0] for s in SESSIONS}
        for s in SESSIONS:
            upstream, cached, _ = talk.turn(s)
            assert upstream == home[s] and cached > 0, s
        assert len(set(home.values())) == 2  # both servers hold sessions

        # 2 -> 3 servers: a session either stays (and still hits) or moves to the new server, where its
        # history comes from the shared tier.
        cluster.wait_uploaded()
        (new,) = cluster.add(1)
        new_addr = f"127.0.0.1:{new.port}"
        moved = []
        for s in SESSIONS:
            before = home[s]
            upstream, cached, tier = talk.turn(s)
            if upstream != before:
                assert upstream == new_addr, (s, before, upstream)
                assert tier == "remote" and cached > 0, (s, tier, cached)
                talk.check_last(s)
                home[s] = upstream
                moved.append(s)
            else:
                assert cached > 0, s
        assert moved, "no session moved to the new server"

        # kill -9 one of the first servers, the one holding more sessions: they are answered by the others
        # from the shared tier.
        dead = max(cluster.instances[:2], key=lambda i: list(home.values()).count(f"127.0.0.1:{i.port}"))
        dead_addr = f"127.0.0.1:{dead.port}"
        victims = [s for s in SESSIONS if home[s] == dead_addr]
        assert victims, "the first servers kept no session"
        cluster.wait_uploaded()
        cluster.kill(dead)
        for s in victims:
            upstream, cached, tier = talk.turn(s, check_reference=True)
            assert upstream != dead_addr, s
            assert tier == "remote" and cached > 0, (s, tier, cached)

        # Restarted (same address, same SSD directory), it takes its sessions back and serves them from SSD.
        cluster.restart(dead)
        time.sleep(2.5)  # the router's next health check finds it up
        for s in victims:
            upstream, cached, tier = talk.turn(s, check_reference=True)
            assert upstream == dead_addr and cached > 0 and tier == "ssd", (s, upstream, cached, tier)
    finally:
        cluster.stop()
        reference.stop()
        store.stop()

