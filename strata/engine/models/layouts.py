"""A checkpoint's tensors brought to the one layout LlamaModel reads (Hugging Face Llama names, half-split RoPE).

- Fused projections (Phi-3/Phi-4-mini): ``qkv_proj`` is split into q, k and v, ``gate_up_proj`` into gate
  and up (the model fuses them again, its own way).
- Partial rotary (Phi-4-mini rotates 96 of 128 dims): each head of q and k is reordered as
  [rotated first half, passed first half, rotated second half, passed second half], so the one full-head
  half-split rotation pairs the rotated dims as the model does and leaves the passed ones alone (their
  frequency is 0, see kernels/rotary.py). q and k move together, so every q.k, and the output, is unchanged;
  only the stored keys are in this order.
"""

from __future__ import annotations

import torch

from strata.engine.models.config import ModelConfig


def to_llama_layout(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    q_size, kv_size = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    for i in range(cfg.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        if cfg.fused_projections:
            for kind in ("weight", "bias"):
                fused = out.pop(f"{a}qkv_proj.{kind}", None)
                if fused is not None:
                    for name, part in zip("qkv", fused.split([q_size, kv_size, kv_size]), strict=True):
                        out[f"{a}{name}_proj.{kind}"] = part
            gate, up = out.pop(f"{m}gate_up_proj.weight").chunk(2)
            out[f"{m}gate_proj.weight"], out[f"{m}up_proj.weight"] = gate, up
        if cfg.rotary_dim is not None and cfg.rotary_dim < cfg.head_dim:
            order = rotary_order(cfg.head_dim, cfg.rotary_dim)
            for name, heads in (("q_proj", cfg.num_attention_heads), ("k_proj", cfg.num_key_value_heads)):
                for kind in ("weight", "bias"):
                    key = f"{a}{name}.{kind}"
                    if key in out:
                        t = out[key]
                        out[key] = t.reshape(heads, cfg.head_dim, *t.shape[1:])[:, order].reshape(t.shape)
    return out


def rotary_order(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Per head, the source dim of each dim of the half-split layout (see the module docstring)."""
    r, p = rotary_dim // 2, (head_dim - rotary_dim) // 2
    dims = torch.arange(head_dim)
    return torch.cat([dims[:r], dims[2 * r : 2 * r + p], dims[r : 2 * r], dims[2 * r + p :]])
