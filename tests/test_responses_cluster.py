"""Stored responses behave like a service behind the router: three real strata servers behind real HAProxy
sharing a real (TLS, password) redis-server; a response created through the router without any session header
is retrieved from every server, continued from another server with its KV from the shared tier
(cached_tokens > 0), continued again after a kill -9 of the server that made it, and once deleted is gone
on every server."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy"))
from cluster import Cluster, RedisServer  # noqa: E402

pytestmark = pytest.mark.slow


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
        maker = by_address[raw.headers["x-strata-upstream"]]
        cluster.wait_uploaded()

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
        cluster.wait_uploaded()

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
