"""Every CUDA kernel against its PyTorch reference on CPU, on fresh random inputs, outputs poisoned with NaN."""

from __future__ import annotations

import pytest
import torch

from strata.kernels import cuda_ext, kv_copy, ops, paged_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

# (heads, kv_heads, head_dim) of the Llama family: SmolLM2-135M/360M, Llama-3.2-1B/3B, Llama-3-8B and
# Mistral-7B, Llama-2-7B (no GQA), Qwen2-0.5B/7B (7 heads per KV head), Llama-3-70B, 10 heads per KV head
# (two query-head tiles per KV head), head_dim 256.
SHAPES = [(9, 3, 64), (15, 5, 64), (32, 8, 64), (24, 8, 128), (32, 8, 128), (32, 32, 128), (14, 2, 64),
          (28, 4, 128), (64, 8, 128), (40, 4, 128), (8, 2, 256)]
DTYPES = [torch.float16, torch.bfloat16]
TOL = {torch.float16: {"atol": 3e-3, "rtol": 1e-2}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
       torch.float32: {"atol": 1e-5, "rtol": 1e-4}}
SHORT = [1, 7, 16, 17, 200]  # every context in one partition: the kernel writes the output itself
LONG = [1, 255, 257, 1000, 3000]  # several partitions, merged by the second kernel


@pytest.fixture(scope="module")
def ext():
    module = cuda_ext.extension()
    assert module is not None, "the CUDA kernels did not build or load (see the log for the compiler error)"
    return module


def paged_case(seed: int, heads: int, kv_heads: int, dim: int, block_size: int, lens: list[int],
               dtype: torch.dtype):
    """q, caches, tables on the GPU over shuffled blocks; every slot past a context holds NaN."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(per_seq) + 5
    k_cache = torch.full((num_blocks, block_size, kv_heads, dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(lens), max(per_seq) + 2), num_blocks - 1, dtype=torch.long)  # padded past the end
    used = 0
    for i, (n, nb) in enumerate(zip(lens, per_seq, strict=True)):
        tables[i, :nb] = order[used:used + nb]
        used += nb
        slots = paged_attention.block_slots(tables[i], n, block_size)
        k_cache.view(-1, kv_heads, dim)[slots] = torch.randn(n, kv_heads, dim, generator=gen).to(dtype)
        v_cache.view(-1, kv_heads, dim)[slots] = torch.randn(n, kv_heads, dim, generator=gen).to(dtype)
    q = torch.randn(len(lens), heads, dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lens)


def reference_decode(q, k_cache, v_cache, tables, lens, scale) -> torch.Tensor:
    """The CPU reference in float32 (it masks with -inf, so padded slots must hold numbers for it)."""
    return paged_attention.paged_decode_attention(q.float(), k_cache.float().nan_to_num(0.0),
                                                  v_cache.float().nan_to_num(0.0), tables, lens, scale)


@pytest.mark.parametrize("lens", [SHORT, LONG], ids=["short", "long"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads,kv_heads,dim", SHAPES)
def test_paged_decode_attention(ext, heads, kv_heads, dim, block_size, dtype, lens):
    seed = heads * 1000 + dim + block_size + len(lens)
    q, k, v, tables, ctx = paged_case(seed, heads, kv_heads, dim, block_size, lens, dtype)
    scale = dim**-0.5
    want = reference_decode(q, k, v, tables, ctx, scale)
    out = torch.full_like(q, float("nan")).cuda()
    ext.paged_decode_attention(out, q.cuda(), k.cuda(), v.cuda(), tables.cuda(), ctx.cuda(), scale)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    torch.testing.assert_close(out.float().cpu(), want, **TOL[dtype])


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (32, 8, 128)])
def test_paged_decode_attention_float32(ext, heads, kv_heads, dim):
    q, k, v, tables, ctx = paged_case(3, heads, kv_heads, dim, 16, LONG, torch.float32)
    out = torch.full_like(q, float("nan")).cuda()
    ext.paged_decode_attention(out, q.cuda(), k.cuda(), v.cuda(), tables.cuda(), ctx.cuda(), 0.1)
    torch.testing.assert_close(out.cpu(), reference_decode(q, k, v, tables, ctx, 0.1), **TOL[torch.float32])


def test_decode_dispatch_reaches_the_kernel(ext):
    q, k, v, tables, ctx = [t.cuda() for t in paged_case(5, 32, 8, 128, 16, LONG, torch.float16)]
    direct = torch.full_like(q, float("nan"))
    ext.paged_decode_attention(direct, q, k, v, tables, ctx, 0.1)
    via_ops = ops.paged_decode_attention(q, k, v, tables, ctx, 0.1)  # deterministic: equal only if the kernel ran
    torch.testing.assert_close(via_ops, direct, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float32], ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("kv_heads,dim", [(3, 64), (8, 128), (2, 256)])
def test_write_kv(ext, kv_heads, dim, block_size, dtype):
    gen = torch.Generator().manual_seed(kv_heads + dim + block_size)
    tokens, blocks = 37, 9
    caches = torch.full((2, blocks, block_size, kv_heads, dim), float("nan"), dtype=dtype)
    fused = torch.randn(tokens, 3, kv_heads, dim, generator=gen).to(dtype)  # v strided, as from the qkv split
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens]
    want = caches.clone()
    paged_attention.write_kv(want[0], want[1], fused[:, 0], fused[:, 2], slots)
    got = caches.cuda()
    fused_gpu = fused.cuda()
    ext.write_kv(got[0], got[1], fused_gpu[:, 0], fused_gpu[:, 2], slots.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True)


def layer_pair(seed: int, dtype: torch.dtype, cap: int = 48, slots: int = 400, heads: int = 8, dim: int = 128):
    """A DRAM chunk's layer slice [2, count, h, d] (strided halves) and a pool layer [2, slots, h, d] (NaN)."""
    gen = torch.Generator().manual_seed(seed)
    chunk = torch.randn(2, cap, heads, dim, generator=gen).to(dtype)
    pool = torch.full((2, slots, heads, dim), float("nan"), dtype=dtype)
    return gen, chunk, pool


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_copy_pinned_host_to_pool_slots(ext, dtype):
    gen, chunk, pool = layer_pair(1, dtype)
    src = chunk.pin_memory()[:, :40]
    dst_slots = torch.randperm(pool.shape[1], generator=gen)[:40]
    want = pool.clone()
    kv_copy.copy_kv_slots(want, dst_slots, chunk[:, :40], None)
    got = pool.cuda()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # as the tier loader runs it
        ext.copy_kv_slots(got, dst_slots.cuda(), src, None)
    stream.synchronize()
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_copy_pool_slots_to_pinned_host(ext, dtype):
    gen, chunk, pool = layer_pair(2, dtype)
    pool = torch.randn(pool.shape, generator=gen).to(dtype)
    src_slots = torch.randperm(pool.shape[1], generator=gen)[:33]
    host = torch.full_like(chunk, float("nan")).pin_memory()
    want = host.clone()
    kv_copy.copy_kv_slots(want, None, pool, src_slots)
    ext.copy_kv_slots(host, None, pool.cuda(), src_slots.cuda())
    torch.cuda.synchronize()
    torch.testing.assert_close(host, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_copy_dispatch_device_to_device_and_pageable(ext, dtype):
    gen, chunk, pool = layer_pair(3, dtype)
    dst_slots = torch.randperm(pool.shape[1], generator=gen)[:48]
    src_slots = torch.randperm(48, generator=gen)
    want = pool.clone()
    kv_copy.copy_kv_slots(want, dst_slots, chunk, src_slots)
    for src in (chunk.cuda(), chunk):  # on the device; pageable host memory (staged by the dispatch)
        got = pool.cuda()
        ops.copy_kv_slots(got, dst_slots, src, src_slots)
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float32], ids=str)
@pytest.mark.parametrize("n,history", [(64, 0), (37, 300), (1, 50), (300, 17)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (32, 8, 128), (8, 8, 64)])
def test_prefill_attention(heads, kv_heads, dim, n, history, dtype):
    gen = torch.Generator().manual_seed(n + history + dim)
    q = torch.randn(n, heads, dim, generator=gen).to(dtype)
    k = torch.randn(n + history, kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(n + history, kv_heads, dim, generator=gen).to(dtype)
    want = paged_attention.prefill_attention(q.float(), k.float(), v.float(), dim**-0.5)
    got = ops.prefill_attention(q.cuda(), k.cuda(), v.cuda(), dim**-0.5)
    torch.testing.assert_close(got.float().cpu(), want, **TOL[dtype])


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_quantized_linear_is_the_weight_only_reference(ext, fmt, rows, dtype):
    """Up to 8 rows the warp-per-column kernel, beyond them the dequantized weight and the matrix library: both equal
    F.linear on the dequantized weight (on the GPU the activations are not quantized)."""
    from strata.kernels import quantized

    gen = torch.Generator().manual_seed(rows)
    q = quantized.quantize(torch.randn(200, 320, generator=gen) * 0.05, fmt)
    x = torch.randn(rows, 320, generator=gen).to(dtype)
    bias = torch.randn(200, generator=gen).to(dtype)
    want = torch.nn.functional.linear(x.float(), q.dequantize(), bias.float())
    got = ops.quantized_linear(x.cuda(), q.to(torch.device("cuda")), bias.cuda())
    assert got.dtype == dtype and got.shape == (rows, 200)
    torch.testing.assert_close(got.float().cpu(), want, **TOL[dtype])
    w = torch.full((200, 320), float("nan"), dtype=dtype, device="cuda")
    ext.quant_dequantize(w, q.qs.cuda(), q.d.cuda(), q.m.cuda() if q.m is not None else None)
    torch.testing.assert_close(w.float().cpu(), q.dequantize().to(dtype).float())
