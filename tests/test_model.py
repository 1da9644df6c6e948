"""Our Llama implementation against transformers' LlamaForCausalLM on the same weights."""

from __future__ import annotations

import json

import pytest
import torch

from strata.engine.models.attention_batch import AttentionBatch, PrefillSlice
from strata.engine.models.llama import LlamaModel
from strata.kernels.paged_attention import paged_decode_attention, prefill_attention, write_kv

EMPTY = torch.zeros(0, dtype=torch.long)


def contiguous_logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    """One prefill of the whole sequence into a fresh cache; logits at every position."""
    cfg = model.cfg
    n = len(ids)
    block = 16
    layers, blocks = cfg.num_hidden_layers, -(-n // block)
    kv = torch.zeros(2, layers * blocks, block, cfg.num_key_value_heads, cfg.head_dim, dtype=model.dtype)
    slots = torch.arange(layers)[:, None] * blocks * block + torch.arange(n)  # layer l owns blocks l * blocks..
    batch = AttentionBatch(slots, [PrefillSlice(0, n, 0, None)], EMPTY,
                           torch.zeros(layers, 0, 1, dtype=torch.long), EMPTY)
    with torch.inference_mode():
        return model.logits(model.forward(torch.tensor(ids), torch.arange(n), batch, kv))


def paged_logits(model: LlamaModel, ids: list[int], chunk: int) -> torch.Tensor:
    """The same sequence in prefill chunks and then single-token decode steps, over shuffled blocks that
    differ per layer."""
    cfg = model.cfg
    n, block, layers = len(ids), 4, cfg.num_hidden_layers
    used = -(-n // block)
    num_blocks = layers * (used + 3)
    kv = torch.zeros(2, num_blocks, block, cfg.num_key_value_heads, cfg.head_dim, dtype=model.dtype)
    table = torch.randperm(num_blocks)[: layers * used].view(layers, used)
    out = []
    pos = 0
    with torch.inference_mode():
        while pos < n:
            step = chunk if pos < n // 2 else 1
            end = min(n, pos + step)
            p = torch.arange(pos, end)
            slots = table[:, p // block] * block + p % block
            if end - pos == 1:
                batch = AttentionBatch(slots, [], torch.tensor([0]), table[:, None], torch.tensor([end]))
            else:
                allp = torch.arange(0, end)
                ctx = table[:, allp // block] * block + allp % block if pos else None
                batch = AttentionBatch(slots, [PrefillSlice(0, end - pos, pos, ctx)], EMPTY,
                                       torch.zeros(layers, 0, 1, dtype=torch.long), EMPTY)
            out.append(model.logits(model.forward(torch.tensor(ids[pos:end]), p, batch, kv)))
            pos = end
    return torch.cat(out)


IDS = [1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 198, 28, 1000, 2000, 3000, 17, 42, 99, 5000, 7, 8, 9, 10]


def test_logits_match_transformers(model_files, hf_model):
    ours = contiguous_logits(LlamaModel.load(model_files.directory, torch.float32), IDS)
    with torch.no_grad():
        ref = hf_model(torch.tensor([IDS])).logits[0]
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_gguf_conversion_matches_transformers_gguf_loader(model_files):
    """transformers reads the GGUF itself (its own dequantization and q/k un-permutation)."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    from strata.engine.weights.model_files import default_gguf

    gguf = default_gguf()
    ref_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model(torch.tensor([IDS])).logits[0]
    ours = contiguous_logits(LlamaModel.load(model_files.directory, torch.float32), IDS)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def test_paged_chunked_matches_contiguous(model_files):
    model = LlamaModel.load(model_files.directory, torch.float32)
    torch.manual_seed(0)
    ids = torch.randint(3, 40000, (45,)).tolist()
    ref = contiguous_logits(model, ids)
    paged = paged_logits(model, ids, chunk=7)
    torch.testing.assert_close(paged, ref, atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random tiny Llama with q/k/v bias, untied embeddings and llama3 rope scaling."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=5000.0,
        attention_bias=True, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    )
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # biases start at zero: make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    d = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(str(d), safe_serialization=True)
    assert not json.loads((d / "config.json").read_text())["tie_word_embeddings"]
    return d, model


def test_tiny_random_config_matches_transformers(tiny_dir):
    d, hf = tiny_dir
    ours = LlamaModel.load(d, torch.float32)
    assert ours.cfg.attention_bias and not ours.cfg.tie_word_embeddings
    torch.manual_seed(2)
    ids = torch.randint(0, 300, (150,)).tolist()  # past original_max_position_embeddings: scaling matters
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(contiguous_logits(ours, ids), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(paged_logits(ours, ids, chunk=13), ref, atol=1e-4, rtol=1e-4)


def test_paged_decode_attention_matches_naive():
    torch.manual_seed(3)
    heads, kv_heads, d, block, nblocks = 6, 2, 16, 4, 20
    k_cache = torch.zeros(nblocks, block, kv_heads, d)
    v_cache = torch.zeros(nblocks, block, kv_heads, d)
    lens = [5, 13, 1]
    tables = torch.zeros(3, 4, dtype=torch.long)
    perm = torch.randperm(nblocks)
    keys, vals = [], []
    used = 0
    for i, n in enumerate(lens):
        nb = -(-n // block)
        tables[i, :nb] = perm[used : used + nb]
        used += nb
        k, v = torch.randn(n, kv_heads, d), torch.randn(n, kv_heads, d)
        p = torch.arange(n)
        write_kv(k_cache, v_cache, k, v, tables[i, p // block] * block + p % block)
        keys.append(k)
        vals.append(v)
    q = torch.randn(3, heads, d)
    out = paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor(lens), d**-0.5)
    for i in range(3):
        k = keys[i].repeat_interleave(heads // kv_heads, dim=1)
        v = vals[i].repeat_interleave(heads // kv_heads, dim=1)
        att = torch.softmax(torch.einsum("hd,nhd->hn", q[i], k) * d**-0.5, dim=-1)
        torch.testing.assert_close(out[i], torch.einsum("hn,nhd->hd", att, v), atol=1e-5, rtol=1e-5)
    # prefill with history: the last query row equals the decode result
    n = lens[1]
    full = prefill_attention(q[1:2], keys[1], vals[1], d**-0.5)
    torch.testing.assert_close(full[0], out[1], atol=1e-5, rtol=1e-5)
