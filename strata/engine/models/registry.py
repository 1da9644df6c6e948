"""Which model families strata serves, and how a checkpoint is told to be one of them.

A family is a short description of how it differs from the Llama layer (``LlamaModel`` reads it from its
ModelConfig): today the Llama family itself (Llama 2/3.x with their rope scaling, SmolLM/SmolLM2, Mistral
without a sliding window), Qwen2 (q/k/v biases), Qwen3 (an RMSNorm on each head's q and k before RoPE, an
explicit head_dim), SmolLM3 (no RoPE on every fourth layer) and Gemma 3 (text: sliding-window local layers
with their own rope base, q/k norms, four norms per layer with (1 + w) weights, scaled embeddings, GeLU-tanh,
query_pre_attn_scalar) and Phi-3/Phi-4-mini (fused qkv and gate_up projections, partial rotary, LongRoPE).
Sliding windows are applied in attention (each layer reads only its window), and
what a window no longer covers leaves the device pool and the tiers (docs/models.md).
The architecture comes from config.json (``architectures``, else ``model_type``) or a GGUF file's
``general.architecture``; anything else is refused before the server starts, with a message that names it
and the supported list (see docs/models.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class UnsupportedModel(ValueError):
    """A checkpoint of a family strata does not serve (or a feature of one it does not implement yet)."""


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]  # config.json "architectures"
    model_types: tuple[str, ...]  # config.json "model_type"
    gguf: tuple[str, ...]  # GGUF "general.architecture"
    attention_bias: bool = False  # q/k/v projections carry biases (whatever the config says)
    qk_norm: bool = False  # RMSNorm over each head of q and k, before RoPE
    nope_layers: bool = False  # some layers apply no RoPE (config no_rope_layers / no_rope_layer_interval)
    sliding_window: bool = False  # honours config sliding_window (every layer, or those layer_types names)
    gemma: bool = False  # Gemma 3's layer: (1 + w) norms around each sublayer, scaled embeddings, GeLU-tanh
    fused_projections: bool = False  # Phi-3: one qkv_proj and one gate_up_proj tensor (split at load)


FAMILIES = (
    Family("llama", ("LlamaForCausalLM", "MistralForCausalLM"), ("llama", "mistral"), ("llama", "mistral"),
           sliding_window=True),
    Family("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), ("qwen2",), attention_bias=True),
    Family("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), ("qwen3",), qk_norm=True),
    Family("smollm3", ("SmolLM3ForCausalLM",), ("smollm3",), (), nope_layers=True),
    Family("phi3", ("Phi3ForCausalLM",), ("phi3",), ("phi3",), sliding_window=True, fused_projections=True),
    Family("gemma3", ("Gemma3ForCausalLM",), ("gemma3_text",), ("gemma3",), qk_norm=True, sliding_window=True,
           gemma=True),
)


def supported() -> str:
    return ", ".join(a for f in FAMILIES for a in f.architectures)


def family_of_config(cfg: dict[str, Any]) -> Family:
    """The family of a Hugging Face config.json; UnsupportedModel when strata does not serve it."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    for family in FAMILIES:
        if any(a in family.architectures for a in archs) or (not archs and model_type in family.model_types):
            _check_features(family, cfg)
            return family
    named = ", ".join(archs) or (f"model_type {model_type!r}" if model_type else "no architecture at all")
    raise UnsupportedModel(f"unsupported model architecture: {named}. strata serves: {supported()}")


def family_of_gguf(arch: str | None) -> Family:
    for family in FAMILIES:
        if arch in family.gguf:
            return family
    raise UnsupportedModel(f"unsupported GGUF architecture {arch!r}. strata serves: "
                           f"{', '.join(g for f in FAMILIES for g in f.gguf)}")


def _check_features(family: Family, cfg: dict[str, Any]) -> None:
    """Refuse what a known family's checkpoint asks for that is not implemented (never serve it silently)."""
    if layer_windows({**cfg, "num_hidden_layers": cfg.get("num_hidden_layers", 0)}) and not family.sliding_window:
        raise UnsupportedModel(f"{family.name}: sliding-window attention (window {cfg.get('sliding_window')}) is "
                               "not supported for this family yet")
    if family.gemma and cfg.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UnsupportedModel(f"{family.name}: hidden_activation {cfg.get('hidden_activation')!r} is not supported")
    for name in ("final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention"):
        if cfg.get(name):
            raise UnsupportedModel(f"{family.name}: {name} is not supported")
    if (cfg.get("no_rope_layers") or cfg.get("no_rope_layer_interval")) and not family.nope_layers:
        raise UnsupportedModel(f"{family.name}: layers without RoPE are not supported for this family")


def layer_windows(cfg: dict[str, Any]) -> tuple[int | None, ...] | None:
    """Per layer, its sliding window (None: full attention), or None when no layer has one. A window at
    least the context length is no window."""
    window = cfg.get("sliding_window")
    n = int(cfg.get("num_hidden_layers") or 0)
    if (not window or not cfg.get("use_sliding_window", True)
            or window >= int(cfg.get("max_position_embeddings") or 0)):
        return None
    types = cfg.get("layer_types")
    if types:
        return tuple(int(window) if t == "sliding_attention" else None for t in types[:n])
    return (int(window),) * n


def rope_layers(family: Family, cfg: dict[str, Any]) -> tuple[bool, ...] | None:
    """Per layer, whether it applies RoPE (None: every layer does). SmolLM3: no_rope_layers[i] is 1 where
    layer i uses RoPE; without it, every ``no_rope_layer_interval``-th layer (4) goes without."""
    if not family.nope_layers:
        return None
    n = int(cfg["num_hidden_layers"])
    flags = cfg.get("no_rope_layers")
    if not flags:
        interval = int(cfg.get("no_rope_layer_interval") or 4)
        flags = [int((i + 1) % interval != 0) for i in range(n)]
    if len(flags) != n:
        raise UnsupportedModel(f"{family.name}: no_rope_layers has {len(flags)} entries for {n} layers")
    return tuple(bool(f) for f in flags)
