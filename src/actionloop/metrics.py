"""Prometheus metrics of one runtime.

Scraped at /metrics. Names follow Prometheus conventions: counters end in
_total, durations are in seconds. The hot path only adds to plain integers
(one event loop thread owns them, so no locks); prometheus-client, imported
when first scraped, turns them into the exposition format.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Iterator
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The runtime's counters, gauges and the invocation latency histogram."""

    def __init__(self) -> None:
        self.connections = 0  # gauge: open WebSocket connections
        self.opened = 0
        self.received = 0
        self.sent = 0
        self.restarts = 0
        self.updates = {"ok": 0, "failed": 0}  # live updates of the action, by result
        self.in_flight = 0  # gauge: WebSocket messages being answered
        self.errors: collections.Counter[str] = collections.Counter()
        self.buckets = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.latency_sum = 0.0

    def error(self, kind: str) -> None:
        """Count a failure of this kind (an error class's `kind`, or a handshake refusal's)."""
        self.errors[kind] += 1

    def restarted(self) -> None:
        self.restarts += 1

    def updated(self, ok: bool) -> None:
        self.updates["ok" if ok else "failed"] += 1

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def collect(self) -> Iterator[Any]:
        """The metric families, for prometheus-client's exposition."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        yield GaugeMetricFamily("actionloop_websocket_connections", "Open WebSocket connections", self.connections)
        yield CounterMetricFamily(
            "actionloop_websocket_connections_opened", "WebSocket connections accepted", self.opened
        )
        yield CounterMetricFamily("actionloop_messages_received", "WebSocket messages received", self.received)
        yield CounterMetricFamily("actionloop_messages_sent", "WebSocket replies sent", self.sent)
        errors = CounterMetricFamily("actionloop_errors", "Failures, by kind", labels=["kind"])
        for kind, count in sorted(self.errors.items()):
            errors.add_metric([kind], count)
        yield errors
        cumulative, total = [], 0
        for bound, count in zip((*BUCKETS, float("inf")), self.buckets, strict=True):
            total += count
            cumulative.append((str(float(bound)) if bound != float("inf") else "+Inf", total))
        yield HistogramMetricFamily(
            "actionloop_invocation_seconds",
            "Time from handing an activation to the action until its result",
            buckets=cumulative,
            sum_value=self.latency_sum,
        )
        yield CounterMetricFamily("actionloop_action_restarts", "Action processes replaced after dying", self.restarts)
        updates = CounterMetricFamily(
            "actionloop_action_updates", "Live updates of the action, by result", labels=["result"]
        )
        for result, count in self.updates.items():
            updates.add_metric([result], count)
        yield updates
        yield GaugeMetricFamily("actionloop_messages_in_flight", "WebSocket messages being answered", self.in_flight)

    def render(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return generate_latest(registry)
