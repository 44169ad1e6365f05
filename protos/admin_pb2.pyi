from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListRoutesRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class RouteStatus(_message.Message):
    __slots__ = ("backend", "model", "variant", "default_variant", "hardware_class", "status", "detail", "price_usd_per_hour", "predicted_p50_ms", "predicted_p99_ms", "observed_p50_ms", "observed_p99_ms", "in_flight", "slots", "requests", "failures", "traffic_share", "cost_usd_per_1m", "carbon_g_per_1m", "samples", "address", "carbon_g_per_kwh", "power_w")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VARIANT_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_CLASS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    PRICE_USD_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_P50_MS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_P99_MS_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_P50_MS_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_P99_MS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_SHARE_FIELD_NUMBER: _ClassVar[int]
    COST_USD_PER_1M_FIELD_NUMBER: _ClassVar[int]
    CARBON_G_PER_1M_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CARBON_G_PER_KWH_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    backend: str
    model: str
    variant: str
    default_variant: bool
    hardware_class: str
    status: str
    detail: str
    price_usd_per_hour: float
    predicted_p50_ms: float
    predicted_p99_ms: float
    observed_p50_ms: float
    observed_p99_ms: float
    in_flight: int
    slots: int
    requests: int
    failures: int
    traffic_share: float
    cost_usd_per_1m: float
    carbon_g_per_1m: float
    samples: int
    address: str
    carbon_g_per_kwh: float
    power_w: float
    def __init__(self, backend: _Optional[str] = ..., model: _Optional[str] = ..., variant: _Optional[str] = ..., default_variant: _Optional[bool] = ..., hardware_class: _Optional[str] = ..., status: _Optional[str] = ..., detail: _Optional[str] = ..., price_usd_per_hour: _Optional[float] = ..., predicted_p50_ms: _Optional[float] = ..., predicted_p99_ms: _Optional[float] = ..., observed_p50_ms: _Optional[float] = ..., observed_p99_ms: _Optional[float] = ..., in_flight: _Optional[int] = ..., slots: _Optional[int] = ..., requests: _Optional[int] = ..., failures: _Optional[int] = ..., traffic_share: _Optional[float] = ..., cost_usd_per_1m: _Optional[float] = ..., carbon_g_per_1m: _Optional[float] = ..., samples: _Optional[int] = ..., address: _Optional[str] = ..., carbon_g_per_kwh: _Optional[float] = ..., power_w: _Optional[float] = ...) -> None: ...

class ListRoutesResponse(_message.Message):
    __slots__ = ("routes", "without_routes")
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    WITHOUT_ROUTES_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[RouteStatus]
    without_routes: _containers.RepeatedCompositeFieldContainer[BackendStatus]
    def __init__(self, routes: _Optional[_Iterable[_Union[RouteStatus, _Mapping]]] = ..., without_routes: _Optional[_Iterable[_Union[BackendStatus, _Mapping]]] = ...) -> None: ...

class SetPriceRequest(_message.Message):
    __slots__ = ("backend", "usd_per_hour")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    USD_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    backend: str
    usd_per_hour: float
    def __init__(self, backend: _Optional[str] = ..., usd_per_hour: _Optional[float] = ...) -> None: ...

class SetCarbonRequest(_message.Message):
    __slots__ = ("backend", "g_per_kwh", "power_w")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    G_PER_KWH_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    backend: str
    g_per_kwh: float
    power_w: float
    def __init__(self, backend: _Optional[str] = ..., g_per_kwh: _Optional[float] = ..., power_w: _Optional[float] = ...) -> None: ...

class BackendStatus(_message.Message):
    __slots__ = ("backend", "status", "price_usd_per_hour", "in_flight", "carbon_g_per_kwh", "power_w", "detail", "address")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PRICE_USD_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    CARBON_G_PER_KWH_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    backend: str
    status: str
    price_usd_per_hour: float
    in_flight: int
    carbon_g_per_kwh: float
    power_w: float
    detail: str
    address: str
    def __init__(self, backend: _Optional[str] = ..., status: _Optional[str] = ..., price_usd_per_hour: _Optional[float] = ..., in_flight: _Optional[int] = ..., carbon_g_per_kwh: _Optional[float] = ..., power_w: _Optional[float] = ..., detail: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PolicyDocument(_message.Message):
    __slots__ = ("yaml",)
    YAML_FIELD_NUMBER: _ClassVar[int]
    yaml: str
    def __init__(self, yaml: _Optional[str] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("backend",)
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    backend: str
    def __init__(self, backend: _Optional[str] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model", "sla_ms", "sla_class", "batch_size")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SLA_MS_FIELD_NUMBER: _ClassVar[int]
    SLA_CLASS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    model: str
    sla_ms: float
    sla_class: str
    batch_size: int
    def __init__(self, model: _Optional[str] = ..., sla_ms: _Optional[float] = ..., sla_class: _Optional[str] = ..., batch_size: _Optional[int] = ...) -> None: ...

class RouteVerdict(_message.Message):
    __slots__ = ("route", "predicted_ms", "feasible", "chosen", "why")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_MS_FIELD_NUMBER: _ClassVar[int]
    FEASIBLE_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    route: RouteStatus
    predicted_ms: float
    feasible: bool
    chosen: bool
    why: str
    def __init__(self, route: _Optional[_Union[RouteStatus, _Mapping]] = ..., predicted_ms: _Optional[float] = ..., feasible: _Optional[bool] = ..., chosen: _Optional[bool] = ..., why: _Optional[str] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("model", "reason", "chosen_backend", "chosen_variant", "predicted_ms", "cost_usd_per_1m", "message", "sla_ms", "percentile", "objective", "on_infeasible", "routes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_BACKEND_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_VARIANT_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_MS_FIELD_NUMBER: _ClassVar[int]
    COST_USD_PER_1M_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SLA_MS_FIELD_NUMBER: _ClassVar[int]
    PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    ON_INFEASIBLE_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    reason: str
    chosen_backend: str
    chosen_variant: str
    predicted_ms: float
    cost_usd_per_1m: float
    message: str
    sla_ms: float
    percentile: float
    objective: str
    on_infeasible: str
    routes: _containers.RepeatedCompositeFieldContainer[RouteVerdict]
    def __init__(self, model: _Optional[str] = ..., reason: _Optional[str] = ..., chosen_backend: _Optional[str] = ..., chosen_variant: _Optional[str] = ..., predicted_ms: _Optional[float] = ..., cost_usd_per_1m: _Optional[float] = ..., message: _Optional[str] = ..., sla_ms: _Optional[float] = ..., percentile: _Optional[float] = ..., objective: _Optional[str] = ..., on_infeasible: _Optional[str] = ..., routes: _Optional[_Iterable[_Union[RouteVerdict, _Mapping]]] = ...) -> None: ...

class ListBackendsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BackendRequest(_message.Message):
    __slots__ = ("backend",)
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    backend: str
    def __init__(self, backend: _Optional[str] = ...) -> None: ...

class BackendProcess(_message.Message):
    __slots__ = ("backend", "pid", "supervised", "held_down", "status", "address", "price_usd_per_hour", "restarts", "detail", "carbon_g_per_kwh", "power_w")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    SUPERVISED_FIELD_NUMBER: _ClassVar[int]
    HELD_DOWN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PRICE_USD_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    CARBON_G_PER_KWH_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    backend: str
    pid: int
    supervised: bool
    held_down: bool
    status: str
    address: str
    price_usd_per_hour: float
    restarts: int
    detail: str
    carbon_g_per_kwh: float
    power_w: float
    def __init__(self, backend: _Optional[str] = ..., pid: _Optional[int] = ..., supervised: _Optional[bool] = ..., held_down: _Optional[bool] = ..., status: _Optional[str] = ..., address: _Optional[str] = ..., price_usd_per_hour: _Optional[float] = ..., restarts: _Optional[int] = ..., detail: _Optional[str] = ..., carbon_g_per_kwh: _Optional[float] = ..., power_w: _Optional[float] = ...) -> None: ...

class ListBackendsResponse(_message.Message):
    __slots__ = ("backends",)
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    backends: _containers.RepeatedCompositeFieldContainer[BackendProcess]
    def __init__(self, backends: _Optional[_Iterable[_Union[BackendProcess, _Mapping]]] = ...) -> None: ...

class GetRoutingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Routing(_message.Message):
    __slots__ = ("name", "available")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    available: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., available: _Optional[_Iterable[str]] = ...) -> None: ...
