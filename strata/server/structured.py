"""Structured outputs: a request's response_format or structured_outputs -> the engine's compiled grammar."""

from __future__ import annotations

import json

from strata.engine.grammar import Grammar, GrammarCompiler, GrammarError, GrammarSpec
from strata.server.errors import bad_request
from strata.server.protocol import ResponseFormat, SamplingFields, StructuredOutputs


def _from_response_format(fmt: ResponseFormat) -> tuple[GrammarSpec, str] | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec("json_object"), "response_format"
    assert fmt.json_schema is not None  # the model validator checks it
    schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}
    # Strict or not, the output follows the schema; strict also forbids what the schema does not name.
    return (GrammarSpec("json_schema", json.dumps(schema, sort_keys=False), strict=bool(fmt.json_schema.strict)),
            "response_format.json_schema.schema")


def _from_structured_outputs(so: StructuredOutputs) -> tuple[GrammarSpec, str]:
    if so.json_ is not None:
        text = so.json_ if isinstance(so.json_, str) else json.dumps(so.json_)
        return GrammarSpec("json_schema", text, strict=False), "structured_outputs.json"
    if so.regex is not None:
        return GrammarSpec("regex", so.regex), "structured_outputs.regex"
    if so.choice is not None:
        return GrammarSpec("choice", json.dumps(so.choice)), "structured_outputs.choice"
    if so.grammar is not None:
        return GrammarSpec("grammar", so.grammar), "structured_outputs.grammar"
    return GrammarSpec("json_object"), "structured_outputs.json_object"


def requested_spec(body: SamplingFields) -> tuple[GrammarSpec, str] | None:
    """The spec a request asks its output to follow, and the parameter it came from (for errors)."""
    if body.response_format is not None and body.structured_outputs is not None:
        fmt = body.response_format.type
        if fmt != "text":
            raise bad_request("give either response_format or structured_outputs, not both",
                              param="structured_outputs")
    if body.structured_outputs is not None:
        return _from_structured_outputs(body.structured_outputs)
    if body.response_format is not None:
        return _from_response_format(body.response_format)
    return None


def compile_spec(compiler: GrammarCompiler, spec: GrammarSpec, param: str) -> Grammar:
    """Compile (or take from the cache); a spec the library refuses is the client's 400, naming the part."""
    try:
        return compiler.compile(spec)
    except GrammarError as e:
        raise bad_request(f"{param} cannot be used for structured output: {e}", param=param) from e


def output_grammar(body: SamplingFields, compiler: GrammarCompiler) -> Grammar | None:
    found = requested_spec(body)
    return compile_spec(compiler, *found) if found is not None else None
