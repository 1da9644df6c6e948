"""Engine settings (the server's flags map onto these)."""

from __future__ import annotations

from dataclasses import dataclass, field

from strata.storage.kv_codec import DEFAULT_FORMAT


@dataclass
class EngineConfig:
    model: str = "default"
    dtype: str = "auto"  # or float32, bfloat16, float16; auto: bfloat16 where the hardware has it (kernels.device)
    quantization: str = "none"  # or int8, int4: linear weights in blocks (strata.engine.weights.quantization)
    device: str | None = None  # "cpu", "cuda", "cuda:N"; None: STRATA_DEVICE, else cpu
    max_model_len: int | None = None  # default: the model's context length
    kv_cache_gb: float = 1.0
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024  # token budget of one step (chunked prefill)
    max_queue: int = 1024  # waiting requests beyond this are refused (429, retry elsewhere)
    seed: int = 0
    # Session KV tiers (CachedAttention). HBM is the block pool above.
    session_cache: bool = True
    dram_kv_gb: float = 1.0
    ssd_dir: str | None = None  # None: no SSD tier
    ssd_kv_gb: float = 8.0
    eviction_policy: str = "scheduler"  # or "lru"
    session_ttl_s: float = 3600.0
    kv_chunk_tokens: int = 256
    kv_tier_dtype: str = DEFAULT_FORMAT  # how the DRAM/SSD/shared tiers store KV (storage/kv_codec.py)
    kv_load_timeout_s: float = 10.0  # a history layer that takes longer is recomputed instead (counted)
    remote_kv: str | None = None  # the shared KV tier (redis:// or rediss://HOST:PORT/DB); needs ssd_dir
    remote_kv_timeout_s: float = 0.5  # per call to it: slower counts as down (recompute)
    remote_kv_username: str | None = None  # Redis ACL user (None: the default user)
    remote_kv_password: str | None = field(default=None, repr=False)
    remote_kv_ca_file: str | None = None  # CA bundle that verifies a rediss:// server (None: the system's)
    response_ttl_s: float = 30 * 86400.0  # stored responses expire after this (OpenAI keeps 30 days)
    response_quota_mb: float = 256.0  # stored responses per tenant on one server
    # HMAC keys of the shared tier's chunks (the first signs, all verify); required with remote_kv.
    remote_kv_signing_keys: tuple[bytes, ...] = field(default=(), repr=False)
    # AdaSkip: the policy for every request, and the default of requests that do not ask (0 = no skipping).
    skip_policy: str = "adaskip"  # or early-exit, skipdecode, unified (baselines, need no profile)
    skip_sublayers: int = 0
    skip_mode: str = "e2e"  # prefill, decode or e2e
