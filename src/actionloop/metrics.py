"""Prometheus metrics of one runtime, in a registry of its own.

Scraped at /metrics. Names follow Prometheus conventions: counters end in
_total (added by the client library), durations are in seconds.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .errors import ActionExited, ActionLoopError, ActionTimeout, BadResult, StartError

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Error kinds, by whose fault (see errors.py); handshake refusals have their own.
KINDS = {ActionExited: "command_exited", ActionTimeout: "timeout", BadResult: "bad_result", StartError: "start_failed"}


def kind_of(exc: ActionLoopError) -> str:
    return KINDS.get(type(exc), "other")


class Metrics:
    """The runtime's counters, gauges and the invocation latency histogram."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.connections = Gauge("actionloop_websocket_connections", "Open WebSocket connections", registry=registry)
        self.opened = Counter(
            "actionloop_websocket_connections_opened", "WebSocket connections accepted", registry=registry
        )
        self.received = Counter("actionloop_messages_received", "WebSocket messages received", registry=registry)
        self.sent = Counter("actionloop_messages_sent", "WebSocket replies sent", registry=registry)
        self.errors = Counter("actionloop_errors", "Failures, by kind", ["kind"], registry=registry)
        self.latency = Histogram(
            "actionloop_invocation_seconds",
            "Time from handing an activation to the action until its result",
            registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.restarts = Counter(
            "actionloop_action_restarts", "Action processes replaced after dying", registry=registry
        )
        self.in_flight = Gauge("actionloop_messages_in_flight", "WebSocket messages being answered", registry=registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
