"""Routes and backends for the routing tests: one backend per route, its estimate
seeded from a p50 and a p99, its queue filled by hand; and a model as backends report it."""

from __future__ import annotations

from backends.protocol.tensors import TensorSpec
from gateway.routing.fleet import BackendState, Ejection, FleetState, ModelInfo, Route
from gateway.routing.router import RouteRequest

REQ = RouteRequest("m")


def route(
    name: str,
    price: float,
    p50: float = 1.0,
    p99: float = 2.0,
    in_flight: int = 0,
    slots: int = 1,
    available: bool = True,
    carbon: tuple[float, float] | None = None,
) -> Route:
    state = BackendState(name, "127.0.0.1:1", "cpu", price, slots=slots)
    state.network.rtt_ms = 0.0
    state.healthy = available
    if carbon is not None:
        state.set_carbon(*carbon)
    state.refresh()
    r = Route(state, "m", "v", True)
    r.estimate.seed(p50, p99)
    busy(r, in_flight)
    return r


def busy(r: Route, in_flight: int, started_s: float = 0.0) -> None:
    """`in_flight` requests on `r`'s backend, sent at `started_s` and already due
    (ahead of any request routed after), in place of what it had."""
    r.state.clear()
    for _ in range(in_flight):
        r.state.admit(r, r.estimate.mean_ms, started_s, started_s)


def names(routes: list[Route]) -> list[str]:
    return [r.backend for r in routes]


INFO = ModelInfo(
    "m",
    ("1",),
    "onnxruntime_onnx",
    (TensorSpec("x", "FP32", (-1, 2)),),
    (),
    8,
    "ort-cpu-fp32",
    ("ort-cpu-fp32", "ort-cpu-int8-qdq"),
    (("ort-cpu-fp32", 2.0, 3.0, None), ("ort-cpu-int8-qdq", 1.0, 1.5, 0.1)),
)


def two_backends() -> FleetState:
    return FleetState(
        [
            BackendState("a", "127.0.0.1:1", "cpu", 0.1),
            BackendState("b", "127.0.0.1:2", "cpu", 0.2),
        ],
        Ejection(after_failures=2, base_s=1.0, max_s=4.0),
    )
