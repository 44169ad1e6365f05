"""Prometheus metrics of the gateway, on a registry passed in (never the global one).

In a process of a `switchyard serve --processes N` group, prometheus-client runs in its
multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by the parent before the process
starts): every value is kept in a file of that folder too, and the parent serves them
merged. Each gauge says how its processes' values merge (`multiprocess_mode`, ignored
in a single process): summed over the live processes where each holds its own share
(in flight, queue depth), the lowest where 1 means "every process sees it" (healthy,
available, ready, store up), the highest for per-route predictions (the most
pessimistic process), the most recent for prices (the same in every process).

Imports prometheus_client and the standard library's HTTP server only: no grpc, no
protobuf, and never the global registry.
"""

from __future__ import annotations

import math
import os
import ssl
import threading
from collections.abc import Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.metrics import MetricWrapperBase

LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
)


def cache_children(metric: MetricWrapperBase) -> None:
    """Makes `metric.labels(...)` with positional values remember each child it made: the
    serving path asks for the same few children on every request, and prometheus_client
    checks and converts the values and takes a lock each time. `remove_by_labels` forgets
    the children it removes here too (else a later `labels` would hand back a child the
    registry no longer shows)."""
    original, original_remove = metric.labels, metric.remove_by_labels
    names: tuple[str, ...] = metric._labelnames
    children: dict[tuple[str, ...], Any] = {}

    def labels(*values: str, **named: str) -> Any:
        if named:
            return original(*values, **named)
        child = children.get(values)
        if child is None:
            child = children[values] = original(*values)
        return child

    def remove_by_labels(match: dict[str, str]) -> None:
        original_remove(match)
        where = {names.index(name): value for name, value in match.items()}
        for values in [v for v in children if all(v[i] == x for i, x in where.items())]:
            del children[values]

    setattr(metric, "labels", labels)  # noqa: B010 (a method replaced on one instance)
    setattr(metric, "remove_by_labels", remove_by_labels)  # noqa: B010


def multiprocess_mode() -> bool:
    """Whether prometheus_client keeps values in PROMETHEUS_MULTIPROC_DIR's files (a
    process of a `--processes` group), where it cannot remove a child."""
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ


SlaTarget = tuple[str, str, float, float]
"""One SLA target: model, sla_class, latency_ms, percentile."""


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "switchyard_requests",
            "Inference requests answered, by model, route and outcome: the gRPC status name "
            "the caller got (OK; INTERNAL for a fault of the gateway's own; CANCELLED when "
            "the caller went away first), and protocol (grpc, rest).",
            ["model", "backend", "variant", "outcome", "protocol"],
            registry=registry,
        )
        self.latency = Histogram(
            "switchyard_request_latency_seconds",
            "Gateway-observed latency of inference requests, by model, backend and protocol "
            "(grpc, rest).",
            ["model", "backend", "protocol"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.attempts = Counter(
            "switchyard_backend_attempts",
            "Attempts sent to backends, by backend and outcome.",
            ["backend", "outcome"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "switchyard_backend_in_flight",
            "Requests in flight per backend.",
            ["backend"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.healthy = Gauge(
            "switchyard_backend_healthy",
            "1 when the backend passes its health probes.",
            ["backend"],
            multiprocess_mode="livemin",
            registry=registry,
        )
        self.price = Gauge(
            "switchyard_backend_price_usd_per_hour",
            "Current price of each backend.",
            ["backend"],
            multiprocess_mode="livemostrecent",
            registry=registry,
        )
        self.model_ready = Gauge(
            "switchyard_model_ready",
            "1 when some healthy backend has the model ready.",
            ["model"],
            multiprocess_mode="livemin",
            registry=registry,
        )
        self.merged_batch = Histogram(
            "switchyard_coalesced_requests_per_call",
            "Requests merged into one backend call by the gateway's coalescer.",
            ["backend", "model"],
            buckets=(2, 4, 8, 16, 32, 64, 128),
            registry=registry,
        )
        self.sla = Counter(
            "switchyard_sla_requests",
            "Requests by SLA class and whether they met their latency target at the gateway.",
            ["model", "sla_class", "outcome"],
            registry=registry,
        )
        self.cost = Counter(
            "switchyard_cost_usd",
            "Cost of answered requests (price x busy time / slots), accumulated.",
            ["model", "backend"],
            registry=registry,
        )
        self.carbon = Counter(
            "switchyard_carbon_grams",
            "Estimated CO2 of answered requests (power x busy time x grid intensity).",
            ["model", "backend"],
            registry=registry,
        )
        self.ejections = Counter(
            "switchyard_backend_ejections",
            "Backends ejected by this gateway's passive outlier detection.",
            ["backend"],
            registry=registry,
        )
        self.ejections_shared = Counter(
            "switchyard_backend_ejections_shared",
            "Ejections another gateway made, applied here from the shared store.",
            ["backend"],
            registry=registry,
        )
        self.available = Gauge(
            "switchyard_backend_available",
            "1 when the backend takes traffic (healthy, not drained, not ejected).",
            ["backend"],
            multiprocess_mode="livemin",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "switchyard_backend_queue_depth",
            "Requests in flight to the backend beyond its slots, waiting for one (at the "
            "gateway or at the backend), as the router models its queue.",
            ["backend"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.state_store_up = Gauge(
            "switchyard_state_store_up",
            "1 while the control state's store answers (always 1 for memory or a file); 0 "
            "while a shared store cannot be reached: the gateway serves on the last state it "
            "knew and keeps its own changes until the store is back.",
            multiprocess_mode="livemin",
            registry=registry,
        )
        self.feed_up = Gauge(
            "switchyard_feed_up",
            "1 when the price or carbon feed's last poll was good; 0 when it failed or its "
            "answer could not be read (the last good readings are kept). Reported by the "
            "gateway that polls the feed.",
            ["feed"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.feed_last_success = Gauge(
            "switchyard_feed_last_success_timestamp_seconds",
            "When the feed was last polled successfully (seconds since the epoch).",
            ["feed"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.feed_stale = Gauge(
            "switchyard_feed_stale",
            "1 when the feed has had no good poll for its stale_after_s, and its backends "
            "fell back to their list prices (or carbon figures).",
            ["feed"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.route_latency = Gauge(
            "switchyard_route_latency_ms",
            "Per route: predicted service time and observed latency, at p50 and p99.",
            ["backend", "model", "variant", "kind", "quantile"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.route_cost = Gauge(
            "switchyard_route_cost_usd_per_1m",
            "Per route: cost of one million inferences at the current price and estimate.",
            ["backend", "model", "variant"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.decisions = Counter(
            "switchyard_decisions",
            "Routing decisions by reason (cheapest-feasible, infeasible-fallback, "
            "infeasible-reject, retry, hedge, ...).",
            ["model", "reason"],
            registry=registry,
        )
        self.sla_target_latency = Gauge(
            "switchyard_sla_target_latency_ms",
            "The latency target of the SLA policy per model and class (sla_class: default, "
            "or a class of the fleet's policies): the one switchyard_sla_requests holds "
            "requests to.",
            ["model", "sla_class"],
            multiprocess_mode="livemostrecent",
            registry=registry,
        )
        self.sla_target_percentile = Gauge(
            "switchyard_sla_target_percentile",
            "The share of requests, in percent, that must meet "
            "switchyard_sla_target_latency_ms, per model and class (99: 1% may miss).",
            ["model", "sla_class"],
            multiprocess_mode="livemostrecent",
            registry=registry,
        )
        self._sla_targets: frozenset[SlaTarget] = frozenset()
        # What every request touches: its children remembered (see cache_children).
        for metric in (
            self.requests,
            self.latency,
            self.sla,
            self.cost,
            self.carbon,
            self.decisions,
            self.attempts,
            self.in_flight,
        ):
            cache_children(metric)

    def backend_metrics(self) -> list[MetricWrapperBase]:
        """Every metric of the gateway's that has a `backend` label."""
        return [
            metric
            for metric in vars(self).values()
            if isinstance(metric, MetricWrapperBase) and "backend" in metric._labelnames
        ]

    def forget_backend(self, backend: str) -> None:
        """Removes every series of `backend` (each metric with a `backend` label: its
        counters, histograms and gauges, per route too), for a backend that has left the
        fleet for good (gone from discovery and drained), so that series do not pile up
        as pods come and go. Not in a `--processes` group: prometheus_client cannot
        remove a child in its multiprocess mode (the series stay until that process
        exits)."""
        if multiprocess_mode():
            return
        for metric in self.backend_metrics():
            metric.remove_by_labels({"backend": backend})

    def publish_sla_targets(self, targets: Iterable[SlaTarget]) -> None:
        """Sets the SLA target gauges to `targets`; the (model, class) pairs no longer
        among them read NaN (no target: multiprocess mode cannot remove a child);
        nothing to do when they are unchanged."""
        targets = frozenset(targets)
        if targets == self._sla_targets:
            return
        kept = {(model, sla_class) for model, sla_class, _, _ in targets}
        for model, sla_class, _, _ in self._sla_targets:
            if (model, sla_class) not in kept:
                self.sla_target_latency.labels(model, sla_class).set(math.nan)
                self.sla_target_percentile.labels(model, sla_class).set(math.nan)
        for model, sla_class, latency_ms, percentile in targets:
            self.sla_target_latency.labels(model, sla_class).set(latency_ms)
            self.sla_target_percentile.labels(model, sla_class).set(percentile)
        self._sla_targets = targets


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # a scrape every few seconds is not worth a log line


def serve_metrics_tls(
    host: str, port: int, registry: CollectorRegistry, context: ssl.SSLContext
) -> WSGIServer:
    """/metrics over TLS on `host:port` from threads of its own, with `context` (the
    gateway's listener context, whose files are read again by the first connection
    after they change: prometheus-client's own TLS option reads them once). Returns
    the server (`server_port`; `shutdown()` stops it)."""
    server = make_server(
        host, port, make_wsgi_app(registry), _ThreadingServer, handler_class=_QuietHandler
    )
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
