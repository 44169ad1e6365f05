"""A backend's metric series removed when it leaves for good: every metric with a
`backend` label loses that backend's children (counters, histograms, gauges, per
route), the others' stay, and a child the serving path had cached is made afresh."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from gateway.serving.metrics import GatewayMetrics


def backends_in(registry: CollectorRegistry) -> dict[str, set[str]]:
    """Backend -> the metric families with a sample of it."""
    found: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            if "backend" in sample.labels:
                found.setdefault(sample.labels["backend"], set()).add(family.name)
    return found


def touch(metrics: GatewayMetrics, backend: str) -> None:
    metrics.requests.labels("digits", backend, "ort-fp32", "OK", "grpc").inc()
    metrics.latency.labels("digits", backend, "grpc").observe(0.01)
    metrics.attempts.labels(backend, "OK").inc()
    metrics.in_flight.labels(backend).set(1)
    metrics.healthy.labels(backend).set(1)
    metrics.available.labels(backend).set(1)
    metrics.price.labels(backend).set(0.05)
    metrics.queue_depth.labels(backend).set(0)
    metrics.merged_batch.labels(backend, "digits").observe(2)
    metrics.cost.labels("digits", backend).inc(1e-6)
    metrics.carbon.labels("digits", backend).inc(1e-3)
    metrics.ejections.labels(backend).inc()
    metrics.ejections_shared.labels(backend).inc()
    metrics.route_latency.labels(backend, "digits", "ort-fp32", "predicted", "0.99").set(2)
    metrics.route_cost.labels(backend, "digits", "ort-fp32").set(0.1)


def test_forget_backend_removes_its_series_only() -> None:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    touch(metrics, "gone")
    touch(metrics, "kept")
    metrics.decisions.labels("digits", "cheapest-feasible").inc()
    families = backends_in(registry)["kept"]
    assert backends_in(registry)["gone"] == families
    assert len(families) == 15

    metrics.forget_backend("gone")
    assert "gone" not in backends_in(registry)
    assert backends_in(registry)["kept"] == families
    assert (
        registry.get_sample_value(
            "switchyard_decisions_total", {"model": "digits", "reason": "cheapest-feasible"}
        )
        == 1.0
    )

    # A name that comes back counts from zero, through the serving path's cached children.
    metrics.attempts.labels("gone", "OK").inc()
    metrics.requests.labels("digits", "gone", "ort-fp32", "OK", "grpc").inc()
    assert (
        registry.get_sample_value(
            "switchyard_backend_attempts_total", {"backend": "gone", "outcome": "OK"}
        )
        == 1.0
    )
    assert (
        registry.get_sample_value(
            "switchyard_backend_attempts_total", {"backend": "kept", "outcome": "OK"}
        )
        == 1.0
    )
    metrics.forget_backend("never-seen")  # nothing to remove: no error
