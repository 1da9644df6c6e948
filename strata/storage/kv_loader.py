"""The loader: a session's stored KV into device blocks, layer by layer, on its own thread.

``start`` pins down what to read under the index lock (DRAM tensors by reference, chunk files opened),
having checked that the entry still holds exactly the requesting sequence's tokens; the loader thread
then copies layer after layer, at most ``readahead_layers`` ahead of the runner's ``wait_layer``.
On a GPU the copies run on the load stream with one event per layer (see cuda_streams.py).
"""

from __future__ import annotations

import os
import time
import weakref
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from strata.kernels.ops import copy_kv_slots
from strata.storage.block_pool import BlockPool
from strata.storage.block_table import BlockTable
from strata.storage.chunk_file import ChunkError, ChunkLayout, read_header, read_layer
from strata.storage.cuda_streams import CudaStreams
from strata.storage.job_thread import JobThread
from strata.storage.load_handle import KVLoadError, KVLoadTimeout, LoadHandle
from strata.storage.session_entry import Chunk, SessionEntry
from strata.storage.session_index import SessionIndex
from strata.storage.ssd_tier import SsdTier


@dataclass
class _Piece:
    """One chunk's part of a load: from a DRAM tensor or an open chunk file."""

    chunk: Chunk
    start: int
    count: int
    dram: torch.Tensor | None
    fd: int | None


class KVLoader:
    def __init__(self, index: SessionIndex, ssd: SsdTier, pool: BlockPool, layout: ChunkLayout,
                 streams: CudaStreams | None, readahead_layers: int) -> None:
        self.index = index
        self.ssd = ssd
        self.pool = pool
        self.layout = layout
        self._streams = streams
        self._readahead = readahead_layers
        self._handles: weakref.WeakSet[LoadHandle] = weakref.WeakSet()  # close() cancels loads in flight
        self.thread = JobThread("kv-loader", lambda: index.count("background_errors"))

    def start(self, session_key: str, token_ids: list[int], num_tokens: int, blocks: BlockTable) -> LoadHandle:
        index = self.index
        pieces: list[_Piece] = []
        with index.lock:
            entry = index.entries.get(session_key)
            # Checked under the same lock as the reads below: a cut or a rewrite of the session since the
            # caller's lookup must not hand it the KV of other tokens.
            if (entry is None or num_tokens < 1 or len(entry.tokens) < num_tokens or len(token_ids) < num_tokens
                    or entry.tokens[:num_tokens] != list(token_ids[:num_tokens])
                    or index.intact_upto_locked(entry.chunks, num_tokens) < num_tokens):
                raise KVLoadError(f"session {session_key!r} does not hold these {num_tokens} tokens")
            try:
                for c in entry.chunks_for(num_tokens):
                    count = min(c.n, num_tokens - c.start)
                    if c.dram is not None:
                        pieces.append(_Piece(c, c.start, count, c.dram, None))
                    else:
                        assert c.ssd is not None
                        # Opened now: an eviction may unlink the file, the open descriptor still reads it.
                        pieces.append(_Piece(c, c.start, count, None, os.open(c.ssd.path, os.O_RDONLY)))
            except OSError as e:
                _close_fds(pieces)
                raise KVLoadError(f"chunk file of {session_key!r} is gone: {e}") from e
            for p in pieces:
                index.counters["tokens_reused_dram" if p.dram is not None else "tokens_reused_ssd"] += p.count
                if p.chunk.shared:
                    index.counters["tokens_reused_shared"] += p.count
                if p.chunk.prefetched:
                    p.chunk.prefetched = False
                    index.counters["prefetches_used"] += 1
            entry.active_loads += 1  # keeps its chunks from eviction and expiry until the load ends
            entry.last_used = time.time()
            entry.from_remote = False  # its one "remote" hit is this one
        handle = LoadHandle(session_key, num_tokens, self.layout.num_layers, self._readahead)
        # Stalls are charged to the slowest tier the load reads from.
        handle.tier = "dram" if all(p.dram is not None for p in pieces) else "ssd"
        self._handles.add(handle)
        slots = blocks.slots(self.pool.block_size, 0, num_tokens).to(self.pool.kv.device)
        after = self._streams.mark() if self._streams is not None else None  # the blocks' earlier users
        self.thread.put(lambda: self._run(handle, entry, pieces, slots, after))
        return handle

    def wait_layer(self, handle: LoadHandle, layer: int, timeout: float | None) -> None:
        try:
            stalled = handle.wait(layer, timeout)
        except KVLoadTimeout:
            self.index.count("load_timeouts")
            raise
        event = handle.event(layer)
        if event is not None and self._streams is not None:
            self._streams.wait(event)
        with self.index.lock:
            self.index.counters["load_stall_seconds"] += stalled
            self.index.counters[f"load_stall_seconds_{handle.tier}"] += stalled

    def cancel_all(self) -> None:
        for handle in list(self._handles):
            handle.cancel()

    def _run(self, handle: LoadHandle, entry: SessionEntry, pieces: list[_Piece], slots: torch.Tensor,
             after: torch.cuda.Event | None) -> None:
        t0 = time.perf_counter()
        loaded = Counter[str]()
        current: _Piece | None = None
        streams = self._streams
        began = handle.begin()
        try:
            if not began:  # cancelled while queued: its blocks were never touched
                return
            codec = self.layout.codec  # stored rows -> the model dtype, one layer at a time
            headers = {}
            for p in pieces:
                if p.fd is not None:
                    current = p
                    self.ssd.delays.before_ssd_read()
                    headers[id(p)] = read_header(p.fd, self.layout, os.fstat(p.fd).st_size)
            with streams.loading(after) if streams is not None and after is not None else nullcontext():
                for layer in range(self.layout.num_layers):
                    if not handle.wait_room(layer):
                        return
                    dst = self.pool.slots_view
                    for p in pieces:
                        current = p
                        # A windowed layer's blocks before its window were given back (slot -1): those
                        # tokens are not copied, and may not be stored at all.
                        targets = slots[layer, p.start:p.start + p.count]
                        skip = int((targets < 0).sum()) if self.pool.windows is not None else 0
                        if skip == p.count:
                            continue
                        if p.dram is not None:
                            row = p.chunk.row(layer)
                            if row is None:
                                raise KVLoadError(f"layer {layer} of tokens {p.start}+ is not stored")
                            data = p.dram[row, :, skip:p.count]
                            loaded["dram"] += data.nbytes
                            data = codec.decode(data)
                        else:
                            assert p.fd is not None
                            header, offset = headers[id(p)]
                            if layer not in header.held:
                                raise KVLoadError(f"layer {layer} of tokens {p.start}+ is not stored")
                            data = read_layer(p.fd, header, offset, self.layout, layer)[:, skip:p.count]
                            loaded["ssd"] += data.nbytes
                            data = codec.decode(data)
                        copy_kv_slots(dst, targets[skip:], data, None)
                    handle.mark_ready(layer, streams.layer_loaded() if streams is not None else None)
        except ChunkError as e:
            assert current is not None and current.fd is not None
            self.ssd.discard_corrupt(current.chunk, current.fd, e)
            handle.fail(e)
            self.index.count("load_errors")
        except Exception as e:
            handle.fail(e)
            self.index.count("load_errors")
            raise
        finally:
            if streams is not None and began:
                streams.finish_loads()  # the pinned sources must outlive the copies reading them
            handle.release()  # after finish_loads: nothing queued on the stream writes the blocks any more
            _close_fds(pieces)
            with self.index.lock:
                entry.active_loads -= 1
                self.index.counters["load_seconds"] += time.perf_counter() - t0
                self.index.counters["bytes_loaded_dram"] += loaded["dram"]
                self.index.counters["bytes_loaded_ssd"] += loaded["ssd"]


def _close_fds(pieces: list[_Piece]) -> None:
    for p in pieces:
        if p.fd is not None:
            os.close(p.fd)
            p.fd = None

