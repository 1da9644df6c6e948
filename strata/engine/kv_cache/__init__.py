"""The KV cache manager: device blocks, the HBM cache of finished sessions, and reuse from the tiers."""

from strata.engine.kv_cache.manager import KVCacheManager

__all__ = ["KVCacheManager"]
