"""GET /metrics: engine counters and gauges in Prometheus text format, read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

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
        yield GaugeMetricFamily("strata_kv_blocks_total", "KV cache blocks in the device pool",
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
        h = s.ttft
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, h.buckets), "+Inf"], h.counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily("strata_time_to_first_token_seconds", "Time to first token",
                                    buckets=buckets, sum_value=h.total)


def metrics_text(state: ServerState) -> bytes:
    registry = CollectorRegistry()
    registry.register(EngineCollector(state))
    return generate_latest(registry)
