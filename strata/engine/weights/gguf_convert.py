"""Convert a GGUF file once into a Hugging Face style directory (the families of registry.py that have one).

The directory (config.json, model.safetensors, tokenizer files) is what strata
loads; the conversion dequantizes every tensor with the `gguf` package, undoes
llama.cpp's rotary permutation of the q/k projections (Llama-arch files), and
Gemma 3's norms back to transformers' `w` of `(1 + w)` (llama.cpp stores `1 + w`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from strata.engine.models.registry import UnsupportedModel, family_of_gguf

log = logging.getLogger(__name__)

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 3 names its four norms per layer differently (ffn_norm is the norm before the MLP there).
_GEMMA3_NAMES = {**_LAYER_NAMES, "ffn_norm": "pre_feedforward_layernorm",
                 "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
# Phi-3 keeps its fused projections (ffn_up is gate and up, as Hugging Face's gate_up_proj).
_PHI3_NAMES = {**_LAYER_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_name(name: str, arch: str = "llama") -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    names = {"gemma3": _GEMMA3_NAMES, "phi3": _PHI3_NAMES}.get(arch, _LAYER_NAMES)
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"
    return None


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation (interleaved -> half-split rotary layout)."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def gguf_config(reader: Any) -> dict[str, Any]:
    arch = gguf_field(reader, "general.architecture")
    family = family_of_gguf(arch)  # UnsupportedModel for anything strata does not serve
    p = f"{arch}."
    heads = int(gguf_field(reader, p + "attention.head_count"))
    hidden = int(gguf_field(reader, p + "embedding_length"))
    names = {t.name for t in reader.tensors}
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    cfg: dict[str, Any] = {
        "architectures": [family.architectures[family.gguf.index(arch)]],
        "model_type": family.model_types[family.gguf.index(arch)],
        "vocab_size": int(gguf_field(reader, p + "vocab_size", len(tokens) if tokens else 0)),
        "hidden_size": hidden,
        "intermediate_size": int(gguf_field(reader, p + "feed_forward_length")),
        "num_hidden_layers": int(gguf_field(reader, p + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(gguf_field(reader, p + "attention.head_count_kv", heads)),
        "head_dim": int(gguf_field(reader, p + "rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(gguf_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(gguf_field(reader, p + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(gguf_field(reader, p + "context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    window = gguf_field(reader, p + "attention.sliding_window")
    if window:  # Mistral's (every layer); Gemma 3's below names its layers
        cfg["sliding_window"] = int(window)
    if family.gemma:
        head_dim = int(gguf_field(reader, p + "attention.key_length", hidden // heads))
        layers = cfg["num_hidden_layers"]
        cfg.update({
            "head_dim": head_dim,
            "query_pre_attn_scalar": head_dim,  # what llama.cpp uses for these sizes
            "hidden_activation": "gelu_pytorch_tanh",
            "rope_local_base_freq": 10000.0,  # llama.cpp's fixed base of Gemma 3's local layers
            "sliding_window": int(window) if window else None,
            # every sixth layer is global, as llama.cpp's swa pattern for Gemma 3
            "layer_types": ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)],
        })
    factor = gguf_field(reader, p + "rope.scaling.factor")
    if factor is not None and gguf_field(reader, p + "rope.scaling.type") not in (None, "none"):
        cfg["rope_scaling"] = {"rope_type": gguf_field(reader, p + "rope.scaling.type"), "factor": float(factor)}
    factors = {t.name: t for t in reader.tensors if t.name.startswith(("rope_freqs", "rope_factors"))}
    if "rope_freqs.weight" in factors:  # Llama 3.1+: llama.cpp writes the llama3 scaling as one divisor per pair
        cfg["rope_scaling"] = {"rope_type": "frequency_factors", "factors": _floats(factors["rope_freqs.weight"])}
    if family.fused_projections:  # Phi-3: head_dim from the width, rope.dimension_count is the rotated part
        head_dim = hidden // heads
        cfg["head_dim"] = head_dim
        rotary = int(gguf_field(reader, p + "rope.dimension_count", head_dim))
        cfg["partial_rotary_factor"] = rotary / head_dim
        if "rope_factors_long.weight" in factors:
            original = int(gguf_field(reader, p + "rope.scaling.original_context_length"))
            cfg["original_max_position_embeddings"] = original
            cfg["rope_scaling"] = {
                "rope_type": "longrope", "original_max_position_embeddings": original,
                "long_factor": _floats(factors["rope_factors_long.weight"]),
                "short_factor": _floats(factors["rope_factors_short.weight"]),
                "attention_factor": float(gguf_field(reader, p + "rope.scaling.attn_factor", 1.0))}
    elif factors.keys() - {"rope_freqs.weight"}:
        raise UnsupportedModel(f"{arch}: rope factor tensors {sorted(factors)} are not supported for this family")
    return cfg


def _floats(tensor: Any) -> list[float]:
    return [float(x) for x in np.asarray(tensor.data, dtype=np.float32).reshape(-1)]


def convert_gguf(gguf_path: Path, out_dir: Path, marker: dict[str, str]) -> None:
    """Write `out_dir` atomically: a half-written conversion is never picked up."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(gguf_path))
    cfg = gguf_config(reader)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    tensors: dict[str, torch.Tensor] = {}
    arch = gguf_field(reader, "general.architecture")
    for t in tqdm(reader.tensors, desc=f"converting {gguf_path.name}", unit="tensor"):
        name = hf_name(t.name, arch)
        if name is None:
            log.warning("skipping unknown GGUF tensor %s", t.name)
            continue
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        # llama.cpp permutes q/k of llama-arch models only; qwen2 and qwen3 keep the HF layout.
        if arch in ("llama", "mistral") and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute(w, cfg["num_attention_heads"])
        elif arch in ("llama", "mistral") and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute(w, cfg["num_key_value_heads"])
        if arch == "gemma3" and t.name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's (1 + w)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w))
    save_file(tensors, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / "generation_config.json").write_text(
        json.dumps({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, indent=2)
    )
    _convert_tokenizer(gguf_path, reader, tmp)
    (tmp / "strata.json").write_text(json.dumps(marker))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def _convert_tokenizer(gguf_path: Path, reader: Any, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    log.info("converting the GGUF tokenizer (once)")
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out_dir))
    template = gguf_field(reader, "tokenizer.chat_template")
    tok_cfg_path = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.exists() else {}
    if template and not tok_cfg.get("chat_template"):
        tok_cfg["chat_template"] = template
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2))
