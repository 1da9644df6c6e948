"""Overload through the real router: real nginx (deploy/nginx/router.conf.template) hashing X-Session-ID over
three real strata servers with --max-queue 1. A server whose queue is full answers 429 with Retry-After;
nginx offers the request to the spill ring (another server) without marking the full one down, so the
sessions of every server, the full one's included, stay where they were."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy"))
from cluster import Cluster, Instance, answered_by  # noqa: E402

BURST = 6


def _metric(inst: Instance, name: str) -> float:
    for line in httpx.get(inst.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def _wait_for(inst: Instance, name: str, at_least: float, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while _metric(inst, name) < at_least:
        assert time.monotonic() < deadline, f"{inst.name}: {name} stayed below {at_least}"
        time.sleep(0.1)


def _route(router: httpx.Client, session: str) -> str:
    """Who answers this session's requests now: /tokenize is routed like a generation but never refused
    for load, so it shows where the ring (less the servers marked down) sends the session."""
    r = router.post("/tokenize", json={"prompt": "hi"}, headers={"X-Session-ID": session})
    assert r.status_code == 200, r.text
    return r.headers["x-strata-upstream"]


@contextmanager
def _held(inst: Instance, model: str, count: int) -> Iterator[None]:
    """`count` long streamed generations sent straight to `inst`, open until the block ends (closing the
    streams aborts them)."""
    stop = threading.Event()

    def hold() -> None:
        body = {"model": model, "messages": [{"role": "user", "content": "Count to a thousand."}],
                "max_tokens": 2000, "ignore_eos": True, "temperature": 0, "stream": True}
        with httpx.Client(base_url=inst.url, timeout=300) as c, c.stream("POST", "/v1/chat/completions",
                                                                          json=body) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    pool = ThreadPoolExecutor(count)
    try:
        futures = []
        for i in range(count):
            futures.append(pool.submit(hold))
            # One at a time, so the first runs (--max-num-seqs 1) and the others wait.
            _wait_for(inst, "strata_requests_in_flight", i + 1)
        yield
    finally:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)


@pytest.mark.slow
def test_an_overloaded_server_spills_without_being_marked_down(tmp_path: Path):
    cluster = Cluster(tmp_path / "cluster", ["--dtype", "float32", "--kv-cache-gb", "0.1", "--max-num-seqs", "1",
                                             "--max-queue", "1", "--shutdown-timeout", "5"], upstream_header=True)
    try:
        cluster.add(3)
        addr = {f"127.0.0.1:{i.port}": i for i in cluster.instances}
        router = httpx.Client(base_url=cluster.router_url, timeout=300)
        # A session key that the ring sends to each server.
        home: dict[str, str] = {}
        for n in range(200):
            home.setdefault(_route(router, f"user-{n}"), f"user-{n}")
            if len(home) == len(addr):
                break
        assert set(home) == set(addr)
        model = router.get("/v1/models").json()["data"][0]["id"]
        full_addr = next(iter(home))
        full = addr[full_addr]
        session = home[full_addr]

        # One request runs and one waits: the server's queue is full (--max-queue 1).
        with _held(full, model, 2):
            _wait_for(full, "strata_requests_waiting", 1)

            def ask(_: int) -> httpx.Response:
                return router.post("/v1/chat/completions", headers={"X-Session-ID": session}, json={
                    "model": model, "messages": [{"role": "user", "content": "Name a color."}],
                    "max_tokens": 4, "temperature": 0})

            with ThreadPoolExecutor(BURST) as pool:
                burst = list(pool.map(ask, range(BURST)))
            for r in burst:
                tried = r.headers["x-strata-upstream"]
                # The full server was asked first every time: the router never took it out of the ring.
                assert tried.startswith(full_addr), tried
                assert r.status_code in (200, 429), (r.status_code, r.text)
                if r.status_code == 429:
                    assert r.headers["retry-after"] and r.json()["error"]["code"] == "overloaded"
                else:
                    assert answered_by(tried) != full_addr, tried
            assert any(r.status_code == 200 for r in burst), [r.status_code for r in burst]

            # Right after the burst every session still goes to its own server, the full one's included.
            for upstream, key in home.items():
                assert _route(router, key) == upstream, key
        assert "temporarily disabled" not in (cluster.workdir / "nginx" / "error.log").read_text()
    finally:
        cluster.stop()
