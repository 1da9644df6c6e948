"""Structured outputs: what a request's output must match, compiled once and followed token by token.

xgrammar does the work (the library vLLM and SGLang use by default): a spec compiles against the model's
vocabulary into a grammar whose per-token masks are precomputed, and a matcher per sequence fills the
next token's mask as a bitmask in well under a millisecond. Each step masks every constrained row of the
batch's logits in one operation before sampling, so greedy and sampled rows alike can only pick tokens
that keep the output valid, and a stop token only where the grammar may end.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import xgrammar as xgr

# Compiling a large schema takes milliseconds to seconds: keep the recent ones (per server).
CACHE_SIZE = 256
# xgrammar's messages start with "[hh:mm:ss] /path/file.cc:123: ": the rest is what a client needs.
_CPP_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")


class GrammarError(ValueError):
    """The spec cannot be compiled (an unsupported or invalid schema, regex or grammar)."""


@dataclass(frozen=True)
class GrammarSpec:
    """kind: "json_schema" (text: the schema as JSON), "json_object", "regex", "choice" (text: a JSON list of
    strings) or "grammar" (text: EBNF as xgrammar and llama.cpp's GBNF write it). strict: no properties
    or items beyond what the schema names (OpenAI's strict json_schema)."""

    kind: str
    text: str = ""
    strict: bool = True


class Grammar:
    """A compiled spec: shared by every sequence that follows it."""

    def __init__(self, spec: GrammarSpec, compiled: xgr.CompiledGrammar) -> None:
        self.spec = spec
        self._compiled = compiled

    def matcher(self) -> GrammarState:
        return GrammarState(xgr.GrammarMatcher(self._compiled))


class GrammarState:
    """Where one sequence is in its grammar."""

    def __init__(self, matcher: xgr.GrammarMatcher) -> None:
        self._matcher = matcher

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        return self._matcher.accept_token(token)

    @property
    def finished(self) -> bool:
        """The grammar accepted a stop token: the output is complete."""
        return self._matcher.is_terminated()


def mask_logits(logits: torch.Tensor, states: dict[int, GrammarState]) -> dict[int, Exception]:
    """Set to -inf, in place and in one operation, every token that row i's grammar forbids next.

    logits: [rows, vocab] float32 on the host; states: row -> its sequence's grammar state. Returns the
    rows whose mask could not be filled (those requests fail alone; their rows stay unmasked).
    """
    failed: dict[int, Exception] = {}
    if not states:
        return failed
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])
    for row, state in states.items():
        try:
            state.fill_mask(bitmask, row)
        except Exception as e:
            failed[row] = e
    rows = sorted(set(states) - set(failed))
    if rows:
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
    return failed


def _choice_grammar(choices: list[str]) -> str:
    # EBNF string literals take JSON's escapes.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCompiler:
    """Compiles specs against one model's vocabulary, with a cache; safe to call from any thread."""

    def __init__(self, model_dir: Path, vocab_size: int, stop_token_ids: list[int]) -> None:
        self._model_dir = model_dir
        self._vocab_size = vocab_size
        self._stop_token_ids = stop_token_ids
        self._compiler: xgr.GrammarCompiler | None = None
        self._cache: OrderedDict[GrammarSpec, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def _library(self) -> xgr.GrammarCompiler:
        # Reading the vocabulary takes a fraction of a second: only when the first grammar is asked for.
        with self._lock:
            if self._compiler is None:
                from transformers import PreTrainedTokenizerFast

                hf = PreTrainedTokenizerFast(tokenizer_file=str(self._model_dir / "tokenizer.json"))
                info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self._vocab_size,
                                                          stop_token_ids=self._stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def compile(self, spec: GrammarSpec) -> Grammar:
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        compiler = self._library()
        try:
            compiled = self._compile(compiler, spec)
        except (RuntimeError, ValueError, TypeError) as e:
            message = _CPP_PREFIX.sub("", str(e).strip()).strip()
            raise GrammarError(message or type(e).__name__) from e
        grammar = Grammar(spec, compiled)
        with self._lock:
            self._cache[spec] = grammar
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    @staticmethod
    def _compile(compiler: xgr.GrammarCompiler, spec: GrammarSpec) -> xgr.CompiledGrammar:
        # Compact JSON (no free whitespace): a small model can otherwise emit newlines until max_tokens.
        if spec.kind == "json_schema":
            return compiler.compile_json_schema(spec.text, any_whitespace=False, strict_mode=spec.strict)
        if spec.kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if spec.kind == "regex":
            return compiler.compile_regex(spec.text)
        if spec.kind == "choice":
            return compiler.compile_grammar(_choice_grammar(json.loads(spec.text)))
        if spec.kind == "grammar":
            return compiler.compile_grammar(spec.text)
        raise GrammarError(f"unknown structured output kind {spec.kind!r}")
