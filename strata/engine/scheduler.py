"""Which sequences run in the next step, and how many of their tokens.

One token budget per step covers decodes (one token each) and prefill chunks,
so a long prompt is cut into chunks and never stalls the running decodes for
long. Running sequences go first; waiting ones are admitted while the budget,
`max_num_seqs` and free KV blocks allow. An admitted sequence first takes over
whatever history KV can be reused (see kv_reuse). Blocks are found by dropping
cached sessions (least recently used first, queued sessions last) and, when none
are left, by preempting the most recently admitted sequence: its blocks are cached
and it is recomputed later from what remains of them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from strata.engine.config import EngineConfig
from strata.engine.kv_reuse import KVReuse
from strata.engine.sequence import Sequence, SequenceStatus
from strata.storage.block_pool import BlockPool


@dataclass
class ScheduledBatch:
    items: list[tuple[Sequence, int]]  # (sequence, number of new tokens to compute)
    num_preempted: int = 0

    @property
    def empty(self) -> bool:
        return not self.items


class Scheduler:
    def __init__(self, config: EngineConfig, pool: BlockPool, reuse: KVReuse) -> None:
        self.config = config
        self.pool = pool
        self.reuse = reuse
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence, keep_blocks: bool) -> None:
        """Drop a finished or aborted sequence; its blocks stay cached if `keep_blocks`."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.reuse.release(seq, keep_blocks)

    def _protected(self) -> set[str]:
        return {k for s in self.waiting if (k := self.reuse.cache_key(s))}

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for num_tokens tokens at each layer the sequence's next step writes KV at."""
        skip = seq.attn_skips_next()
        need = seq.blocks.blocks_needed(self.pool, num_tokens, skip)
        if need <= 0:
            return True
        if need > self.pool.num_free and not self.reuse.cache.evict(need, self._protected()):
            return False
        seq.blocks.grow(self.pool, num_tokens, skip)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.reuse.release(seq, keep=True)
        seq.num_computed = 0
        seq.acquired = False  # on readmission it takes its cached blocks back
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        items: list[tuple[Sequence, int]] = []
        preempted = 0
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self._grow(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            items.append((seq, n))
            budget -= n

        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not seq.acquired:
                self.reuse.acquire(seq)
                seq.acquired = True
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._grow(seq, seq.num_computed + n):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            items.append((seq, n))
            budget -= n
        self.reuse.upcoming(list(self.waiting))
        return ScheduledBatch(items, preempted)
