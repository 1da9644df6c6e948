"""The synchronous engine core: add requests, then call `step()` in a loop."""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from pathlib import Path

import torch

from strata.engine.config import EngineConfig
from strata.engine.faults import Faults
from strata.engine.grammar import GrammarCompiler, mask_logits
from strata.engine.kv_cache import KVCacheManager
from strata.engine.model_runner import LoadFailed, ModelRunner
from strata.engine.models.llama import LlamaModel
from strata.engine.output_text import OutputText
from strata.engine.request import Request, RequestOutput, SkipRequest
from strata.engine.sampler import plain_greedy_tokens, sample_token
from strata.engine.scheduler import Scheduler
from strata.engine.sequence import Sequence, SequenceStatus
from strata.engine.skip_setup import SkipRejected, SkipSetup
from strata.engine.stats import EngineSnapshot, EngineStats
from strata.engine.tokenizer import Tokenizer
from strata.engine.weights.model_files import ModelFiles, resolve_model
from strata.kernels.device import default_device, fast_dtype, resolve_device
from strata.storage.block_pool import BlockPool
from strata.storage.chunk_signing import ChunkSigner
from strata.storage.kv_store import KVStore, Prepared
from strata.storage.remote_tier import open_backend
from strata.storage.response_records import ResponseRecords

log = logging.getLogger(__name__)

PREPARED_WAIT_S = 0.01  # an idle step waits this long for a request the store is preparing

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RequestRejected(ValueError):
    """The request can never be served as asked (a client error)."""


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.files: ModelFiles = resolve_model(config.model)
        t0 = time.monotonic()
        device = resolve_device(config.device) if config.device is not None else default_device()
        if config.dtype == "auto":
            dtype, why = fast_dtype(device)
            log.info("dtype auto: %s (%s)", str(dtype).removeprefix("torch."), why)
        else:
            dtype = DTYPES[config.dtype]
        self.model = LlamaModel.load(self.files.directory, dtype, device, config.quantization, self.files.gguf,
                                     context_len=config.max_model_len)
        self.tokenizer = Tokenizer(self.files.directory)
        cfg = self.model.cfg
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings,
                                 cfg.max_position_embeddings)
        per_block = BlockPool.bytes_per_block(cfg.num_key_value_heads, cfg.head_dim, config.block_size, dtype)
        self.pool = BlockPool(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, config.block_size,
                              int(config.kv_cache_gb * 2**30) // per_block, dtype, device, cfg.layer_windows)
        self._context_limit = self._fit_context()
        self.faults = Faults()
        # The shared tier's store and the key its values are signed with (KV chunks and response records).
        self._remote = (open_backend(config.remote_kv, config.remote_kv_timeout_s, username=config.remote_kv_username,
                                     password=config.remote_kv_password, ca_file=config.remote_kv_ca_file)
                        if config.remote_kv else None)
        self._signer = ChunkSigner(list(config.remote_kv_signing_keys)) if config.remote_kv else None
        self.store = self._open_store(config) if config.session_cache else None
        self.responses = ResponseRecords(
            Path(config.ssd_dir) / "responses" if config.ssd_dir else None, ttl_s=config.response_ttl_s,
            tenant_quota_bytes=int(config.response_quota_mb * 2**20),
            ssd=self.store.ssd if self.store is not None else None, remote=self._remote, signer=self._signer)
        self.kv = KVCacheManager(self.pool, self.store, enabled=config.session_cache,
                                 step_tokens=config.max_num_batched_tokens)
        self.scheduler = Scheduler(config, self.kv)
        self.runner = ModelRunner(self.model, self.pool, self.store, config.kv_load_timeout_s)
        self.stats = EngineStats()
        self.last_step_time: float | None = None  # time.monotonic() of the last step that ran a batch
        self._batch: list[Sequence] = []  # the sequences of the step being run
        self.skips = SkipSetup(config, self.files.directory, self.files.fingerprint, cfg.num_hidden_layers,
                               supported=not self.model.cfg.gemma)
        eos = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = sorted(eos)
        self.grammars = GrammarCompiler(self.files.directory, cfg.vocab_size, self.eos_token_ids)
        self._seqs: dict[str, Sequence] = {}
        # Session requests whose stored KV the store is preparing (it may wait on storage, the engine never
        # does); the store's thread hands each back through `_prepared`, the next step schedules it.
        self._prepared_queue: queue.SimpleQueue[tuple[Sequence, Prepared]] = queue.SimpleQueue()
        self._preparing = 0
        self.wake: Callable[[], None] = lambda: None  # the driver's wake-up: a prepared request can run
        self._seed_source = torch.Generator().manual_seed(config.seed)
        log.info("model %s loaded in %.1fs: %d layers, KV cache %d blocks of one layer's %d tokens (%.2f GiB)",
                 self.files.name, time.monotonic() - t0, cfg.num_hidden_layers, self.pool.num_blocks,
                 config.block_size, self.pool.num_blocks * per_block / 2**30)

    @property
    def kv_fingerprint(self) -> str:
        """What stored KV was computed with: quantized weights make another model's KV, never served across a
        restart that changes --quantization (the default keeps the weights' own fingerprint)."""
        q = self.config.quantization
        return self.files.fingerprint if q == "none" else f"{self.files.fingerprint}:{q}"

    def _open_store(self, config: EngineConfig) -> KVStore:
        ssd = Path(config.ssd_dir) if config.ssd_dir else None
        if ssd is not None:
            ssd.mkdir(parents=True, exist_ok=True)
        return KVStore(
            self.pool,
            model_fingerprint=self.kv_fingerprint,
            dram_bytes=int(config.dram_kv_gb * 2**30),
            ssd_dir=ssd,
            ssd_bytes=int(config.ssd_kv_gb * 2**30),
            policy=config.eviction_policy,
            ttl_s=config.session_ttl_s,
            chunk_tokens=config.kv_chunk_tokens,
            # Stored keys are re-rotated when a truncation moves them; with layers that apply no RoPE (SmolLM3)
            # or another base (Gemma 3's local layers) one rotation does not fit all layers, and sliding-window
            # layers keep only their window, so a truncated session is recomputed instead.
            rope_inv_freq=(self.model.inv_freq if self.model.cfg.rope_layers is None
                           and self.model.cfg.local_rope_theta is None and self.model.cfg.layer_windows is None
                           else None),
            remote=self._remote,
            signer=self._signer,
            delays=self.faults.storage_delays(),
            tier_format=config.kv_tier_dtype,
        )

    def close(self, timeout: float = 30.0) -> None:
        """Write back what the tiers hold (the SSD tier outlives the process), waiting at most `timeout`."""
        if self.store is not None:
            self.store.close(timeout=timeout)

    @property
    def context_limit(self) -> int:
        """The longest sequence this engine can hold: the model's context or the whole KV pool (where
        sliding-window layers hold only their window)."""
        return self._context_limit

    def _fit_context(self) -> int:
        pool, step = self.pool, self.config.max_num_batched_tokens
        if pool.blocks_for_sequence(self.max_model_len, step) <= pool.num_blocks:
            return self.max_model_len
        low, high = 0, self.max_model_len  # the longest n whose blocks fit: blocks_for_sequence grows with n
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if pool.blocks_for_sequence(mid, step) <= pool.num_blocks else (low, mid - 1)
        return low // pool.block_size * pool.block_size

    def add_request(self, request: Request) -> None:
        n = len(request.prompt_ids)
        if n == 0:
            raise RequestRejected("the prompt is empty")
        if n >= self.context_limit:
            raise RequestRejected(
                f"This model's maximum context length is {self.context_limit} tokens, "
                f"however you requested {n} tokens in the prompt."
            )
        if request.request_id in self._seqs:
            raise RequestRejected(f"duplicate request id {request.request_id}")
        try:
            skip = self.skips.state_for(request.skip)
        except SkipRejected as e:
            raise RequestRejected(str(e)) from e
        seed = request.sampling.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_source))
        p = request.sampling
        seq = Sequence(request, OutputText(self.tokenizer, p.stop, p.skip_special_tokens), seed,
                       self.model.cfg.num_hidden_layers, skip)
        self._seqs[request.request_id] = seq
        if self.store is not None and request.session_key:
            seq.status = SequenceStatus.PREPARING
            self._preparing += 1
            self.store.prepare(request.session_key, seq.token_ids, request.truncation is not None,
                               lambda result: self._prepared(seq, result), share=request.keep_kv)
        else:
            self.scheduler.add(seq)

    def check_skip(self, spec: SkipRequest) -> None:
        """Raise SkipRejected unless the engine can serve this skip request (reads only what never
        changes after start, so any thread may call it)."""
        self.skips.check(spec)

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        seq.finish_reason = "abort"
        return self._finish(seq)

    def has_work(self) -> bool:
        """Sequences to schedule or run, or being prepared (a step then may schedule nothing; `wake` says
        when one is ready)."""
        return self.scheduler.has_work() or self._preparing > 0

    def session_info(self, key: str) -> dict | None:
        """Where a session's KV is: tokens in HBM (cached blocks) and in the DRAM/SSD tiers."""
        stored = self.store.info(key) if self.store is not None else None
        hbm = self.kv.cache.tokens(key)
        if stored is None and not hbm:
            return None
        info = dict(stored or {"tokens": 0, "tier": None})
        info["tokens_hbm"] = hbm
        info["hbm_bytes"] = self.pool.blocks_for(hbm) * self.pool.num_layers * self.pool.block_bytes
        if hbm:
            info["tier"] = "hbm"
        info["tokens"] = max(info["tokens"], hbm)
        return info

    @property
    def has_remote_tier(self) -> bool:
        return self.store is not None and self.store.remote is not None

    def _prepared(self, seq: Sequence, result: Prepared) -> None:
        """The store's thread: the request's stored KV is ready."""
        self._prepared_queue.put((seq, result))
        self.wake()

    def _schedule_prepared(self, wait_s: float) -> None:
        """Hand the prepared sequences to the scheduler, first waiting up to `wait_s` for one."""
        while True:
            try:
                seq, result = self._prepared_queue.get(timeout=wait_s) if wait_s else self._prepared_queue.get_nowait()
            except queue.Empty:
                return
            wait_s = 0.0
            self._preparing -= 1
            if seq.status != SequenceStatus.PREPARING:
                continue  # aborted or failed meanwhile
            key = seq.request.session_key
            assert key is not None
            # A device copy is outdated by a deletion elsewhere, and by a truncation: its keys sit at their
            # old positions, the store's copy was re-rotated.
            if result.deleted_elsewhere or seq.request.truncation is not None:
                self.kv.cache.drop(key)
            if result.truncated:
                self.kv.truncations += 1
            seq.stored_tier = result.tier
            seq.stored_shared_tokens = result.shared_tokens
            seq.status = SequenceStatus.WAITING
            self.scheduler.add(seq)

    def delete_session(self, key: str) -> bool:
        """Forget a session in every tier; its requests in flight keep running but save nothing more."""
        for seq in self._seqs.values():
            if seq.request.session_key == key:
                seq.session_deleted = True
        dropped = self.kv.cache.drop(key)
        return (self.store.delete(key) if self.store is not None else False) or dropped

    def pin_session(self, key: str, seconds: float) -> bool:
        if self.store is None or self.store.info(key) is None:
            return False
        self.store.pin(key, seconds)
        return True

    def list_sessions(self, prefix: str) -> list[str]:
        keys = set(self.store.sessions()) if self.store is not None else set()
        keys |= set(self.kv.cache.keys())
        return sorted(k for k in keys if k.startswith(prefix))

    @property
    def blocks_in_use(self) -> int:
        """Blocks (one layer's, see BlockPool) held by queued or running sequences (the rest are free
        or cache finished sessions); blocks a cancelled load may still write count until it lets go."""
        return self.pool.num_used - self.kv.cache.num_blocks

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def step(self) -> list[RequestOutput]:
        self.kv.free_released()
        if self._preparing:
            # Nothing else to run: wait a moment for the store rather than return an empty step at once.
            self._schedule_prepared(0.0 if self.scheduler.has_work() else PREPARED_WAIT_S)
        batch = self.scheduler.schedule()
        self.stats.preemptions += batch.num_preempted
        if batch.empty:
            return []
        self._batch = [seq for seq, _ in batch.items]
        if self.faults.active:
            self.faults.before_step()
        for seq, n in batch.items:
            if seq.num_computed < seq.num_prompt_tokens:
                self.stats.prompt_tokens += min(n, seq.num_prompt_tokens - seq.num_computed)
        try:
            seqs, logits = self.runner.run(batch)
        except LoadFailed as e:
            log.warning("history KV of %s did not arrive (%s): recomputing it", e.seq.request_id, e)
            self.kv.load_failed(e.seq)
            self._batch = []
            return []
        self.stats.steps += 1
        self.last_step_time = time.monotonic()
        for seq, n in batch.items:
            self.kv.saved(seq, seq.num_computed - n, seq.num_computed)
        outputs = []
        unmasked = mask_logits(logits, {i: seq.grammar for i, seq in enumerate(seqs) if seq.grammar is not None})
        greedy = plain_greedy_tokens(logits, [seq.sampling for seq in seqs])
        for i, seq in enumerate(seqs):
            try:
                if i in unmasked:
                    raise unmasked[i]
                outputs.append(self._append_token(seq, logits[i], greedy.get(i)))
            except Exception as e:  # this request's sampling, text or stop check: it alone ends
                log.exception("request %s failed after the forward pass", seq.request_id)
                outputs.append(self._fail(seq, f"internal error in request {seq.request_id}: {e}"))
        self._batch = []
        return outputs

    def fail_batch(self, message: str) -> list[RequestOutput]:
        """After a failed step: end the requests of that step's batch (only them) and free their blocks."""
        outs = [self._fail(seq, message) for seq in self._batch if seq.request_id in self._seqs]
        self._batch = []
        return outs

    def fail_all(self, message: str) -> list[RequestOutput]:
        """The engine is going away: end every request with an error instead of hanging it."""
        return [self._fail(seq, message) for seq in list(self._seqs.values())]

    def _fail(self, seq: Sequence, message: str) -> RequestOutput:
        seq.finish_reason = "error"
        out = self._finish(seq)
        out.error = message
        return out

    def snapshot(self, in_flight: int) -> EngineSnapshot:
        """Everything /metrics shows, copied on the engine thread (no other thread reads engine state)."""
        return EngineSnapshot.take(self, in_flight)

    def _append_token(self, seq: Sequence, logits: torch.Tensor, token: int | None) -> RequestOutput:
        """Sample `seq`'s next token from its logits row (unless `token` was picked already) and emit it."""
        p = seq.sampling
        if self.faults.active:
            self.faults.before_sample(p.seed)
        stop_ids = ([] if p.ignore_eos else self.eos_token_ids) + p.stop_token_ids
        logprob = None
        if token is None:
            # A grammar decides where the output may end: min_tokens does not mask stop tokens then.
            token, logprob = sample_token(logits, p, seq.token_ids[: seq.num_prompt_tokens], seq.output_ids,
                                          stop_ids if seq.grammar is None else [], seq.generator)
        if seq.grammar is not None and not seq.grammar.accept(token):
            raise RuntimeError(f"token {token} does not follow the request's grammar")
        seq.token_ids.append(token)
        self.stats.generation_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
            self.stats.observe_ttft(seq.first_token_time - seq.arrival_time, seq.cache_tier)
        seq.pending_token_ids.append(token)
        if logprob is not None:
            seq.pending_logprobs.append(logprob)

        # The sampler masks stop tokens until min_tokens; a grammar ends on one of the model's stop tokens.
        stopped_by_token = token in stop_ids or (seq.grammar is not None and seq.grammar.finished)
        text_ids = seq.output_ids[:-1] if stopped_by_token else seq.output_ids
        seq.output_text.update(text_ids)
        if stopped_by_token or seq.output_text.stopped:
            seq.finish_reason = "stop"
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.context_limit:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            return self._finish(seq)
        return self._output(seq, final=False)

    def _output(self, seq: Sequence, final: bool) -> RequestOutput:
        out = RequestOutput(
            request_id=seq.request_id,
            new_token_ids=seq.pending_token_ids,
            new_text=seq.output_text.take_delta(final),
            logprobs=seq.pending_logprobs,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_shared_tokens=seq.num_shared_tokens,
            cache_tier=seq.cache_tier,
            skip=self.skips.report(seq.skip) if seq.skip is not None else None,
            finished=final,
            finish_reason=seq.finish_reason if final else None,
        )
        seq.pending_token_ids, seq.pending_logprobs = [], []
        return out

    def _finish(self, seq: Sequence) -> RequestOutput:
        self.scheduler.remove(seq, keep_blocks=seq.finish_reason != "error")
        seq.status = SequenceStatus.FINISHED
        self._seqs.pop(seq.request_id, None)
        self.stats.finished[seq.finish_reason or "stop"] += 1
        if seq.skip is not None:
            self.stats.observe_skip(seq.skip)
        return self._output(seq, final=True)
