"""The families through GGUF: a random model of each family's real shape written as a GGUF file with the gguf
package (llama.cpp's tensor names and metadata, its q/k permutation for Llama-arch files), converted by strata,
gives transformers' log-probs on the original weights. The tokenizer fields come from the default model's file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from strata.engine.models.llama import LlamaModel
from strata.engine.weights.gguf_convert import convert_gguf, gguf_field
from strata.engine.weights.model_files import default_gguf
from strata.engine.weights.quality import log_probs
from strata.kernels.rotary import rope_inv_freq
from tests.test_model_families import qwen3_dir, random_dir

_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
          "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}  # Phi-3's fused ones
_TOKENIZER = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
              "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation (half-split -> interleaved rotary layout) for Llama-arch files."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir: Path, arch: str, out: Path) -> None:
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    writer = GGUFWriter(str(out), arch)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(cfg.get("rope_theta") or rope.get("rope_theta")))
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    partial = cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0
    writer.add_rope_dimension_count(int(head_dim * partial))
    if rope.get("rope_type") == "longrope":  # as llama.cpp writes Phi-3: factor tensors, original length
        original = cfg["original_max_position_embeddings"]
        writer.add_rope_scaling_orig_ctx_len(original)
        scale = cfg["max_position_embeddings"] / original
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
        writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
        writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    elif rope.get("rope_type") == "llama3":  # as llama.cpp writes Llama 3.1+: one divisor per frequency
        plain = rope_inv_freq(head_dim, rope["rope_theta"], None)
        writer.add_tensor("rope_freqs.weight", (plain / rope_inv_freq(head_dim, rope["rope_theta"], rope)).float()
                          .numpy())
    if cfg.get("sliding_window"):
        writer.add_sliding_window(cfg["sliding_window"])
    source = GGUFReader(str(default_gguf()))
    for key in _TOKENIZER:
        field = source.fields[key]
        value = gguf_field(source, key)
        if field.types[0] == GGUFValueType.ARRAY:
            writer.add_array(key, value)
        elif field.types[0] == GGUFValueType.STRING:
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, int(value))
    for name, t in load_file(str(hf_dir / "model.safetensors")).items():
        w = t.float().numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{_LAYER[module]}.{kind}"
            if arch in ("llama", "mistral") and module == "self_attn.q_proj":
                w = permute(w, cfg["num_attention_heads"])
            elif arch in ("llama", "mistral") and module == "self_attn.k_proj":
                w = permute(w, cfg["num_key_value_heads"])
        writer.add_tensor(gname, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.slow
@pytest.mark.parametrize(("name", "arch"), [("mistral-swa", "mistral"), ("qwen2", "qwen2"), ("qwen3", "qwen3"),
                                            ("phi4-mini", "phi3"), ("llama3-scaled", "llama")])
def test_a_family_through_gguf_matches_transformers(tmp_path, model_files, name, arch):
    from transformers import AutoModelForCausalLM

    hf_dir = qwen3_dir(tmp_path, model_files) if name == "qwen3" else random_dir(tmp_path, model_files, name)
    gguf_path = tmp_path / f"{name}.gguf"
    write_gguf(hf_dir, arch, gguf_path)
    converted = tmp_path / "converted"
    convert_gguf(gguf_path, converted, {"source": gguf_path.name})
    ids = [int(t) for t in torch.randint(3, 49152, (300,), generator=torch.Generator().manual_seed(4))]
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), dim=-1)
    model = LlamaModel.load(converted, torch.float32, "cpu")
    err = (log_probs(model, ids) - want).abs().max().item()
    assert err < 1e-3, f"max |log-prob difference| {err}"


@pytest.mark.slow
def test_a_gguf_of_another_architecture_is_refused_by_name(tmp_path, model_files):
    import subprocess
    import sys

    path = tmp_path / "falcon.gguf"
    write_gguf(random_dir(tmp_path, model_files, "qwen2"), "falcon", path)
    r = subprocess.run([sys.executable, "-m", "strata", "serve", "--model", str(path), "--port", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "falcon" in r.stderr and "qwen3" in r.stderr  # the architecture and what strata serves

