"""Stored responses behave like a service behind the router: three real strata servers behind real nginx
sharing a real (TLS, password) redis-server; a response created through nginx without any session header
is retrieved from every server, continued from another server with its KV from the shared tier
(cached_tokens > 0), continued again after a kill -9 of the server that made it, and once deleted is gone
on every server."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy"))
from cluster import Cluster, Instance, RedisServer, answered_by  # noqa: E402

pytestmark = pytest.mark.slow


def _metric(inst: Instance, name: str) -> float:
    for line in httpx.get(inst.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def _uploaded(instances: list[Instance], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    for inst in instances:
        if inst.proc is None or inst.proc.poll() is not None:
            continue
        while any(_metric(inst, f"strata_kv_{q}") for q in ("save_queue_bytes", "ssd_io_queue", "remote_upload_queue")):
            assert time.monotonic() < deadline, "uploads to the shared tier did not drain"
            time.sleep(0.1)
    time.sleep(0.5)


def test_responses_live_across_servers(tmp_path: Path):
    store = RedisServer(tmp_path / "redis")
    cluster = Cluster(tmp_path / "cluster", ["--dtype", "float32", "--kv-cache-gb", "0.1", *store.strata_args()],
                      upstream_header=True)
    try:
        cluster.add(3)
        router = OpenAI(base_url=cluster.router_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        model = router.models.list().data[0].id
        by_address = {f"127.0.0.1:{inst.port}": inst for inst in cluster.instances}

        raw = router.responses.with_raw_response.create(model=model, input="Tell me about the moon.",
                                                        max_output_tokens=24, temperature=0)
        first = raw.parse()
        maker = by_address[answered_by(raw.headers["x-strata-upstream"])]
        _uploaded(cluster.instances)

        # Every server answers a retrieve (straight to each, then through the router without a header).
        for inst in cluster.instances:
            r = httpx.get(f"{inst.url}/v1/responses/{first.id}", timeout=30)
            assert r.status_code == 200 and r.json()["id"] == first.id, (inst.url, r.text)
        assert router.responses.retrieve(first.id).id == first.id

        # Continued on another server: the chain's KV comes from the shared tier.
        other = next(i for i in cluster.instances if i is not maker)
        direct = OpenAI(base_url=other.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        second = direct.responses.create(model=model, previous_response_id=first.id, input="How far away is it?",
                                         max_output_tokens=24, temperature=0)
        assert second.usage.input_tokens_details.cached_tokens > 0
        _uploaded(cluster.instances)

        # The server that made the first response dies; the chain goes on through the router.
        cluster.kill(maker)
        third = router.responses.create(model=model, previous_response_id=second.id, input="Could people live there?",
                                        max_output_tokens=24, temperature=0)
        assert third.usage.input_tokens_details.cached_tokens > 0
        assert router.responses.retrieve(first.id).id == first.id

        # Deleted through the router: gone on every live server.
        router.responses.delete(first.id)
        for inst in cluster.instances:
            if inst is not maker:
                assert httpx.get(f"{inst.url}/v1/responses/{first.id}", timeout=30).status_code == 404
    finally:
        cluster.stop()
        store.stop()
