"""GET /metrics: engine counters and gauges in Prometheus text format, from the snapshot the engine publishes."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from strata.engine.stats import EngineSnapshot, Histogram
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
        snap = ae.snapshot  # published whole by the engine thread: nothing here reads live engine state
        now = time.monotonic()
        s = snap.stats
        yield GaugeMetricFamily("strata_engine_seconds_since_last_step", "Seconds since the engine last ran a "
                                "batch (grows while idle)", value=now - snap.last_step if snap.last_step else -1)
        yield GaugeMetricFamily("strata_engine_seconds_since_heartbeat", "Seconds since the engine loop last "
                                "turned (about 1 s at most while idle; large: stuck)", value=now - ae.heartbeat)
        yield GaugeMetricFamily("strata_requests_running", "Sequences in the running batch", value=snap.running)
        yield GaugeMetricFamily("strata_requests_waiting", "Sequences waiting to be scheduled", value=snap.waiting)
        yield GaugeMetricFamily("strata_requests_in_flight", "Engine requests with a listener", value=snap.in_flight)
        yield GaugeMetricFamily("strata_kv_blocks_total",
                                "KV cache blocks in the device pool (a block: one layer's K/V of block_size tokens)",
                                value=snap.blocks_total)
        yield GaugeMetricFamily("strata_kv_blocks_used", "KV cache blocks held by sequences", value=snap.blocks_used)
        yield GaugeMetricFamily("strata_kv_blocks_cached", "KV cache blocks caching finished sessions (HBM tier)",
                                value=snap.blocks_cached)
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
        yield from _tier_metrics(snap)
        yield from _skip_metrics(snap)


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    cumulative, buckets = 0, []
    for bound, count in zip([*map(str, h.buckets), "+Inf"], h.counts, strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    return buckets


def _tier_metrics(snap: EngineSnapshot) -> Iterator[Metric]:
    """Per-tier session KV metrics (CachedAttention)."""
    st = snap.store
    hits = CounterMetricFamily("strata_kv_hits", "Requests whose history was reused, by tier", labels=["tier"])
    tokens = CounterMetricFamily("strata_kv_tokens_reused", "Prompt tokens reused instead of computed, by tier",
                                 labels=["tier"])
    for tier in ("hbm", "dram", "ssd", "remote"):
        hits.add_metric([tier], snap.kv_hits.get(tier, 0))
        tokens.add_metric([tier], snap.kv_tokens_reused.get(tier, 0))
    yield hits
    yield tokens
    yield CounterMetricFamily("strata_kv_misses", "Requests that reused no history", value=snap.kv_hits.get("none", 0))
    loaded = CounterMetricFamily("strata_kv_bytes_loaded", "Bytes loaded into device blocks, by tier", labels=["tier"])
    saved = CounterMetricFamily("strata_kv_bytes_saved", "Bytes written to a tier", labels=["tier"])
    evicted = CounterMetricFamily("strata_kv_evictions", "Evictions (HBM, DRAM: chunks; SSD: sessions)",
                                  labels=["tier"])
    occupancy = GaugeMetricFamily("strata_kv_occupancy_bytes", "Bytes of session KV held, by tier", labels=["tier"])
    capacity = GaugeMetricFamily("strata_kv_capacity_bytes", "Capacity of each tier", labels=["tier"])
    evicted.add_metric(["hbm"], snap.hbm_evictions)
    occupancy.add_metric(["hbm"], snap.blocks_cached * snap.block_bytes)
    capacity.add_metric(["hbm"], snap.blocks_total * snap.block_bytes)
    saved.add_metric(["remote"], st.get("bytes_saved_remote", 0.0))
    for tier in ("dram", "ssd"):
        loaded.add_metric([tier], st.get(f"bytes_loaded_{tier}", 0.0))
        saved.add_metric([tier], st.get(f"bytes_saved_{tier}", 0.0))
        evicted.add_metric([tier], st.get(f"evictions_{tier}", 0.0))
        occupancy.add_metric([tier], st.get(f"occupancy_bytes_{tier}", 0.0))
        capacity.add_metric([tier], st.get(f"capacity_bytes_{tier}", 0.0))
    yield from (loaded, saved, evicted, occupancy, capacity)
    per_token = GaugeMetricFamily("strata_kv_tier_bytes_per_token",
                                  "Bytes of one token's KV (every layer) in the DRAM/SSD/shared tiers, by the format "
                                  "they store (--kv-tier-dtype)", labels=["format"])
    for key, value in st.items():
        if key.startswith("tier_bytes_per_token_"):
            per_token.add_metric([key.removeprefix("tier_bytes_per_token_")], value)
    yield per_token
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
    yield CounterMetricFamily("strata_kv_load_failures", "Loads that failed or timed out and were recomputed",
                              value=snap.kv_load_failures)
    yield CounterMetricFamily("strata_kv_load_timeouts", "History KV layers that did not arrive in time (recomputed)",
                              value=st.get("load_timeouts", 0.0))
    yield CounterMetricFamily("strata_kv_saves_dropped_queue_full", "KV saves dropped because the save queue was "
                              "full (that session's later turns recompute from there)",
                              value=st.get("saves_dropped_queue_full", 0.0))
    yield CounterMetricFamily("strata_kv_saves_dropped_deleted", "KV saves dropped because their session was "
                              "deleted after they were queued", value=st.get("saves_dropped_deleted", 0.0))
    yield GaugeMetricFamily("strata_kv_save_queue_bytes", "Bytes of KV copies waiting to be saved",
                            value=st.get("save_queue_bytes", 0.0))
    yield GaugeMetricFamily("strata_kv_ssd_io_queue", "Jobs (write-backs, prefetches) waiting for the SSD I/O thread",
                            value=st.get("ssd_io_queue", 0.0))
    yield GaugeMetricFamily("strata_kv_sessions", "Sessions stored in the DRAM/SSD tiers",
                            value=st.get("sessions", 0.0))
    yield CounterMetricFamily("strata_kv_tokens_reused_shared", "Prompt tokens loaded from DRAM/SSD chunks that "
                              "several sessions share (stored once)", value=st.get("tokens_reused_shared", 0.0))
    yield GaugeMetricFamily("strata_kv_shared_chunks", "Stored chunks that several sessions share",
                            value=st.get("shared_chunks", 0.0))
    unshared = GaugeMetricFamily("strata_kv_bytes_without_sharing", "Bytes the DRAM/SSD tiers would hold if "
                                 "each session kept its own copy of what it shares (compare strata_kv_occupancy_"
                                 "bytes)", labels=["tier"])
    for tier in ("dram", "ssd"):
        unshared.add_metric([tier], st.get(f"bytes_without_sharing_{tier}", 0.0))
    yield unshared
    sharing = CounterMetricFamily("strata_kv_shared_chunk_events", "Chunks a session took from another instead of "
                                  "storing (deduplicated) or computing (adopted)", labels=["event"])
    sharing.add_metric(["deduplicated"], st.get("shared_chunks_deduplicated", 0.0))
    sharing.add_metric(["adopted"], st.get("shared_chunks_adopted", 0.0))
    yield sharing
    remote = CounterMetricFamily("strata_kv_remote", "The shared KV tier (--remote-kv): chunks uploaded, uploads "
                                 "dropped (queue full or remote down), sessions imported, tokens imported, calls "
                                 "skipped while it was down, errors, local copies dropped for a deletion elsewhere, "
                                 "deletions given up while it was down, chunks refused on import (by reason)",
                                 labels=["event"])
    for event, key in (("uploads", "remote_uploads"), ("uploads_dropped", "remote_uploads_dropped"),
                       ("uploads_dropped_deleted", "remote_uploads_dropped_deleted"),
                       ("imports", "remote_imports"), ("tokens_imported", "tokens_imported_remote"),
                       ("skipped_down", "remote_skipped_down"), ("errors", "remote_errors"),
                       ("deletions_applied", "remote_deletions_applied"),
                       ("forgets_dropped", "remote_forgets_dropped")):
        remote.add_metric([event], st.get(key, 0.0))
    for key in sorted(k for k in st if k.startswith("remote_chunks_discarded_")):  # by reason: checksum, oversize...
        remote.add_metric([key.removeprefix("remote_")], st[key])
    yield remote
    yield GaugeMetricFamily("strata_kv_remote_upload_queue", "Chunks waiting to be uploaded to the shared tier",
                            value=st.get("remote_upload_queue", 0.0))
    rs = snap.responses
    yield GaugeMetricFamily("strata_responses_stored", "Stored responses (/v1/responses, store: true) on this server",
                            value=rs.get("responses_count", 0.0))
    yield GaugeMetricFamily("strata_responses_stored_bytes", "Bytes of the stored responses on this server (in the "
                            "SSD budget with --ssd-dir)", value=rs.get("responses_bytes", 0.0))
    records = CounterMetricFamily("strata_responses_records", "Stored responses: written, expired, refused for the "
                                  "quota or budget, shared-store errors and refused (forged) shared records",
                                  labels=["event"])
    for event in ("stored", "expired", "refused_quota", "remote_errors", "remote_discarded"):
        records.add_metric([event], rs.get(f"responses_{event}", 0.0))
    yield records


def _skip_metrics(snap: EngineSnapshot) -> Iterator[Metric]:
    """AdaSkip: what finished requests skipped, and the KV kept out of reuse because of it."""
    s = snap.stats
    yield GaugeMetricFamily("strata_skip_profile_loaded", "1 when an AdaSkip calibration profile is loaded",
                            value=int(snap.skip_profile_loaded))
    requests = CounterMetricFamily("strata_skip_requests", "Finished requests that skipped sublayers, by policy "
                                   "and mode", labels=["policy", "mode"])
    for mode, n in sorted(s.skip_requests.items()):
        requests.add_metric([snap.skip_policy, mode], n)
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
                              value=snap.skip_tokens_not_saved)


def metrics_text(state: ServerState) -> bytes:
    registry = CollectorRegistry()
    registry.register(EngineCollector(state))
    return generate_latest(registry)
