"""The kernel dispatch and the GPU-side logic that runs on CPU: each op's dispatch equals its reference
on CPU tensors (bit for bit where it is the reference; the C++ decode kernel within float rounding), the
GPU prefill formulation equals the reference, and the tier loader's per-layer path (the one the CUDA
streams drive) moves KV unchanged. tests/gpu covers the CUDA side."""

from __future__ import annotations

import threading

import pytest
import torch

from strata.engine.models.attention_batch import AttentionBatch, LayerSkip, PrefillSlice, SkipPlan
from strata.kernels import cpu_ext, cuda_ext, kv_copy, ops, paged_attention, prefill_gpu
from strata.kernels.device import default_device
from strata.storage.block_pool import BlockPool
from strata.storage.block_table import BlockTable
from strata.storage.kv_store import KVStore
from strata.storage.load_handle import LoadHandle

SHAPES = [(9, 3, 64), (8, 2, 128), (4, 4, 32)]  # (heads, kv_heads, head_dim): SmolLM2, Llama-style GQA, MHA


def paged_case(gen: torch.Generator, heads: int, kv_heads: int, dim: int, block_size: int, lens: list[int]):
    """Random q, caches and block tables over shuffled blocks; unused slots hold NaN."""
    per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(per_seq) + 3
    k_cache = torch.full((num_blocks, block_size, kv_heads, dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(lens), max(per_seq), dtype=torch.long)
    used = 0
    for i, (n, nb) in enumerate(zip(lens, per_seq, strict=True)):
        tables[i, :nb] = order[used:used + nb]
        used += nb
        slots = paged_attention.block_slots(tables[i], n, block_size)
        paged_attention.write_kv(k_cache, v_cache, torch.randn(n, kv_heads, dim, generator=gen),
                                 torch.randn(n, kv_heads, dim, generator=gen), slots)
    q = torch.randn(len(lens), heads, dim, generator=gen)
    return q, k_cache, v_cache, tables, torch.tensor(lens)


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("heads,kv_heads,dim", SHAPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_dispatch_is_the_reference_on_cpu(heads, kv_heads, dim, block_size, dtype):
    gen = torch.Generator().manual_seed(heads * block_size)
    q, k, v, tables, lens = paged_case(gen, heads, kv_heads, dim, block_size, [1, 40, 300])
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    # The reference masks with -inf: padded slots must hold numbers for it. The kernel never reads them:
    # it gets the NaNs.
    want = paged_attention.paged_decode_attention(q.float(), k.nan_to_num(0.0).float(), v.nan_to_num(0.0).float(),
                                                  tables, lens, dim**-0.5)
    tol = {"atol": 2e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    got = ops.paged_decode_attention(q, k, v, tables, lens, dim**-0.5)
    assert got.dtype == dtype and got.isfinite().all()
    torch.testing.assert_close(got.float(), want, **tol)
    out = torch.full_like(q, float("nan"))
    assert ops.paged_decode_attention(q, k, v, tables, lens, dim**-0.5, out=out) is out
    same(out, got)
    strided = torch.full((q.shape[0], q.shape[1], 2 * dim), float("nan"), dtype=dtype)[..., :dim]
    assert ops.paged_decode_attention(q, k, v, tables, lens, dim**-0.5, out=strided) is strided
    same(strided, got)


def test_cpu_kernel_is_built_and_checks_its_indices():
    """The C++ kernel builds on this machine (the CPU fast path), and bad indices raise, never read outside."""
    assert cpu_ext.loaded(), "the CPU kernels did not build"
    gen = torch.Generator().manual_seed(3)
    q, k, v, tables, lens = paged_case(gen, 9, 3, 64, 16, [20, 40])
    out = torch.empty_like(q)
    for bad_tables, bad_lens, bad_rows in ((tables + 1000, lens, torch.arange(2)),
                                           (tables, lens + 1000, torch.arange(2)),
                                           (tables, lens, torch.tensor([0, 5]))):
        with pytest.raises(RuntimeError):
            cpu_ext.extension().paged_attention(out, q, k, v, bad_tables, bad_rows, bad_lens, 0.125)


def test_decode_reference_matches_dense_attention():
    gen = torch.Generator().manual_seed(1)
    q, k, v, tables, lens = paged_case(gen, 8, 2, 32, 16, [5, 33])
    got = ops.paged_decode_attention(q, k.nan_to_num(0.0), v.nan_to_num(0.0), tables, lens, 0.25)
    for b, n in enumerate(lens.tolist()):
        slots = paged_attention.block_slots(tables[b], n, 16)
        keys = paged_attention.gather_kv(k, slots).repeat_interleave(4, dim=1)  # [n, heads, d]
        vals = paged_attention.gather_kv(v, slots).repeat_interleave(4, dim=1)
        probs = torch.softmax(torch.einsum("hd,nhd->hn", q[b], keys) * 0.25, dim=-1)
        torch.testing.assert_close(got[b], torch.einsum("hn,nhd->hd", probs, vals))


@pytest.mark.parametrize("heads,kv_heads,dim", SHAPES)
def test_write_kv_dispatch_is_the_reference_on_cpu(heads, kv_heads, dim):
    gen = torch.Generator().manual_seed(dim)
    caches = [torch.full((6, 16, kv_heads, dim), float("nan")) for _ in range(4)]
    fused = torch.randn(20, 3, kv_heads, dim, generator=gen)  # v as a strided slice, as the model passes it
    k, v = fused[:, 0], fused[:, 2]
    slots = torch.randperm(6 * 16, generator=gen)[:20]
    paged_attention.write_kv(caches[0], caches[1], k, v, slots)
    ops.write_kv(caches[2], caches[3], k, v, slots)
    same(caches[2], caches[0])
    same(caches[3], caches[1])


@pytest.mark.parametrize("n,history", [(7, 0), (5, 30), (1, 12)])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4)])
def test_prefill_dispatch_and_gpu_formulation(n, history, heads, kv_heads):
    gen = torch.Generator().manual_seed(n + history)
    q = torch.randn(n, heads, 64, generator=gen)
    k = torch.randn(n + history, kv_heads, 64, generator=gen)
    v = torch.randn(n + history, kv_heads, 64, generator=gen)
    want = paged_attention.prefill_attention(q, k, v, 0.125)
    same(ops.prefill_attention(q, k, v, 0.125), want)
    # The GPU formulation (lower-right causal bias, expanded heads for fp32) computes the same attention.
    torch.testing.assert_close(prefill_gpu.prefill_attention(q, k, v, 0.125), want)


@pytest.mark.parametrize("with_dst,with_src", [(True, False), (False, True), (True, True), (False, False)])
def test_copy_kv_slots(with_dst, with_src):
    gen = torch.Generator().manual_seed(with_dst * 2 + with_src)
    src = torch.randn(2, 40, 3, 8, generator=gen)[:, :30]  # a chunk's layer slice: strided K/V halves
    dst = torch.full((2, 50, 3, 8), float("nan"))
    dst_slots = torch.randperm(50, generator=gen)[:12] if with_dst else None
    src_slots = torch.randperm(30, generator=gen)[:12] if with_src else None
    if not with_dst and not with_src:
        dst_slots_eff, src_rows = torch.arange(30), torch.arange(30)
    else:
        dst_slots_eff = dst_slots if with_dst else torch.arange(12)
        src_rows = src_slots if with_src else torch.arange(12)
    want = dst.clone()
    for i, j in zip(dst_slots_eff.tolist(), src_rows.tolist(), strict=True):
        want[:, i] = src[:, j]
    got = dst.clone()
    ops.copy_kv_slots(got, dst_slots, src, src_slots)
    same(got, want)
    ref = dst.clone()
    kv_copy.copy_kv_slots(ref, dst_slots, src, src_slots)
    same(ref, want)


def test_batch_and_skip_plan_move_together():
    rows = torch.tensor([0, 2])
    plan = SkipPlan([LayerSkip(rows, torch.ones(3), rows, torch.ones(3)) for _ in range(3)], measure_rows=rows)
    moved = plan.to(torch.device("meta"))
    assert moved.stats is plan.stats  # the forward appends to the caller's list
    assert all(ls.attn_rows is moved.layers[0].attn_rows is ls.ffn_rows for ls in moved.layers)
    assert moved.layers[0].attn_rows.device.type == "meta"
    batch = AttentionBatch(torch.arange(6).view(2, 3), [PrefillSlice(0, 2, 4, torch.arange(12).view(2, 6))],
                           torch.tensor([2]), torch.zeros(2, 1, 2, dtype=torch.long), torch.tensor([5]))
    b = batch.to(torch.device("meta"))
    assert b.prefills[0].context_slots.device.type == "meta" and b.decode_block_tables.device.type == "meta"
    assert (b.prefills[0].start, b.prefills[0].end, b.prefills[0].history) == (0, 2, 4)


def test_device_comes_from_strata_device(monkeypatch):
    monkeypatch.delenv("STRATA_DEVICE", raising=False)
    assert default_device() == torch.device("cpu")
    assert BlockPool(1, 1, 8, 16, 2, torch.float32).kv.device.type == "cpu"
    with pytest.raises(ValueError, match="less than one block per layer"):
        BlockPool(3, 1, 8, 16, 2, torch.float32)
    if not torch.cuda.is_available():
        monkeypatch.setenv("STRATA_DEVICE", "cuda")
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            default_device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_no_extension_without_cuda():
    assert cuda_ext.extension() is None
    assert cuda_ext.build_name().startswith("strata_kernels_")
    assert {p.name for p in cuda_ext.CSRC.iterdir()} >= set(cuda_ext.SOURCES)


def test_load_handle_keeps_one_event_per_layer():
    handle = LoadHandle("s", 10, 3, readahead_layers=1)
    events = [object(), None, object()]
    waited: list[int] = []

    def runner() -> None:
        for layer in range(3):
            handle.wait(layer, timeout=10)
            waited.append(layer)

    t = threading.Thread(target=runner)
    t.start()
    for layer in range(3):
        assert handle.wait_room(layer)
        handle.mark_ready(layer, events[layer])
    t.join(10)
    assert waited == [0, 1, 2]
    assert [handle.event(i) for i in range(3)] == events


@pytest.mark.parametrize("tier", ["dram", "ssd"])
def test_tier_load_puts_the_same_kv_into_new_blocks(tmp_path, tier):
    """Save KV from some blocks, load it layer by layer into others: byte-identical, every layer."""
    gen = torch.Generator().manual_seed(7)
    pool = BlockPool(3, 2, 16, 8, 3 * 24, torch.float16, device="cpu")
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=gen).to(torch.float16))
    store = KVStore(pool, model_fingerprint="fp", dram_bytes=1 << 20, ssd_dir=tmp_path, ssd_bytes=1 << 24,
                    chunk_tokens=16)
    try:
        ids = list(range(100, 140))
        src_blocks = BlockTable.allocate(pool, 40)
        store.save("s", ids, src_blocks, 0, 40)
        store.finish("s", ids)
        store.flush()
        if tier == "ssd":  # drop the DRAM copies: the load must read the chunk files
            with store.index.lock:
                for chunk in store.index.entries["s"].chunks:
                    store.dram.evict_chunk_locked(store.index.entries["s"], chunk)
        hit = store.lookup("s", ids + [1])
        assert hit == (40, tier)
        dst_blocks = BlockTable.allocate(pool, 40)
        pool.kv[:, torch.tensor(dst_blocks.blocks())] = float("nan")
        handle = store.start_load("s", ids, 40, dst_blocks)
        for layer in range(3):
            store.wait_layer(handle, layer, timeout=30)
            assert handle.event(layer) is None  # on CPU there is no stream to wait on
        same(pool.read(dst_blocks.slots(8, 0, 40)), pool.read(src_blocks.slots(8, 0, 40)))
    finally:
        store.close()
