"""The Llama family (Llama 2/3, SmolLM, Mistral; Qwen2's biases, Qwen3's q/k norms, Gemma 3's layer, Phi-3's
partial rotary: see registry.py and layouts.py) over a paged KV cache.

Tokens of all sequences in a step are flattened into one [T, hidden] batch:
projections and MLPs run once on all rows, attention runs per prefill slice
and once, batched, for all decode rows. An optional SkipPlan (AdaSkip) lets
some rows skip a layer's attention or FFN sublayer: those rows only scale
their residual stream, and a skipped attention computes and stores no K/V.

Linear weights are float or block-quantized (strata.engine.weights.quantization
decides which); the element-wise steps between them (norms, rotary and the KV
store, the gated activation) are fused kernels (strata.kernels.ops).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from strata.engine.models.attention_batch import AttentionBatch, LayerSkip, SkipPlan, SublayerStats
from strata.engine.models.config import ModelConfig
from strata.engine.models.layouts import to_llama_layout
from strata.engine.weights.quantization import Weights, load_weights
from strata.kernels.device import default_device
from strata.kernels.linear import Linear
from strata.kernels.ops import (
    add_rms_norm,
    paged_decode_attention,
    prefill_attention,
    prepare,
    rms_norm,
    rotary_store_kv,
    silu_mul,
)
from strata.kernels.paged_attention import gather_kv
from strata.kernels.rotary import rope_attention_factor, rope_cos_sin, rope_inv_freq


class LlamaLayer:
    def __init__(self, w: Weights, prefix: str, cfg: ModelConfig) -> None:
        def norm(name: str) -> torch.Tensor:  # Gemma stores w of (1 + w): the one norm kernel then serves all
            t = w.tensor(prefix + name)
            return t + 1 if cfg.gemma else t

        a = prefix + "self_attn."
        qkv_bias = w.cat([a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"]) if cfg.attention_bias else None
        self.qkv = Linear(w.cat([a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"]), qkv_bias)
        self.o = Linear(w[a + "o_proj.weight"])
        m = prefix + "mlp."
        self.gate_up = Linear(w.cat([m + "gate_proj.weight", m + "up_proj.weight"]))
        self.down = Linear(w[m + "down_proj.weight"])
        self.attn_norm = norm("input_layernorm.weight")
        # Gemma 3 norms each sublayer's output too, and names its norm before the MLP pre_feedforward_layernorm.
        self.mlp_norm = norm("pre_feedforward_layernorm.weight" if cfg.gemma else "post_attention_layernorm.weight")
        self.post_attn_norm = norm("post_attention_layernorm.weight") if cfg.gemma else None
        self.post_mlp_norm = norm("post_feedforward_layernorm.weight") if cfg.gemma else None
        # Qwen3, Gemma 3: each head's q and k are RMS-normalized (over head_dim) before RoPE.
        self.q_norm = norm("self_attn.q_norm.weight") if cfg.qk_norm else None
        self.k_norm = norm("self_attn.k_norm.weight") if cfg.qk_norm else None


class LlamaModel:
    def __init__(self, cfg: ModelConfig, w: Weights, dtype: torch.dtype, device: torch.device | str = "cpu",
                 context_len: int | None = None) -> None:
        """`context_len`: the longest sequence served (default: the model's); LongRoPE's long factors are
        used when it is beyond the pretraining length (as llama.cpp decides by its context size)."""
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        prepare(self.device)  # on a GPU: build or load the kernels now, log the attention backends
        self.embed = w["model.embed_tokens.weight"]  # a quantized table when it is the (quantized) LM head too
        self.lm_head = Linear(self.embed if cfg.tie_word_embeddings else w["lm_head.weight"])
        self.norm = w.tensor("model.norm.weight") + (1 if cfg.gemma else 0)
        self.embed_scale = cfg.hidden_size**0.5 if cfg.gemma else None  # Gemma scales its embeddings
        self.layers = [LlamaLayer(w, f"model.layers.{i}.", cfg) for i in range(cfg.num_hidden_layers)]
        scaling = cfg.rope_scaling or {}
        long_context = (context_len or cfg.max_position_embeddings) > int(
            scaling.get("original_max_position_embeddings") or cfg.max_position_embeddings)
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rotary_dim, long_context)
        self.cos_sin = rope_cos_sin(self.inv_freq, cfg.max_position_embeddings, dtype,
                                    rope_attention_factor(cfg.rope_scaling, cfg.max_position_embeddings)
                                    ).to(self.device)
        # Gemma 3's sliding-window layers rotate with a base of their own.
        self.cos_sin_local = (rope_cos_sin(rope_inv_freq(cfg.head_dim, cfg.local_rope_theta, None),
                                           cfg.max_position_embeddings, dtype).to(self.device)
                              if cfg.local_rope_theta is not None else None)
        # A layer without RoPE (SmolLM3) goes through the same fused kernel with the identity rotation.
        self.cos_sin_none = (torch.stack([torch.ones_like(self.cos_sin[:, 0]), torch.zeros_like(self.cos_sin[:, 1])],
                                         dim=1) if cfg.rope_layers is not None else None)
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim**-0.5
        self.q_size = cfg.num_attention_heads * cfg.head_dim
        self.kv_size = cfg.num_key_value_heads * cfg.head_dim
        self.quantization = w.quantization
        self.weight_bytes_per_token = sum(  # what one decode step reads: every linear weight once
            lin.nbytes for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)
        ) + self.lm_head.nbytes

    @classmethod
    def load(cls, model_dir: Path, dtype: torch.dtype, device: torch.device | str | None = None,
             quantization: str = "none", gguf: Path | None = None, context_len: int | None = None) -> LlamaModel:
        """Weights onto `device` (default: STRATA_DEVICE, see strata.kernels.device), their linear layers
        quantized as `quantization` says (strata.engine.weights.quantization; blocks of `gguf` where exact)."""
        cfg = ModelConfig.from_dir(model_dir)
        device = torch.device(device if device is not None else default_device())
        weights = load_weights(model_dir, dtype, device, quantization, gguf, cfg.tie_word_embeddings,
                               lambda tensors: to_llama_layout(tensors, cfg))
        return cls(cfg, weights, dtype, device, context_len)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed[input_ids] if isinstance(self.embed, torch.Tensor) else self.embed.rows(input_ids).dequantize(
            self.dtype)
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)  # in the model dtype, as transformers does
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        kv_cache: torch.Tensor,
        skip: SkipPlan | None = None,
        before_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T]; kv_cache: the block pool [2, blocks, block_size, kv_heads, d] that
        every layer shares, each through its own slots and block tables in `batch`.

        `skip` None runs every sublayer on every row (the plain path below, untouched).
        `before_layer(i)` runs before layer i reads the cache: it waits for history KV still loading.
        """
        cfg = self.cfg
        if input_ids.device != self.device:  # the runner builds its index tensors in host memory
            input_ids, positions, batch = input_ids.to(self.device), positions.to(self.device), batch.to(self.device)
            skip = skip.to(self.device) if skip is not None else None
        x = self.embed_tokens(input_ids)
        kv = kv_cache.unbind(0)  # (K, V), split once
        if skip is not None:
            return self._forward_skipping(x, positions, batch, kv, skip, before_layer)
        eps = cfg.rms_norm_eps
        if cfg.gemma:
            return self._forward_gemma(x, positions, batch, kv, before_layer)
        h = rms_norm(x, self.layers[0].attn_norm, eps)
        # x is the residual stream; each add_rms_norm adds a sublayer's output to it and normalizes for the next.
        for i, layer in enumerate(self.layers):
            if before_layer is not None:
                before_layer(i)
            h = add_rms_norm(x, self._attention(h, layer, i, positions, batch, kv), layer.mlp_norm, eps)
            next_norm = self.layers[i + 1].attn_norm if i + 1 < len(self.layers) else self.norm
            h = add_rms_norm(x, self._mlp(h, layer), next_norm, eps)
        return h

    def _forward_gemma(self, x: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                       kv: tuple[torch.Tensor, ...], before_layer: Callable[[int], None] | None) -> torch.Tensor:
        """Gemma 3's layer: each sublayer's input and output normalized, the output added to the stream."""
        eps = self.cfg.rms_norm_eps
        for i, layer in enumerate(self.layers):
            if before_layer is not None:
                before_layer(i)
            assert layer.post_attn_norm is not None and layer.post_mlp_norm is not None
            a = self._attention(rms_norm(x, layer.attn_norm, eps), layer, i, positions, batch, kv)
            x = x + rms_norm(a, layer.post_attn_norm, eps)
            m = self._mlp(rms_norm(x, layer.mlp_norm, eps), layer)
            x = x + rms_norm(m, layer.post_mlp_norm, eps)
        return rms_norm(x, self.norm, eps)

    def _forward_skipping(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        kv: tuple[torch.Tensor, ...],
        skip: SkipPlan,
        before_layer: Callable[[int], None] | None,
    ) -> torch.Tensor:
        cfg = self.cfg
        sub_batches: dict[int, AttentionBatch] = {}  # plans share row tensors across layers
        for i, layer in enumerate(self.layers):
            if before_layer is not None:
                before_layer(i)
            ls = skip.layers[i]
            x_in = x
            if ls.attn_rows is None:
                h = rms_norm(x, layer.attn_norm, cfg.rms_norm_eps)
                x = x + self._attention(h, layer, i, positions, batch, kv)
            else:
                assert ls.attn_scale is not None
                rows = ls.attn_rows
                x = x * ls.attn_scale.unsqueeze(1)
                if rows.numel():
                    if id(rows) not in sub_batches:
                        sub_batches[id(rows)] = batch.select(rows)
                    xr = x_in[rows]
                    h = rms_norm(xr, layer.attn_norm, cfg.rms_norm_eps)
                    x[rows] = xr + self._attention(h, layer, i, positions[rows], sub_batches[id(rows)], kv)
            a = x
            if ls.ffn_rows is None:
                x = x + self._mlp(rms_norm(x, layer.mlp_norm, cfg.rms_norm_eps), layer)
            else:
                assert ls.ffn_scale is not None
                rows = ls.ffn_rows
                x = x * ls.ffn_scale.unsqueeze(1)
                if rows.numel():
                    ar = a[rows]
                    x[rows] = ar + self._mlp(rms_norm(ar, layer.mlp_norm, cfg.rms_norm_eps), layer)
            if skip.measure_rows is not None:
                skip.stats.append(self._io_stats(x_in, a, x, ls, skip.measure_rows).to(torch.device("cpu")))
        return rms_norm(x, self.norm, cfg.rms_norm_eps)

    def _mlp(self, h: torch.Tensor, layer: LlamaLayer) -> torch.Tensor:
        if self.cfg.gemma:  # GeLU (tanh approximation) gate
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            return layer.down(torch.nn.functional.gelu(gate, approximate="tanh") * up)
        return layer.down(silu_mul(layer.gate_up(h)))

    @staticmethod
    def _io_stats(
        x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ls: LayerSkip, rows: torch.Tensor
    ) -> SublayerStats:
        """Per-row cosine and norm ratio across each sublayer, in float32; NaN for skipped rows."""
        x, a, b = x[rows].float(), a[rows].float(), b[rows].float()
        nx, na, nb = x.norm(dim=-1), a.norm(dim=-1), b.norm(dim=-1)
        stats = SublayerStats(
            sim_attn=(x * a).sum(-1) / (nx * na),
            scale_attn=na / nx,
            sim_ffn=(a * b).sum(-1) / (na * nb),
            scale_ffn=nb / na,
        )
        for run, sim, scale in ((ls.attn_rows, stats.sim_attn, stats.scale_attn),
                                (ls.ffn_rows, stats.sim_ffn, stats.scale_ffn)):
            if run is not None:
                skipped = ~torch.isin(rows, run)
                sim[skipped] = float("nan")
                scale[skipped] = float("nan")
        return stats

    def _qk_norm(self, qkv: torch.Tensor, layer: LlamaLayer) -> torch.Tensor:
        assert layer.q_norm is not None and layer.k_norm is not None
        t, d, eps = qkv.shape[0], self.cfg.head_dim, self.cfg.rms_norm_eps
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = rms_norm(q.reshape(-1, d), layer.q_norm, eps).view(t, self.q_size)
        k = rms_norm(k.reshape(-1, d), layer.k_norm, eps).view(t, self.kv_size)
        return torch.cat([q, k, v], dim=-1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float().cpu()  # sampling runs on the host (a no-op on CPU)

    def _attention(
        self,
        h: torch.Tensor,
        layer: LlamaLayer,
        index: int,
        positions: torch.Tensor,
        batch: AttentionBatch,
        kv: tuple[torch.Tensor, ...],
    ) -> torch.Tensor:
        k_cache, v_cache = kv
        t = h.shape[0]
        slots = batch.layer_slots[index]
        qkv = layer.qkv(h)
        if layer.q_norm is not None:
            qkv = self._qk_norm(qkv, layer)
        rope = self.cfg.rope_layers
        cos_sin = self.cos_sin if rope is None or rope[index] else self.cos_sin_none
        if self.cos_sin_local is not None and self.cfg.layer_windows and self.cfg.layer_windows[index] is not None:
            cos_sin = self.cos_sin_local
        assert cos_sin is not None
        q = rotary_store_kv(qkv, cos_sin, positions, slots, k_cache, v_cache, self.cfg.num_attention_heads)
        window = self.cfg.layer_windows[index] if self.cfg.layer_windows is not None else None
        if batch.decode_only:
            out = paged_decode_attention(q, k_cache, v_cache, batch.layer_block_tables[index],
                                         batch.decode_context_lens, self.scale, window=window)
            return layer.o(out.view(t, self.q_size))
        out = torch.empty_like(q)
        for p in batch.prefills:
            # The slice's keys and values, its history's and its own, as the cache now holds them.
            context = slots[p.start : p.end] if p.context_slots is None else p.context_slots[index]
            ks, vs = gather_kv(k_cache, context), gather_kv(v_cache, context)
            out[p.start : p.end] = prefill_attention(q[p.start : p.end], ks, vs, self.scale, window)
        if batch.decode_rows.numel():
            rows = batch.decode_rows
            out[rows] = paged_decode_attention(q[rows], k_cache, v_cache, batch.decode_block_tables[index],
                                               batch.decode_context_lens, self.scale, window=window)
        return layer.o(out.view(t, self.q_size))
