"""GET /metrics: engine counters and gauges in Prometheus text format, read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from strata.engine.llm_engine import LLMEngine
from strata.engine.stats import Histogram
from strata.server.state import ServerState


class EngineCollector:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        ae = self.state.engine
        yield GaugeMetricFamily("strata_engine_ready", "1 when the engine can serve", value=int(
            ae is not None and ae.alive))
        if ae is None:
            return
        e = ae.engine
        s = e.stats
        yield GaugeMetricFamily("strata_requests_running", "Sequences in the running batch", value=e.num_running)
        yield GaugeMetricFamily("strata_requests_waiting", "Sequences waiting to be scheduled",
                                value=e.num_waiting)
        yield GaugeMetricFamily("strata_requests_in_flight", "Engine requests with a listener",
                                value=ae.num_in_flight)
        yield GaugeMetricFamily("strata_kv_blocks_total",
                                "KV cache blocks in the device pool (a block: one layer's K/V of block_size tokens)",
                                value=e.pool.num_blocks)
        yield GaugeMetricFamily("strata_kv_blocks_used", "KV cache blocks held by sequences",
                                value=e.blocks_in_use)
        yield GaugeMetricFamily("strata_kv_blocks_cached", "KV cache blocks caching finished sessions (HBM tier)",
                                value=e.reuse.cache.num_blocks)
        finished = CounterMetricFamily("strata_requests_finished", "Finished engine requests by reason",
                                       labels=["reason"])
        for reason, n in sorted(s.finished.items()):
            finished.add_metric([reason], n)
        yield finished
        yield CounterMetricFamily("strata_prompt_tokens", "Prompt tokens computed", value=s.prompt_tokens)
        yield CounterMetricFamily("strata_generation_tokens", "Tokens generated", value=s.generation_tokens)
        yield CounterMetricFamily("strata_preemptions", "Sequences preempted for KV blocks", value=s.preemptions)
        yield CounterMetricFamily("strata_engine_steps", "Engine steps run", value=s.steps)
        ttft = HistogramMetricFamily("strata_time_to_first_token_seconds", "Time to first token by the tier "
                                     "its history came from (none: computed)", labels=["tier"])
        for tier, h in sorted(s.ttft_by_tier.items()):
            ttft.add_metric([tier], _buckets(h), sum_value=h.total)
        yield ttft
        yield from _tier_metrics(e)
        yield from _skip_metrics(e)


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    cumulative, buckets = 0, []
    for bound, count in zip([*map(str, h.buckets), "+Inf"], h.counts, strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    return buckets


def _tier_metrics(e: LLMEngine) -> Iterator[Metric]:
    """Per-tier session KV metrics (CachedAttention)."""
    st = e.store.stats() if e.store is not None else {}
    reuse = e.reuse
    hits = CounterMetricFamily("strata_kv_hits", "Requests whose history was reused, by tier", labels=["tier"])
    tokens = CounterMetricFamily("strata_kv_tokens_reused", "Prompt tokens reused instead of computed, by tier",
                                 labels=["tier"])
    for tier in ("hbm", "dram", "ssd"):
        hits.add_metric([tier], reuse.hits[tier])
        tokens.add_metric([tier], reuse.tokens_reused[tier])
    yield hits
    yield tokens
    yield CounterMetricFamily("strata_kv_misses", "Requests that reused no history", value=reuse.hits["none"])
    loaded = CounterMetricFamily("strata_kv_bytes_loaded", "Bytes loaded into device blocks, by tier", labels=["tier"])
    saved = CounterMetricFamily("strata_kv_bytes_saved", "Bytes written to a tier", labels=["tier"])
    evicted = CounterMetricFamily("strata_kv_evictions", "Evictions (HBM, DRAM: chunks; SSD: sessions)",
                                  labels=["tier"])
    occupancy = GaugeMetricFamily("strata_kv_occupancy_bytes", "Bytes of session KV held, by tier", labels=["tier"])
    capacity = GaugeMetricFamily("strata_kv_capacity_bytes", "Capacity of each tier", labels=["tier"])
    evicted.add_metric(["hbm"], reuse.cache.evicted_entries)
    occupancy.add_metric(["hbm"], reuse.cache.num_blocks * e.pool.block_bytes)
    capacity.add_metric(["hbm"], e.pool.num_blocks * e.pool.block_bytes)
    for tier in ("dram", "ssd"):
        loaded.add_metric([tier], st.get(f"bytes_loaded_{tier}", 0.0))
        saved.add_metric([tier], st.get(f"bytes_saved_{tier}", 0.0))
        evicted.add_metric([tier], st.get(f"evictions_{tier}", 0.0))
        occupancy.add_metric([tier], st.get(f"occupancy_bytes_{tier}", 0.0))
        capacity.add_metric([tier], st.get(f"capacity_bytes_{tier}", 0.0))
    yield from (loaded, saved, evicted, occupancy, capacity)
    load = CounterMetricFamily("strata_kv_load_seconds", "Time loading history KV: overlapped with compute "
                               "or stalling the runner", labels=["kind"])
    load.add_metric(["overlapped"], st.get("load_overlap_seconds", 0.0))
    load.add_metric(["stalled"], st.get("load_stall_seconds", 0.0))
    yield load
    stall = CounterMetricFamily("strata_kv_load_stall_seconds", "Time the runner waited for a history KV layer, "
                                "by the slowest tier the load read from", labels=["tier"])
    for tier in ("dram", "ssd"):
        stall.add_metric([tier], st.get(f"load_stall_seconds_{tier}", 0.0))
    yield stall
    yield CounterMetricFamily("strata_kv_prefetches_issued", "SSD -> DRAM prefetches issued",
                              value=st.get("prefetches_issued", 0.0))
    yield CounterMetricFamily("strata_kv_prefetches_used", "Prefetched chunks later loaded",
                              value=st.get("prefetches_used", 0.0))
    yield CounterMetricFamily("strata_kv_corrupt_chunks_discarded", "Chunk files discarded (checksum, foreign "
                              "model, truncated, ...)", value=st.get("corrupt_chunks_discarded", 0.0))
    yield CounterMetricFamily("strata_kv_load_failures", "Loads that failed and were recomputed",
                              value=reuse.load_failures)
    yield GaugeMetricFamily("strata_kv_sessions", "Sessions stored in the DRAM/SSD tiers",
                            value=st.get("sessions", 0.0))


def _skip_metrics(e: LLMEngine) -> Iterator[Metric]:
    """AdaSkip: what finished requests skipped, and the KV kept out of reuse because of it."""
    s = e.stats
    yield GaugeMetricFamily("strata_skip_profile_loaded", "1 when an AdaSkip calibration profile is loaded",
                            value=int(e.skips.profile is not None))
    requests = CounterMetricFamily("strata_skip_requests", "Finished requests that skipped sublayers, by policy "
                                   "and mode", labels=["policy", "mode"])
    for mode, n in sorted(s.skip_requests.items()):
        requests.add_metric([e.skips.policy_name, mode], n)
    yield requests
    sublayers = CounterMetricFamily("strata_skip_sublayers", "Sublayers in the skip sets of finished requests "
                                    "(fixed set plus online extra FFNs), by kind", labels=["kind"])
    for kind in ("attn", "ffn"):
        sublayers.add_metric([kind], s.skip_sublayers[kind])
    yield sublayers
    yield CounterMetricFamily("strata_skip_extra_ffns", "FFNs added online to a request's skip set (AdaSkip)",
                              value=s.skip_extra_ffns)
    yield CounterMetricFamily("strata_skip_kv_not_saved", "Tokens whose KV was computed with sublayers skipped, "
                              "hence neither saved to the session tiers nor cached for reuse",
                              value=e.reuse.skip_tokens_not_saved)


def metrics_text(state: ServerState) -> bytes:
    registry = CollectorRegistry()
    registry.register(EngineCollector(state))
    return generate_latest(registry)
