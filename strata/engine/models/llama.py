"""The Llama family (Llama 2/3, SmolLM, Mistral, Qwen2-style biases) over a paged KV cache.

Tokens of all sequences in a step are flattened into one [T, hidden] batch:
projections and MLPs run once on all rows, attention runs per prefill slice
and once, batched, for all decode rows. An optional SkipPlan (AdaSkip) lets
some rows skip a layer's attention or FFN sublayer: those rows only scale
their residual stream, and a skipped attention computes and stores no K/V.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from strata.engine.models.attention_batch import AttentionBatch, LayerSkip, SkipPlan, SublayerStats
from strata.engine.models.config import ModelConfig
from strata.kernels.device import default_device
from strata.kernels.linear import Linear
from strata.kernels.ops import paged_decode_attention, prefill_attention, prepare, write_kv
from strata.kernels.paged_attention import gather_kv
from strata.kernels.rotary import apply_rotary, rope_cos_sin, rope_inv_freq


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(var + eps)).to(x.dtype) * weight


class LlamaLayer:
    def __init__(self, w: dict[str, torch.Tensor], prefix: str, cfg: ModelConfig) -> None:
        a = prefix + "self_attn."
        qkv_bias = (
            torch.cat([w[a + "q_proj.bias"], w[a + "k_proj.bias"], w[a + "v_proj.bias"]])
            if cfg.attention_bias
            else None
        )
        self.qkv = Linear(torch.cat([w[a + "q_proj.weight"], w[a + "k_proj.weight"], w[a + "v_proj.weight"]]),
                          qkv_bias)
        self.o = Linear(w[a + "o_proj.weight"])
        m = prefix + "mlp."
        self.gate_up = Linear(torch.cat([w[m + "gate_proj.weight"], w[m + "up_proj.weight"]]))
        self.down = Linear(w[m + "down_proj.weight"])
        self.attn_norm = w[prefix + "input_layernorm.weight"]
        self.mlp_norm = w[prefix + "post_attention_layernorm.weight"]


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        prepare(self.device)  # on a GPU: build or load the kernels now, log the attention backends
        w = {k: v.to(device=self.device, dtype=dtype) for k, v in weights.items()}
        self.embed = w["model.embed_tokens.weight"]
        self.lm_head = Linear(self.embed if cfg.tie_word_embeddings else w["lm_head.weight"])
        self.norm = w["model.norm.weight"]
        self.layers = [LlamaLayer(w, f"model.layers.{i}.", cfg) for i in range(cfg.num_hidden_layers)]
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.cos_sin = rope_cos_sin(self.inv_freq, cfg.max_position_embeddings, dtype).to(self.device)
        self.scale = cfg.head_dim**-0.5
        self.q_size = cfg.num_attention_heads * cfg.head_dim
        self.kv_size = cfg.num_key_value_heads * cfg.head_dim

    @classmethod
    def load(cls, model_dir: Path, dtype: torch.dtype, device: torch.device | str | None = None) -> LlamaModel:
        """Weights onto `device` (default: STRATA_DEVICE, see strata.kernels.device)."""
        cfg = ModelConfig.from_dir(model_dir)
        weights: dict[str, torch.Tensor] = {}
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {model_dir}")
        for f in files:
            weights.update(load_file(str(f)))
        return cls(cfg, weights, dtype, device if device is not None else default_device())

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
        x = F.embedding(input_ids, self.embed)
        cos, sin = self.cos_sin[positions].unbind(1)
        if skip is not None:
            return self._forward_skipping(x, cos, sin, batch, kv_cache, skip, before_layer)
        for i, layer in enumerate(self.layers):
            if before_layer is not None:
                before_layer(i)
            h = rms_norm(x, layer.attn_norm, cfg.rms_norm_eps)
            x = x + self._attention(h, layer, i, cos, sin, batch, kv_cache)
            h = rms_norm(x, layer.mlp_norm, cfg.rms_norm_eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        return rms_norm(x, self.norm, cfg.rms_norm_eps)

    def _forward_skipping(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: AttentionBatch,
        kv_cache: torch.Tensor,
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
                x = x + self._attention(h, layer, i, cos, sin, batch, kv_cache)
            else:
                assert ls.attn_scale is not None
                rows = ls.attn_rows
                x = x * ls.attn_scale.unsqueeze(1)
                if rows.numel():
                    if id(rows) not in sub_batches:
                        sub_batches[id(rows)] = batch.select(rows)
                    xr = x_in[rows]
                    h = rms_norm(xr, layer.attn_norm, cfg.rms_norm_eps)
                    x[rows] = xr + self._attention(
                        h, layer, i, cos[rows], sin[rows], sub_batches[id(rows)], kv_cache
                    )
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

    @staticmethod
    def _mlp(h: torch.Tensor, layer: LlamaLayer) -> torch.Tensor:
        gate, up = layer.gate_up(h).chunk(2, dim=-1)
        return layer.down(F.silu(gate) * up)

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

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float().cpu()  # sampling runs on the host (a no-op on CPU)

    def _attention(
        self,
        h: torch.Tensor,
        layer: LlamaLayer,
        index: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: AttentionBatch,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.cfg
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        t = h.shape[0]
        qkv = layer.qkv(h)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rotary(q.view(t, cfg.num_attention_heads, cfg.head_dim), cos, sin)
        k = apply_rotary(k.view(t, cfg.num_key_value_heads, cfg.head_dim), cos, sin)
        v = v.reshape(t, cfg.num_key_value_heads, cfg.head_dim)
        write_kv(k_cache, v_cache, k, v, batch.slots[index])

        out = torch.empty_like(q)
        for p in batch.prefills:
            if p.context_slots is None:
                ks, vs = k[p.start : p.end], v[p.start : p.end]
            else:
                slots = p.context_slots[index]
                ks, vs = gather_kv(k_cache, slots), gather_kv(v_cache, slots)
            out[p.start : p.end] = prefill_attention(q[p.start : p.end], ks, vs, self.scale)
        if batch.decode_rows.numel():
            rows = batch.decode_rows
            out[rows] = paged_decode_attention(
                q[rows], k_cache, v_cache, batch.decode_block_tables[index], batch.decode_context_lens, self.scale
            )
        return layer.o(out.view(t, self.q_size))
