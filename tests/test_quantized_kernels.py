"""The quantized linear kernel and the fused layer steps against their PyTorch references, and GGUF blocks taken
into strata's formats without a change of value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strata.engine.weights.gguf_blocks import _DECODE
from strata.kernels import cpu_ext, layer_steps, ops, quantized
from strata.kernels.quantized import QuantizedWeight, quantize


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels():
    assert cpu_ext.loaded(), "the CPU kernels did not build"


def weight(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[:, 5] *= 20  # an outlier column, as real weights have
    return w


@pytest.mark.parametrize("fmt", quantized.FORMATS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("n", [1, 8, 13, 40])
def test_kernel_is_the_reference(fmt, rows, n):
    """Decode-sized inputs: the packed kernel computes the reference's integer dot products and scales (only the
    float summation order differs)."""
    k = 96
    q = quantize(weight(n, k, seed=n), fmt)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3
    packed = ops.pack_quantized(q)
    assert packed is not None and packed.shape == (n, k)
    bias = torch.randn(n)
    want = quantized.reference_linear(x, q, bias)
    got = ops.quantized_linear(x, packed, bias)
    assert got.shape == (rows, n) and got.dtype == x.dtype
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", quantized.FORMATS)
def test_bfloat16_input_and_leading_dims(fmt):
    q = quantize(weight(24, 64, seed=1), fmt)
    x = torch.randn(2, 3, 64).bfloat16()
    got = ops.quantized_linear(x, ops.pack_quantized(q))
    assert got.shape == (2, 3, 24) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), quantized.reference_linear(x.float(), q).view(2, 3, 24),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("fmt", quantized.FORMATS)
def test_a_row_does_not_depend_on_its_batch(fmt):
    """Each output row is computed from its own input row only: alone, in a decode batch or in a long prefill
    chunk, bit for bit (a request's tokens do not change with its neighbours or its prompt's chunking)."""
    packed = ops.pack_quantized(quantize(weight(40, 64, seed=2), fmt))
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(3))
    whole = ops.quantized_linear(x, packed)
    for rows in (slice(0, 1), slice(7, 10), slice(100, 300)):
        assert torch.equal(ops.quantized_linear(x[rows], packed), whole[rows])


def test_quantize_error_bounds():
    w = weight(16, 128, seed=3)
    for fmt, bound in (("int8", 1 / 254), ("int4", 1 / 30)):
        q = quantize(w, fmt)
        blocks, err = w.view(16, 4, 32), (q.dequantize() - w).view(16, 4, 32)
        span = blocks.abs().amax(-1) if fmt == "int8" else blocks.amax(-1) - blocks.amin(-1)
        # round to nearest: at most half a step, plus float16 rounding of the scale
        assert (err.abs().amax(-1) <= span * bound * 1.01 + 1e-6).all(), fmt


def test_int4_holds_a_16_level_grid_exactly():
    """Weights that are already 4-bit per block (a dequantized Q4_1 file) come back unchanged."""
    gen = torch.Generator().manual_seed(4)
    d = (torch.rand(8, 2, 1, generator=gen) + 0.01).half().float()
    m = -torch.rand(8, 2, 1, generator=gen).half().float()
    codes = torch.randint(0, 16, (8, 2, 32), generator=gen)
    codes[..., 0], codes[..., 1] = 0, 15  # the grid's two ends occur in every block
    w = (codes * d + m).view(8, 64)
    torch.testing.assert_close(quantize(w, "int4").dequantize(), w, atol=1e-6, rtol=0)


def test_concat_and_rows():
    a, b = quantize(weight(8, 64, seed=5), "int4"), quantize(weight(4, 64, seed=6), "int4")
    both = quantized.concat([a, b])
    assert both.shape == (12, 64)
    torch.testing.assert_close(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    torch.testing.assert_close(both.rows(torch.tensor([9, 0])).dequantize(), both.dequantize()[[9, 0]])


# ---- GGUF blocks ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,fmt", [("Q8_0", "int8"), ("Q4_0", "int4"), ("Q4_1", "int4")])
def test_gguf_blocks_keep_their_values(kind, fmt):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from gguf.quants import quantize as gguf_quantize

    w = weight(6, 256, seed=7).numpy()
    qtype = GGMLQuantizationType[kind]
    raw = gguf_quantize(w, qtype)
    got = _DECODE[kind](raw)
    assert got.format == fmt and got.shape == (6, 256)
    want = torch.from_numpy(dequantize(raw, qtype).reshape(6, 256).astype(np.float32))
    torch.testing.assert_close(got.dequantize(), want, atol=0, rtol=0)


def test_gguf_q4_k_sub_blocks():
    """Q4_K's 6-bit sub-scales and nibble order: random super-blocks against gguf's own dequantization
    (the sub-block scale d * sc is rounded to float16 once)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rng = np.random.default_rng(8)
    rows, supers = 3, 2
    raw = rng.integers(0, 256, size=(rows, supers, 144), dtype=np.uint8)
    halves = rng.uniform(0.001, 0.01, size=(rows, supers, 2)).astype(np.float16)
    raw[..., :4] = halves.view(np.uint8).reshape(rows, supers, 4)
    raw = raw.reshape(rows, supers * 144)
    got = _DECODE["Q4_K"](raw)
    want = torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q4_K).reshape(rows, -1).astype(np.float32))
    torch.testing.assert_close(got.dequantize(), want, atol=2e-3 * float(want.abs().max()), rtol=2e-3)


def test_default_model_blocks_are_its_float_weights(model_files):
    """The default GGUF's Q4_1 layers and Q8_0 embedding, taken as stored, dequantize to exactly the weights the
    float conversion wrote (including llama.cpp's q/k row order put back)."""
    from safetensors import safe_open

    from strata.engine.weights.gguf_blocks import read_blocks

    names = {"model.layers.3.self_attn.q_proj.weight": "int4", "model.layers.3.self_attn.k_proj.weight": "int4",
             "model.layers.3.mlp.down_proj.weight": "int4", "model.embed_tokens.weight": "int8"}
    blocks = read_blocks(model_files.gguf, names)
    assert set(blocks) == set(names)
    with safe_open(str(model_files.directory / "model.safetensors"), "pt") as f:
        for name, q in blocks.items():
            assert q.format == names[name]
            torch.testing.assert_close(q.dequantize(), f.get_tensor(name), atol=0, rtol=0)


# ---- fused layer steps ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_fused_steps_are_their_references(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    tol = {"atol": 2e-5, "rtol": 2e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    x = torch.randn(rows, 96, generator=gen).to(dtype)
    w = (torch.rand(96, generator=gen) + 0.5).to(dtype)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), layer_steps.rms_norm(x, w, 1e-5), **tol)
    delta = torch.randn(rows, 96, generator=gen).to(dtype)
    x1, x2 = x.clone(), x.clone()
    torch.testing.assert_close(ops.add_rms_norm(x1, delta, w, 1e-5), layer_steps.add_rms_norm(x2, delta, w, 1e-5),
                               **tol)
    torch.testing.assert_close(x1, x2, **tol)  # the residual stream, updated in place
    gate_up = torch.randn(rows, 2 * 48, generator=gen).to(dtype) * 4
    torch.testing.assert_close(ops.silu_mul(gate_up), layer_steps.silu_mul(gate_up), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_store_kv_is_its_reference(dtype):
    from strata.kernels.rotary import rope_cos_sin, rope_inv_freq

    heads, kv_heads, d, rows = 6, 2, 32, 5
    gen = torch.Generator().manual_seed(9)
    cos_sin = rope_cos_sin(rope_inv_freq(d, 10000.0, None), 64, dtype)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, generator=gen).to(dtype)
    positions = torch.tensor([0, 3, 17, 63, 5])
    slots = torch.tensor([4, -1, 30, 2, 9])  # -1: this row's layer stores nothing
    caches = [torch.full((4, 8, kv_heads, d), float("nan"), dtype=dtype) for _ in range(4)]
    want = layer_steps.rotary_store_kv(qkv, cos_sin, positions, slots, caches[0], caches[1], heads)
    got = ops.rotary_store_kv(qkv, cos_sin, positions, slots, caches[2], caches[3], heads)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(caches[2], caches[0], equal_nan=True, **tol)
    torch.testing.assert_close(caches[3], caches[1], equal_nan=True, **tol)
    with pytest.raises(RuntimeError):  # an index outside the cache is refused, never written
        ops.rotary_store_kv(qkv, cos_sin, positions, slots + 1000, caches[2], caches[3], heads)


def test_reference_runs_without_the_kernel():
    """A QuantizedWeight that was not packed (a GPU, no compiler) runs the reference."""
    q = quantize(weight(8, 64, seed=10), "int8")
    x = torch.randn(2, 64)
    assert isinstance(q, QuantizedWeight)
    torch.testing.assert_close(ops.quantized_linear(x, q), quantized.reference_linear(x, q))
