"""Context overflow: truncated history served from re-rotated stored KV (CachedAttention "Positions").

The perplexity test drives the model directly over a real BlockPool and KVStore: a long
context is stored, cut to its first and last tokens with ``KVStore.truncate``, and the
following tokens are scored on top of (a) a recompute of the cut text, (b) the re-rotated
stored KV, (c) the kept KV left at its old positions.
"""

from __future__ import annotations

import importlib
import math
import pydoc

import pytest
import torch
import torch.nn.functional as F

from strata.engine.models.attention_batch import AttentionBatch, PrefillSlice
from strata.engine.models.llama import LlamaModel
from strata.engine.tokenizer import Tokenizer
from strata.storage.block_pool import BlockPool
from strata.storage.kv_store import KVStore

EMPTY = torch.zeros(0, dtype=torch.long)
BS = 16
CONTEXT, HEAD, TAIL, FOLLOW = 2048, 16, 1024, 256


def slots_of(table: list[int], start: int, end: int) -> torch.Tensor:
    pos = torch.arange(start, end)
    t = torch.as_tensor(table, dtype=torch.long)
    return t[pos // BS] * BS + pos % BS


def prefill(model: LlamaModel, pool: BlockPool, table: list[int], ids: list[int], history: int,
            first_position: int) -> torch.Tensor:
    """Run ``ids`` after ``history`` cached tokens (slots [0, history) of ``table``); logits per token.

    ``first_position`` is the rotary position of ids[0]: normally ``history``, but it may differ to
    model keys cached at positions that do not match their slots.
    """
    n = len(ids)
    new = slots_of(table, history, history + n)
    ctx = slots_of(table, 0, history + n) if history else None
    batch = AttentionBatch(new, [PrefillSlice(0, n, history, ctx)], EMPTY, torch.zeros(0, 1, dtype=torch.long),
                           EMPTY)
    positions = torch.arange(first_position, first_position + n)
    with torch.inference_mode():
        return model.logits(model.forward(torch.tensor(ids), positions, batch, pool.kv))


def perplexity(logits: torch.Tensor, targets: list[int]) -> float:
    """logits[i] predicts targets[i]."""
    return math.exp(F.cross_entropy(logits[: len(targets)], torch.tensor(targets)).item())


@pytest.fixture(scope="module")
def model(model_files) -> LlamaModel:
    return LlamaModel.load(model_files.directory, torch.float32)


@pytest.fixture(scope="module")
def tokenizer(model_files) -> Tokenizer:
    return Tokenizer(model_files.directory)


def document(tokenizer: Tokenizer, module: str) -> list[int]:
    """Long English text: a standard module's rendered docs."""
    text = pydoc.render_doc(importlib.import_module(module), renderer=pydoc.plaintext)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) >= CONTEXT + FOLLOW + 1
    return ids[: CONTEXT + FOLLOW + 1]


def three_ways(model: LlamaModel, ids: list[int], tmp_path) -> tuple[float, float, float]:
    """Perplexity of the FOLLOW tokens after the cut context: (recompute, re-rotated, unrotated)."""
    cfg = model.cfg
    pool = BlockPool(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, BS,
                     2 * (CONTEXT + FOLLOW) // BS + 8, torch.float32)
    store = KVStore(pool, model_fingerprint="ppl", dram_bytes=2**30, ssd_dir=tmp_path / "ssd", ssd_bytes=2**30,
                    rope_inv_freq=model.inv_freq)
    context, follow = ids[:CONTEXT], ids[CONTEXT:]
    kept = context[:HEAD] + context[CONTEXT - TAIL:]
    targets = follow[1:]  # the model sees follow[i] and predicts follow[i + 1]
    try:
        # The full context once, stored as a session would be.
        table = pool.allocate(pool.blocks_for(CONTEXT))
        prefill(model, pool, table, context, 0, 0)
        store.save("s", context, table, 0, CONTEXT)
        store.finish("s", context)
        store.flush()
        old_kv = pool.kv.view(*pool.kv.shape[:2], -1, *pool.kv.shape[4:])[:, :, slots_of(table, 0, CONTEXT)]
        pool.free(table)

        # (a) the cut text recomputed from scratch.
        table = pool.allocate(pool.blocks_for(len(kept) + len(follow)))
        ref = prefill(model, pool, table, kept + follow, 0, 0)[len(kept):]
        pool.free(table)

        # (b) the stored KV truncated (re-rotated), loaded into fresh blocks; only FOLLOW runs.
        assert store.truncate("s", HEAD, CONTEXT - TAIL) == len(kept)
        assert store.lookup("s", kept + follow).tokens == len(kept)
        table = pool.allocate(pool.blocks_for(len(kept) + len(follow)))
        handle = store.start_load("s", len(kept), table)
        for layer in range(cfg.num_hidden_layers):
            store.wait_layer(handle, layer, timeout=30)
        rotated = prefill(model, pool, table, follow, len(kept), len(kept))

        # (c) the same kept KV at its old positions (no re-rotation); FOLLOW at the new positions.
        flat = pool.kv.view(*pool.kv.shape[:2], -1, *pool.kv.shape[4:])
        flat[:, :, slots_of(table, 0, len(kept))] = torch.cat([old_kv[:, :, :HEAD], old_kv[:, :, CONTEXT - TAIL:]], 2)
        unrotated = prefill(model, pool, table, follow, len(kept), len(kept))
        pool.free(table)
    finally:
        store.close()
    return perplexity(ref, targets), perplexity(rotated, targets), perplexity(unrotated, targets)


# One text by default (about 30 s on 2 cores); the second only in the slow run.
@pytest.mark.parametrize("module", ["json", pytest.param("collections", marks=pytest.mark.slow)])
def test_rerotated_kv_matches_recompute_perplexity(model, tokenizer, module, tmp_path):
    recompute, rotated, unrotated = three_ways(model, document(tokenizer, module), tmp_path)
    print(f"{module}: recompute {recompute:.3f} re-rotated {rotated:.3f} unrotated {unrotated:.1f}")
    assert abs(rotated - recompute) <= 0.02 * recompute
    assert unrotated > 2 * recompute
