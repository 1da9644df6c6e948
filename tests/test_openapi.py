"""/openapi.json describes the POST endpoints, and generated requests (schemathesis) get no 5xx and only
responses that fit the declared schema."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess

POSTS = ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/tokenize", "/detokenize"]


def test_openapi_describes_request_bodies_and_responses(server):
    doc = httpx.get(server.base_url + "/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for path, model in zip(POSTS, ["ChatCompletionRequest", "CompletionRequest", "ResponsesRequest",
                                   "TokenizeRequest", "DetokenizeRequest"], strict=True):
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + model)
        assert model in schemas
        assert "422" not in op["responses"]  # invalid bodies are 400s with the OpenAI error body
        for code in ("200", "400", "413", "415"):
            assert "application/json" in op["responses"][code]["content"]
    chat = schemas["ChatCompletionRequest"]
    assert {"model", "messages"} <= set(chat["required"])
    assert chat["properties"]["temperature"]["anyOf"][0]["maximum"] == 2
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        assert "text/event-stream" in doc["paths"][path]["post"]["responses"]["200"]["content"], path
    assert {"model", "input"} <= set(schemas["ResponsesRequest"]["required"])
    assert doc["paths"]["/v1/responses"]["post"]["responses"]["200"]["content"]["application/json"]["schema"][
        "$ref"].endswith("/ResponseObject")
    assert schemas["ChatCompletion"]["properties"]["usage"]["$ref"].endswith("/Usage")
    # Still the server's own checks, not FastAPI's: 400 (not 422) and the OpenAI error body.
    r = httpx.post(server.base_url + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def _narrowed(doc: dict[str, Any], model: str) -> dict[str, Any]:
    """The served schema with small generation bounds, so that generated requests finish quickly and
    name the served model (random names would only ever meet the 404)."""
    schemas = doc["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = schemas[name]["properties"]
        props["model"] = {"type": "string", "enum": [model]}
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                props[field] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 8}, {"type": "null"}]}
        props["n"] = {"type": "integer", "minimum": 1, "maximum": 2}
        props["min_tokens"] = {"type": "integer", "minimum": 0, "maximum": 8}
    responses = schemas["ResponsesRequest"]["properties"]
    responses["model"] = {"type": "string", "enum": [model]}
    responses["max_output_tokens"] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 8}, {"type": "null"}]}
    for name in ("TokenizeRequest", "DetokenizeRequest"):
        schemas[name]["properties"]["model"] = {"anyOf": [{"type": "string", "enum": [model]}, {"type": "null"}]}
    doc["paths"] = {p: doc["paths"][p] for p in POSTS}
    return doc


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, model_files):
    # A short context: a negative case that breaks the narrowed max_tokens bound still ends quickly.
    srv = ServerProcess("--kv-cache-gb", "0.1", "--max-model-len", "64",
                        log=tmp_path_factory.mktemp("fuzz") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.mark.slow
def test_schemathesis_no_5xx_and_schema_conformance(fuzz_server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode, checks

    base = fuzz_server.base_url
    doc = httpx.get(base + "/openapi.json").json()
    model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
    schema = schemathesis.openapi.from_dict(_narrowed(doc, model))
    schema.config.update(base_url=base, request_timeout=120)
    strategies = [schema[path]["POST"].as_strategy(generation_mode=mode)
                  for path in POSTS for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    run_checks = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
                  checks.response_schema_conformance, checks.response_headers_conformance]
    seen: dict[int, int] = {}
    served: set[str] = set()  # the paths that answered 200 at least once

    # No shrinking: a failure is reported as found (shrinking replays hundreds of requests).
    @settings(max_examples=300, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(*strategies))
    def fuzz(case: Any) -> None:
        response = case.call_and_validate(checks=run_checks)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        if response.status_code == 200:
            served.add(case.path)

    fuzz()
    assert seen.get(200, 0) >= 20 and seen.get(400, 0) >= 20, seen  # both served and refused requests were tried
    assert served == set(POSTS), served  # every endpoint, not only the easy ones, had its answers checked
    assert httpx.get(base + "/health").status_code == 200
