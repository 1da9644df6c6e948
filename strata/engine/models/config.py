"""The model shape strata needs, read from a Hugging Face config.json (its family: registry.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strata.engine.models.registry import family_of_config, layer_windows, rope_layers


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    family: str = "llama"
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    rope_layers: tuple[bool, ...] | None = None  # SmolLM3: per layer, whether it applies RoPE (None: all)
    layer_windows: tuple[int | None, ...] | None = None  # Mistral: per layer, its sliding window (None: none)
    local_rope_theta: float | None = None  # Gemma 3: the rope base of its sliding-window layers
    gemma: bool = False  # Gemma 3's layer (see registry.py)
    attn_scale: float | None = None  # Gemma 3: query_pre_attn_scalar ** -0.5 (None: head_dim ** -0.5)
    rotary_dim: int | None = None  # Phi-3/Phi-4: RoPE on the first rotary_dim dims of each head (None: all)
    fused_projections: bool = False  # Phi-3: qkv_proj and gate_up_proj (models/layouts.py splits them)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        family = family_of_config(cfg)  # UnsupportedModel for anything strata does not serve
        # Qwen2-style checkpoints carry q/k/v biases without saying attention_bias.
        bias = bool(cfg.get("attention_bias", False)) or family.attention_bias
        # transformers >= 5 writes `rope_parameters` (theta inside); older configs `rope_theta` + `rope_scaling`.
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        local_theta = None
        if "full_attention" in rope:  # per layer type (Gemma 3, transformers >= 5)
            local_theta = (rope.get("sliding_attention") or {}).get("rope_theta")
            rope = rope["full_attention"] or {}
        elif family.gemma:
            local_theta = cfg.get("rope_local_base_freq", 10000.0)
        theta = cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0
        scaling = rope if rope.get("rope_type", rope.get("type")) not in (None, "default") else None
        if scaling is not None and "original_max_position_embeddings" in cfg:  # Phi-3 keeps it outside
            scaling = {"original_max_position_embeddings": cfg["original_max_position_embeddings"], **scaling}
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        partial = float(cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bias,
            rope_scaling=scaling,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            family=family.name,
            qk_norm=family.qk_norm,
            rope_layers=rope_layers(family, cfg),
            layer_windows=layer_windows(cfg),
            local_rope_theta=float(local_theta) if family.gemma and local_theta else None,
            gemma=family.gemma,
            attn_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5 if family.gemma else None,
            rotary_dim=int(head_dim * partial) if partial < 1.0 else None,
            fused_projections=family.fused_projections,
        )

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        cfg = json.loads((model_dir / "config.json").read_text())
        gen = model_dir / "generation_config.json"
        if gen.exists():
            # generation_config's eos list is the one chat models stop on.
            gen_eos = json.loads(gen.read_text()).get("eos_token_id")
            if gen_eos is not None:
                cfg = {**cfg, "eos_token_id": gen_eos}
        return cls.from_dict(cfg)
