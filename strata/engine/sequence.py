"""The engine's state of one request while it is queued or running."""

from __future__ import annotations

import enum
import time

import torch

from strata.engine.grammar import GrammarState
from strata.engine.output_text import OutputText
from strata.engine.request import Request, TokenLogprob
from strata.engine.skip.request_state import RequestSkipState
from strata.storage.block_table import BlockTable
from strata.storage.load_handle import LoadHandle


class SequenceStatus(enum.Enum):
    PREPARING = "preparing"  # the store is getting its stored KV ready (import, truncation, SSD reads)
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request: Request, output_text: OutputText, seed: int, num_layers: int,
                 skip: RequestSkipState | None = None) -> None:
        self.request = request
        self.request_id = request.request_id
        self.sampling = request.sampling
        self.token_ids: list[int] = list(request.prompt_ids)
        self.num_prompt_tokens = len(request.prompt_ids)
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = 0  # prompt tokens reused instead of computed
        self.cache_tier: str | None = None  # where the reused tokens came from: hbm, dram, ssd
        self.load: LoadHandle | None = None  # a layer-wise load of history KV in flight
        self.acquired = False  # reusable history looked up since (re)admission
        self.num_preemptions = 0
        self.stored_tier: str | None = None  # where the store held its history when it arrived (prepare)
        self.stored_shared_tokens = 0  # of that history, tokens in chunks other sessions share (prepare)
        self.num_shared_tokens = 0  # of num_cached_tokens, those that came from shared chunks
        self.session_deleted = False  # its session was deleted meanwhile: none of its KV is kept
        self.blocks = BlockTable(num_layers)
        self.skip = skip  # AdaSkip state of this request; None: it skips nothing (the plain path)
        # First token whose KV was computed with some sublayer skipped (None: none so far). KV from
        # here on is missing at skipped attention layers or differs from the full model's: it is
        # never saved to the session tiers nor cached for other requests.
        self.skip_from: int | None = None
        self.status = SequenceStatus.WAITING
        self.output_text = output_text
        self.pending_logprobs: list[TokenLogprob] = []
        self.pending_token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.generator = torch.Generator().manual_seed(seed)
        grammar = request.sampling.grammar
        self.grammar: GrammarState | None = grammar.matcher() if grammar is not None else None
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None

    @property
    def keeps_kv(self) -> bool:
        """Whether its KV may be saved to the session tiers and cached for other requests."""
        return self.request.keep_kv and not self.session_deleted

    def attn_skips_next(self) -> set[int]:
        """Attention layers the next step of this sequence skips (its tokens need no KV blocks there)."""
        if self.skip is None:
            return set()
        c = self.num_computed
        if c < self.num_prompt_tokens:
            return self.skip.attn_skips(True)
        return self.skip.attn_skips(False, decode_step=c - self.num_prompt_tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
