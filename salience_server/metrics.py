"""Prometheus metrics of one server: what the engine and the RPC layer count, and
gauges read from the engine when scraped.

Each server has its own registry (tests run several servers in one process); the
``/metrics`` endpoint of the shim beside it, or ``--metrics-port``, serves it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)
_DELIVERY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
_TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class EngineGauges:
    """What the engine holds at one moment (read under its lock when scraped)."""

    num_waiting: int
    num_running: int
    sessions_by_residency: dict[str, int]
    num_blocks_used: int
    num_blocks_free: int
    host_kv_bytes_used: int
    num_preemptions: int
    """Since the start: running requests sent back to wait (the scheduler's count)."""
    num_offloaded: int
    """Since the start: evictions whose KV went to host memory."""
    num_dropped: int
    """Since the start: evictions whose KV was dropped."""
    num_host_kv_dropped: int
    """Since the start: offloaded sessions whose host KV was given up later."""


class Metrics:
    """The counters and histograms; ``watch`` adds the engine's gauges."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "salience_requests",
            "RPCs by method and final status code.",
            ["rpc", "code"],
            registry=self.registry,
        )
        tokens = Counter(
            "salience_tokens",
            "Tokens fed or produced: prefilled (new prompt tokens), decoded, and "
            "recomputed (KV lost to eviction or preemption and computed again).",
            ["kind"],
            registry=self.registry,
        )
        self.prefilled_tokens = tokens.labels(kind="prefilled")
        self.decoded_tokens = tokens.labels(kind="decoded")
        self.recomputed_tokens = tokens.labels(kind="recomputed")
        speculation = Counter(
            "salience_speculative_tokens",
            "Speculative decoding: draft tokens verified, and accepted.",
            ["kind"],
            registry=self.registry,
        )
        self.drafted_tokens = speculation.labels(kind="drafted")
        self.accepted_tokens = speculation.labels(kind="accepted")
        self.time_to_first_token = Histogram(
            "salience_time_to_first_token_seconds",
            "From a Generate call's arrival to its first decoded token.",
            buckets=_TTFT_BUCKETS_S,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "salience_inter_token_latency_seconds",
            "Between consecutive decoded tokens of one call.",
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )

        self.token_delivery = Histogram(
            "salience_token_delivery_seconds",
            "From the end of the engine step that decoded a token to its event being "
            "written to the client's gRPC stream (detokenising and protobuf building "
            "included): what the frontend adds to each token.",
            buckets=_DELIVERY_BUCKETS_S,
            registry=self.registry,
        )

    def watch(self, read_gauges: Callable[[], EngineGauges]) -> None:
        """Reports the engine's gauges at every scrape."""
        self.registry.register(_EngineCollector(read_gauges))


class _EngineCollector(Collector):
    def __init__(self, read_gauges: Callable[[], EngineGauges]) -> None:
        self.read_gauges = read_gauges

    def collect(self) -> Iterator[Metric]:
        gauges = self.read_gauges()
        yield GaugeMetricFamily(
            "salience_queue_depth", "Requests waiting to run.", value=gauges.num_waiting
        )
        yield CounterMetricFamily(
            "salience_preemptions",
            "Running requests sent back to wait: for a more urgent request's place in "
            "the running set (their KV kept), or for room in the KV pool.",
            value=gauges.num_preemptions,
        )
        evictions = CounterMetricFamily(
            "salience_evictions",
            "Sessions whose KV left the pool to make room: copied to host memory "
            "(offloaded) or dropped (recomputed from their tokens on next use).",
            labels=["outcome"],
        )
        evictions.add_metric(["offloaded"], gauges.num_offloaded)
        evictions.add_metric(["dropped"], gauges.num_dropped)
        yield evictions
        yield CounterMetricFamily(
            "salience_host_kv_dropped",
            "Offloaded sessions whose host KV was given up for a more recently used "
            "session's KV or for image embeddings (recomputed on next use).",
            value=gauges.num_host_kv_dropped,
        )
        yield GaugeMetricFamily(
            "salience_running_requests",
            "Requests in the running set (fed in the engine's steps).",
            value=gauges.num_running,
        )
        sessions = GaugeMetricFamily(
            "salience_sessions", "Live sessions by KV residency.", labels=["residency"]
        )
        for residency, count in sorted(gauges.sessions_by_residency.items()):
            sessions.add_metric([residency], count)
        yield sessions
        blocks = GaugeMetricFamily("salience_kv_blocks", "KV pool blocks.", labels=["state"])
        blocks.add_metric(["used"], gauges.num_blocks_used)
        blocks.add_metric(["free"], gauges.num_blocks_free)
        yield blocks
        yield GaugeMetricFamily(
            "salience_host_memory_bytes",
            "Host memory held for offloaded KV and kept image embeddings.",
            value=gauges.host_kv_bytes_used,
        )
