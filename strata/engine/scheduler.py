"""Which sequences run in the next step, and how many of their tokens.

One token budget per step covers decodes (one token each) and prefill chunks,
so a long prompt is cut into chunks and never stalls the running decodes for
long. Running sequences go first; waiting ones are admitted while the budget,
`max_num_seqs` and free KV blocks allow. An admitted sequence first takes over
whatever history KV can be reused (see kv_cache). Blocks are found by dropping
cached sessions (least recently used first, queued sessions last) and, when none
are left, by preempting the most recently admitted sequence: its blocks are cached
and it is recomputed later from what remains of them. A waiting sequence that
cannot be admitted holds nothing, so it never keeps others from running.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from strata.engine.config import EngineConfig
from strata.engine.kv_cache import KVCacheManager
from strata.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    items: list[tuple[Sequence, int]]  # (sequence, number of new tokens to compute)
    num_preempted: int = 0

    @property
    def empty(self) -> bool:
        return not self.items


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
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
        self.kv.release(seq, keep_blocks)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.release(seq, keep=True)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.acquired = False  # on readmission it takes its cached blocks back
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        items: list[tuple[Sequence, int]] = []
        preempted = 0
        waiting = list(self.waiting)
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.kv.grow(seq, seq.num_computed + n, waiting):
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
            if self.running and not self.kv.could_fit(seq):
                break  # wait for running sequences to finish rather than load history it cannot use yet
            if not seq.acquired:
                self.kv.acquire(seq)
                seq.acquired = True
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.kv.grow(seq, seq.num_computed + n, list(self.waiting)):
                self.kv.give_back(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.kv.admitted(seq)
            items.append((seq, n))
            budget -= n
        self.kv.upcoming(list(self.waiting))
        return ScheduledBatch(items, preempted)
