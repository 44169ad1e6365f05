"""The fleet file: which backends exist, what they cost, which the gateway launches,
and the SLA policies. YAML, validated with pydantic; unknown keys are errors, so a
typo in a fleet file fails loudly instead of becoming a silent default.

Relative paths in a fleet file are relative to the file's folder. With no file,
`switchyard serve` uses the embedded demo fleet (`gateway/demo_fleet.yaml`),
whose repository is `models` under the current directory.

Imports pydantic, YAML and the routing core's policy defaults: no grpc, no protobuf, no
other plane.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.routing.sla import Policy

STATE_URL = re.compile(r"^(redis|rediss|unix)://\S+$")
"""A shared state store's URL (redis-py's forms)."""

HostPort = Annotated[str, Field(pattern=r"^[^\s:]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$")]


class _Strict(BaseModel):
    """Unknown keys are errors, and so is NaN or infinity in any number (a price,
    carbon figure, latency target, percentile or time): NaN compares false with
    everything, so one such value would silently win or lose every comparison."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ListenerTLS(_Strict):
    """TLS on the gateway's client-facing listeners (inference gRPC, admin, and metrics
    with `metrics_tls`). The files are read at start, and again by a new connection
    after any of them changed (certificate rotation without a restart)."""

    cert_file: Path
    """The listener's certificate (PEM), its chain after it."""
    key_file: Path
    """The certificate's private key (PEM)."""
    client_ca_file: Path | None = None
    """CA certificates (PEM) that sign client certificates: when set, every client must
    present a certificate they signed (mTLS); unset: any client may connect."""

    def resolved(self, base_dir: Path) -> ListenerTLS:
        """The same settings with relative paths taken from `base_dir`."""
        return self.model_copy(update=_resolved_paths(self, base_dir))


class BackendTLS(_Strict):
    """TLS on the gateway's calls to a remote backend (mTLS with `cert_file` and
    `key_file`)."""

    ca_file: Path | None = None
    """CA certificates (PEM) that sign the backend's certificate; default: the
    system's roots."""
    cert_file: Path | None = None
    """The gateway's client certificate (PEM) for backends that require one."""
    key_file: Path | None = None
    """The client certificate's private key (PEM)."""
    server_name: str | None = None
    """The name to check the backend's certificate against, when it is not the
    address's host (an IP address, a name behind a load balancer)."""

    @model_validator(mode="after")
    def _pair(self) -> BackendTLS:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls: cert_file and key_file go together (mTLS needs both)")
        return self

    def resolved(self, base_dir: Path) -> BackendTLS:
        """The same settings with relative paths taken from `base_dir`."""
        return self.model_copy(update=_resolved_paths(self, base_dir))


def _resolved_paths(settings: BaseModel, base_dir: Path) -> dict[str, Path]:
    return {
        key: base_dir / value
        for key, value in settings
        if isinstance(value, Path) and not value.is_absolute()
    }


class TracingSettings(_Strict):
    """OpenTelemetry tracing of each request (docs/operations.md, "Tracing"): a span for
    the request, its routing decision and each attempt, children of the caller's W3C
    `traceparent`, which goes on to the backends. Off unless configured. A setting left
    unset follows OpenTelemetry's environment variables, as noted."""

    exporter: Literal["otlp", "file", "none"] | None = None
    """`otlp`: OTLP over gRPC to `endpoint`; `file`: JSON lines appended to `file`;
    `none`: off. Unset: OTEL_TRACES_EXPORTER's (`otlp` or `none`), else off."""
    endpoint: str | None = None
    """The OTLP collector (`http://HOST:4317`; https for TLS). Unset:
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT, else
    http://localhost:4317 (the exporter's other OTEL_EXPORTER_OTLP_* variables apply:
    headers, certificate, timeout)."""
    file: Path | None = None
    """Where the `file` exporter appends its spans, one JSON object a line (relative to
    the fleet file's folder)."""
    service_name: str | None = None
    """The spans' `service.name`. Unset: OTEL_SERVICE_NAME, else `switchyard-gateway`."""
    sample_ratio: float | None = Field(None, ge=0, le=1)
    """The share of requests without a caller's sampled trace context that are traced
    (a caller's `traceparent` decides for its own requests). Unset:
    OTEL_TRACES_SAMPLER_ARG, else 1."""

    @model_validator(mode="after")
    def _file_exporter_needs_file(self) -> TracingSettings:
        if self.exporter == "file" and self.file is None:
            raise ValueError("gateway.tracing: exporter `file` needs `file`, where spans go")
        return self


class GatewaySettings(_Strict):
    listen: HostPort = "127.0.0.1:8001"
    """Open Inference Protocol gRPC endpoint (port 0: any free port)."""
    metrics: HostPort = "127.0.0.1:8002"
    """Prometheus text endpoint, served at /metrics."""
    http: HostPort | None = "127.0.0.1:8000"
    """Open Inference Protocol REST endpoint (HTTP/1.1, Triton's binary tensor data
    extension; port 0: any free port), routed as the gRPC endpoint is; None: off."""
    admin: HostPort = "127.0.0.1:8003"
    """Admin gRPC endpoint (bearer token), for the SRE's controls. Without `tls` it
    must be a loopback address: the gateway refuses to start otherwise."""
    probes: HostPort | None = None
    """Liveness and readiness (grpc.health.v1, ServerLive, ServerReady) answered by
    threads of their own, never waiting behind inference work on the event loop: the
    port for Kubernetes probes (plaintext, as kubelet's gRPC probes are; it tells only
    whether the gateway is ready). None: off (the inference port answers them too)."""
    tls: ListenerTLS | None = None
    """TLS (mTLS with `client_ca_file`) on the inference endpoints (gRPC and REST) and
    the admin endpoint; default: plaintext."""
    metrics_tls: bool = False
    """Serve metrics over TLS too, with `tls`'s files (read again after they change, as
    the other listeners'); default: plaintext, as most Prometheus set-ups scrape."""
    max_message_bytes: int = Field(64 * 1024 * 1024, gt=0)
    """Largest request or response accepted; larger requests get RESOURCE_EXHAUSTED."""
    probe_interval_s: float = Field(1.0, gt=0)
    """How often each backend's readiness and models are probed."""
    probe_timeout_s: float = Field(1.0, gt=0)
    """How long a probe may take before the backend counts as unhealthy."""
    startup_timeout_s: float = Field(60.0, gt=0)
    """How long launched backends may take to start listening."""
    restart_after_failed_probes: int = Field(5, ge=0)
    """A launched worker that was probed ready and then fails this many probes in a row (one
    per `probe_interval_s`, each up to `probe_timeout_s`) is taken for hung (stopped,
    deadlocked), killed with SIGKILL and restarted; 0: never (it rejoins the routes
    once it answers again)."""
    admin_token_file: Path | None = None
    """File holding the admin API's bearer token (created with a random token when
    missing) when the SWITCHYARD_ADMIN_TOKEN environment variable is not set."""
    state_file: Path | None = None
    """Where changes made through the admin API (prices, policies, drains, the routing
    rule) and the price schedule's start are kept, so that a restart restores them;
    default: `state.json` beside `admin_token_file`. With neither, they live in memory
    only."""
    state: str | None = None
    """Where the control state lives: `memory` (this gateway only, forgotten at exit),
    or a Redis store shared by several gateways that route as one
    (`redis://HOST:PORT/DB`, `rediss://` for TLS, `unix:///PATH?db=N`): prices,
    policies, drains and the routing rule set through any gateway's admin API reach
    every gateway within about a second, and only one gateway at a time plays the
    price schedule. Default: `state_file` (a file), else memory."""
    eject_after_failures: int = Field(3, ge=1)
    """Passive outlier detection: consecutive failed or timed-out attempts that eject
    a backend (a refused connection takes it out at once)."""
    eject_base_s: float = Field(1.0, gt=0)
    """First ejection's length; each further ejection in a row doubles it."""
    eject_max_s: float = Field(30.0, gt=0)
    eject_max_share: float = Field(0.5, ge=0, le=1)
    """Most backends out by ejection at once, as a share of the fleet (past it a failing
    backend stays in the routes: the panic threshold). A fleet of one never ejects."""
    eject_success_rate_below: float = Field(0.8, ge=0, le=1)
    """Success-rate ejection: a backend whose attempts over `eject_window_s` succeeded
    less often than this (at least `eject_min_requests` of them) is ejected; 0: off.
    Only failures that originate at the backend count: its error statuses (not the
    caller's own errors) and attempts past their timeout; never a caller's
    cancellation, an expired caller's deadline, a load shed, or a hedge that lost."""
    eject_window_s: float = Field(10.0, gt=0)
    eject_min_requests: int = Field(20, ge=1)
    retry_budget_ratio: float = Field(0.2, ge=0)
    """Retries and hedges, at most, as a share of requests (a token bucket: each request
    deposits this, each retry or hedge takes one)."""
    retry_budget_min_per_s: float = Field(10.0, ge=0)
    """Retries a second allowed whatever the traffic."""
    attempt_timeout_slack_s: float = Field(1.0, ge=0)
    """An attempt still running this long past its route's predicted p99 (as predicted
    when it was sent, queue wait included) counts as a failure at its backend, and the
    request is retried on another route while the attempt keeps running: a hung backend
    (stopped, deadlocked, partitioned) costs a request its route's p99 plus this, not
    its deadline. The default matches the default probe interval; far below it, a busy
    host's stalls (scheduler, garbage collection, a new connection's handshakes) pass
    for hung backends and count against them. 0: off."""
    max_concurrent_rpcs: int = Field(10_000, ge=0)
    """Calls the inference listener takes at once (health and readiness checks among
    them); past it gRPC answers RESOURCE_EXHAUSTED at once. The REST listener holds its
    requests in flight to the same number, past it answering 429 with Retry-After. Set
    it above what the backends' queue limits let through, so inference is shed by the
    queue limits first and probes still get in; 0: no limit."""
    backend_queue_limit: int = Field(256, ge=0)
    """Requests that may wait at each backend beyond its slots (sent, not yet running,
    as the gateway counts them) before the router sends it no more; a request whose
    every route is at its limit is shed at once with RESOURCE_EXHAUSTED. Overridden
    per backend by `queue_limit`."""
    backend_keepalive_s: float = Field(10.0, ge=0)
    """HTTP/2 keepalive pings on the channels to backends while calls are out: a
    connection whose ping goes unanswered for `backend_keepalive_s` is closed and its
    calls fail over; 0: off."""
    backend_streams: int = Field(2, ge=0, le=64)
    """Long-lived ModelStreamInfer streams per backend that forward requests (each
    tagged with an id, answered in any order), taken in turn: less CPU per request on
    the gateway and far less on the worker than one unary call each (BENCHMARKS.md,
    "The gateway's hop"). A backend that serves no streams (KServe) gets unary calls; a
    stream that breaks fails its requests over, and is reopened. 0: one unary call per
    request."""
    load_reports: bool = True
    """Read the load report a Switchyard worker ends each answer with (its queue less
    this gateway's requests: backends.protocol.load) and predict its queue wait from it
    plus what this gateway sent since, so that several gateways sharing a backend do not
    overfill it; the report is cut off the answer either way. false: each gateway goes by
    its own requests alone, as it does for backends that send no reports (KServe,
    Triton). docs/routing.md, "Load reports"."""
    request_overhead_ms: float = Field(0.0, ge=0)
    """Latency an SLA counts outside the gateway's calls to backends: the clients'
    network hop and the gateway's own gRPC handling, as the clients measure it. A
    route is feasible when its predicted latency meets the SLA less this; 0: SLAs are
    met as the gateway sees them."""
    latency_probe_interval_s: float = Field(5.0, ge=0)
    """Routes that got no traffic for this long get one probe inference (zeros of
    the model's input shape), so their latency estimates stay fresh; 0: never (and no
    warm-up)."""
    latency_probe_when_busy: bool = True
    """A route due a latency probe whose backend has no free slot (saturated by its
    other routes' traffic) is probed all the same: the probe goes after the requests
    waiting there and ahead of those that come later, so no route goes unmeasured for
    much longer than `latency_probe_interval_s` plus the time the queue takes to drain.
    Each costs the requests that come while it waits one service time; false: such
    routes wait for a free slot (which a saturated backend never has)."""
    warmup_samples: int = Field(3, ge=0)
    """Latency probes each route takes before the gateway says it is ready (gRPC health,
    ServerReady, the probe port), as its backend becomes ready; 0: ready without them."""
    warmup_timeout_s: float = Field(30.0, gt=0)
    """The longest the warm-up holds readiness back, from the gateway's start: then it
    is ready with whatever routes are measured (a warning names the rest, which start
    from their profiles and are measured by the latency probes)."""
    price_schedule: Path | None = None
    """CSV of price changes replayed against the clock (`offset_s,backend,usd_per_hour`,
    offsets from the gateway's start), such as a spot-price trace."""
    price_schedule_loop: bool = False
    """Replay the schedule again from the start when it ends."""
    watch_config_s: float = Field(1.0, ge=0)
    """How often the fleet file is checked for changes (prices, carbon and policies
    apply at once); 0: never."""
    coalesce_in_flight: int = Field(1, ge=0)
    """Calls in flight per backend and model before further requests for that model
    wait and travel together as one batched call (their batches concatenated, the
    answer split back). Under load this divides the per-call cost of both hops; idle
    it adds nothing. Raise it for backends that run several calls at once well (a
    large GPU); 0 sends every request on its own."""
    tracing: TracingSettings = TracingSettings()
    """OpenTelemetry tracing (`exporter`, `endpoint`, `file`, `service_name`,
    `sample_ratio`); off by default."""

    @model_validator(mode="after")
    def _metrics_tls_needs_tls(self) -> GatewaySettings:
        if self.metrics_tls and self.tls is None:
            raise ValueError("gateway.metrics_tls needs gateway.tls (its certificate and key)")
        return self

    @field_validator("state")
    @classmethod
    def _state_store(cls, value: str | None) -> str | None:
        if value is None or value == "memory" or STATE_URL.match(value):
            return value
        raise ValueError(
            f"gateway.state {value!r} is not a store: `memory`, `redis://HOST:PORT/DB`, "
            "`rediss://HOST:PORT/DB` or `unix:///PATH?db=N`"
        )

    @model_validator(mode="after")
    def _one_state_store(self) -> GatewaySettings:
        if self.state is not None and self.state_file is not None:
            raise ValueError(
                f"gateway.state ({self.state}) and gateway.state_file name two stores: "
                "set one of them"
            )
        return self


class ModelBatching(_Strict):
    """Dynamic batching of one model in a launched worker."""

    max_batch_rows: int = Field(0, ge=0)
    """Most rows merged into one execution (1: none); 0: the variant's max_batch_size."""
    max_queue_delay_us: int = Field(0, ge=0)
    """How long a batch may wait for more requests."""


class LaunchSettings(_Strict):
    """A backend the gateway starts and supervises as a local worker process."""

    threads: int = Field(1, ge=1)
    """Inference threads: the instance size the worker stands for, and its slots (at
    most this many batches run at once across its models and variants)."""
    models: list[str] | None = None
    """Models it serves; default: every model in the repository."""
    emulate_latency_ms: float = Field(0.0, ge=0)
    """Added service time per row, standing for slower hardware (marked in metadata)."""
    max_queue_delay_us: int = Field(0, ge=0)
    """Dynamic batching: how long a batch may wait for more requests."""
    max_batch_rows: int = Field(0, ge=0)
    """Dynamic batching: most rows merged into one execution (1: no merging, each
    request runs on its own); 0: the variant's max_batch_size."""
    batching: dict[str, ModelBatching] | None = None
    """Dynamic batching per model, in place of the two settings above for that model."""
    max_queue: int | None = Field(None, ge=1)
    """Most requests waiting per model variant; one more is shed at once with
    RESOURCE_EXHAUSTED and a retry hint (`switchyard backend --max-queue`); default:
    the worker's, 128."""
    cpus: list[int] | None = None
    """Pin the worker to these CPU numbers, so instance sizes do not share cores."""
    precisions: list[Literal["fp32", "fp16", "int8"]] | None = None
    """Precisions it may serve; default: any variant whose accuracy check passed."""


DNS_NAME = r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*\.?$"
"""A DNS name (letters, digits, `-` and `_` in dot-separated labels, a trailing dot allowed)."""


class DiscoverySettings(_Strict):
    """A backend group found by DNS: every A and AAAA record of `dns` is one backend
    at that address and `port` (a Kubernetes headless Service's pods), resolved again
    every `interval_s`. A new address joins the routes once its readiness probe
    passes; an address gone from the answer drains (no new requests, those in flight
    finish) and then leaves. Each gateway resolves the name itself."""

    dns: str = Field(pattern=DNS_NAME, max_length=254)
    """The name to resolve, e.g. `workers.switchyard.svc.cluster.local`."""
    port: int = Field(ge=1, le=65535)
    """The port every address serves the Open Inference Protocol on."""
    interval_s: float = Field(5.0, gt=0)
    """How often the name is resolved again."""
    timeout_s: float = Field(2.0, gt=0)
    """How long one resolution may take (both record types, retries included) before it
    counts as failed."""
    nameserver: HostPort | None = None
    """The DNS server to ask (`HOST:PORT`, an IP address); default: the system's
    resolver (/etc/resolv.conf)."""
    empty_after_s: float = Field(30.0, ge=0)
    """How long the name must keep answering NXDOMAIN or no records before the group
    counts as empty and its backends drain; until then the last known set keeps
    serving (a Service deleted and made again, a zone being reloaded). A failed
    resolution (a timeout, SERVFAIL, a refused query) always keeps the last known set.
    0: empty at the first such answer."""


class BackendSettings(_Strict):
    """One backend (`address`), or a group of them found by DNS (`discovery`): each
    discovered address is a backend with the group's settings."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Unique name, shown in responses (`switchyard_backend`), metrics and the admin API.
    For a `discovery` group, the group's name: each discovered address is a backend named
    after it and the address (`NAME-10-1-2-3`, `NAME-fd00--1`)."""
    address: HostPort | None = None
    """Where it serves the Open Inference Protocol; port 0 with `launch`: any free port.
    Exactly one of `address` and `discovery`."""
    discovery: DiscoverySettings | None = None
    """Find the group's backends by DNS instead of one `address`; each inherits this
    entry's hardware class, price, carbon, slots, queue limit, models and TLS (with
    `tls`, the certificates are checked against `tls.server_name`, else the DNS
    name). Not with `launch`."""
    hardware_class: str = "cpu"
    """What it runs on, e.g. `cpu-x86-64-v4-2c`, `gpu-cuda-h100`."""
    queue_limit: int | None = Field(None, ge=0)
    """Requests that may wait here beyond its slots; default: gateway.backend_queue_limit."""
    slots: int | None = Field(None, ge=1)
    """Requests it runs at once, for queue-wait predictions; default: the launched
    worker's threads, else 1."""
    price_usd_per_hour: float = Field(0.0, ge=0)
    """What it costs, live (the admin API and price schedules change it at run time)."""
    carbon_g_per_kwh: float | None = Field(None, ge=0)
    """Carbon intensity of its power, for the carbon objective."""
    power_w: float | None = Field(None, ge=0)
    """Power draw while busy, for the carbon objective."""
    models: list[str] | None = None
    """Models to expect on it, for v2 servers without the RepositoryIndex extension
    (KServe, MLServer); default: asked from the backend."""
    launch: LaunchSettings | None = None
    """Start and supervise it as a local worker process."""
    tls: BackendTLS | None = None
    """Call this remote backend over TLS; default: plaintext. Launched workers always
    speak mTLS with the gateway, with certificates of its own private CA."""

    @model_validator(mode="after")
    def _address_or_discovery(self) -> BackendSettings:
        if (self.address is None) == (self.discovery is None):
            raise ValueError(
                f"backend {self.name!r}: set exactly one of `address` (one backend) and "
                "`discovery` (a group found by DNS)"
            )
        if self.discovery is not None and self.launch is not None:
            raise ValueError(
                f"backend {self.name!r}: `launch` starts one local worker; a `discovery` "
                "group's backends are found by DNS, not launched"
            )
        return self

    @property
    def fixed_address(self) -> str:
        """The `address` of a backend that has one (not a `discovery` group)."""
        if self.address is None:
            raise ValueError(f"backend {self.name!r} is a discovery group: no fixed address")
        return self.address

    @model_validator(mode="after")
    def _tls_remote_only(self) -> BackendSettings:
        if self.tls is not None and self.launch is not None:
            raise ValueError(
                f"backend {self.name!r}: tls is for remote backends; launched workers "
                "always use the gateway's own certificates"
            )
        return self


class PolicySettings(_Strict):
    """An SLA policy; in `classes` and `models`, unset fields inherit the default."""

    latency_ms: float | None = Field(None, gt=0)
    percentile: float | None = Field(None, gt=0, le=100)
    objective: Literal["cost", "carbon", "latency"] | None = None
    on_infeasible: Literal["fastest", "reject"] | None = None
    max_cost_usd_per_1m: float | None = Field(None, gt=0)
    retries: int | None = Field(None, ge=0, le=10)
    """Further attempts on the next-best routes after a failed one (default: `Policy.retries`)."""
    hedge: bool | None = None
    """Send a second attempt to the next route when the first runs past its predicted
    p95; the first answer wins and the other is cancelled (default: `Policy.hedge`, off)."""


def _built_in_default() -> PolicySettings:
    """The default policy as the routing core defines it (`Policy`'s own defaults)."""
    p = Policy()
    return PolicySettings(
        latency_ms=p.latency_ms,
        percentile=p.percentile,
        objective=p.objective,
        on_infeasible=p.on_infeasible,
    )


class PoliciesSettings(_Strict):
    default: PolicySettings = Field(default_factory=_built_in_default)
    """Unset fields take the routing core's defaults (`gateway.routing.router.Policy`):
    p99 <= 100 ms, objective cost, fastest when infeasible, 2 retries, no hedging."""
    classes: dict[str, PolicySettings] = {}
    models: dict[str, PolicySettings] = {}


FeedKind = Literal["aws-spot", "gcp-billing", "schedule", "electricity-maps"]
PRICE_FEEDS: tuple[FeedKind, ...] = ("aws-spot", "gcp-billing", "schedule")
"""Feed kinds that set prices; `electricity-maps` sets carbon intensity."""

_SELECTOR_FIELDS: dict[FeedKind, tuple[set[str], set[str]]] = {
    # kind: (fields it requires, fields it also allows)
    "aws-spot": ({"instance_type"}, {"availability_zone", "product_description", "multiplier"}),
    "gcp-billing": ({"sku_id"}, {"multiplier"}),
    "schedule": (set(), {"key", "multiplier"}),
    "electricity-maps": ({"zone"}, set()),
}
_MATCH_FIELDS = {
    "instance_type",
    "availability_zone",
    "product_description",
    "sku_id",
    "key",
    "zone",
    "multiplier",
}


class FeedSelector(_Strict):
    """Which backends one entry of a feed prices (or gives carbon intensity): the
    backends it covers (`backends` or `hardware_class`, one of them) and which entry
    of the feed's response is theirs (the fields of the feed's kind)."""

    backends: list[str] | None = Field(None, min_length=1)
    """The backends it covers, by name (a `discovery` group's name covers every
    backend found for it)."""
    hardware_class: str | None = None
    """Or every backend of this hardware class."""
    instance_type: str | None = None
    """aws-spot: the EC2 instance type (`InstanceType`), e.g. `p5.48xlarge`. Required."""
    availability_zone: str | None = None
    """aws-spot: the zone (`AvailabilityZone`); unset: any zone, the dearest price in
    force among them."""
    product_description: str | None = None
    """aws-spot: `ProductDescription`; default `Linux/UNIX`."""
    sku_id: str | None = None
    """gcp-billing: the SKU (`skuId`) whose hourly unit price applies. Required."""
    key: str | None = None
    """schedule: the value of the rows' `backend` column that applies; default: the
    backend's own name."""
    zone: str | None = None
    """electricity-maps: the zone (`zone`, e.g. `DE`, `US-CAL-CISO`). Required."""
    multiplier: float = Field(1.0, gt=0)
    """Price feeds: the backend's price is the feed's price times this (its share of an
    instance, the vCPUs of a per-vCPU SKU). Several gcp-billing selectors on one
    backend add up (a machine's vCPU SKU plus its memory SKU)."""

    @model_validator(mode="after")
    def _covers_one_way(self) -> FeedSelector:
        if (self.backends is None) == (self.hardware_class is None):
            raise ValueError("a feed selector names `backends` or a `hardware_class`, one of them")
        return self

    def covers(self, name: str, hardware_class: str) -> bool:
        """Whether it covers the backend (or `discovery` group) `name`."""
        if self.backends is not None:
            return name in self.backends
        return hardware_class == self.hardware_class


class FeedSettings(_Strict):
    """A live feed of prices or carbon intensity, polled from an HTTP URL or a file, whose
    readings apply to the backends its selectors cover. A backend whose feed has had no
    good poll for `stale_after_s` falls back to its list price (`price_usd_per_hour`)
    or carbon figure (`carbon_g_per_kwh`); a response that cannot be read keeps the last
    good readings."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Unique name, shown in metrics (`switchyard_feed_up{feed=...}`) and logs."""
    kind: FeedKind
    """The response's format: `aws-spot` (EC2 DescribeSpotPriceHistory's JSON),
    `gcp-billing` (Cloud Billing catalog SKUs), `schedule` (CSV or JSON lines of
    `time,backend,usd_per_hour`), `electricity-maps` (`/v3/carbon-intensity/latest`)."""
    url: str | None = Field(None, pattern=r"^https?://\S+$")
    """Where to poll it (http:// or https://). Exactly one of `url` and `file`."""
    file: Path | None = None
    """Or a file to read at each poll (written by a job of its own)."""
    interval_s: float = Field(60.0, gt=0)
    """How often it is polled; a failed poll is retried sooner (1 s, doubling, at most
    this)."""
    stale_after_s: float = Field(900.0, gt=0)
    """With no good poll for this long, its backends fall back to their list figures
    (`switchyard_feed_stale` 1, a log line) until a poll succeeds again."""
    timeout_s: float = Field(10.0, gt=0)
    """How long one fetch may take."""
    auth_token_file: Path | None = None
    """A file holding the token to send (read at each poll, so it can be rotated);
    never the token itself in the fleet file."""
    auth_header: str = Field("Authorization", pattern=r"^[A-Za-z0-9-]+$")
    """The header that carries the token: `Authorization` sends `Bearer TOKEN`, any
    other (`auth-token` for Electricity Maps, `X-Goog-Api-Key` for Google) the token
    alone."""
    selectors: list[FeedSelector] = Field(min_length=1)
    """Which backends the feed covers, and which of its entries is each one's."""

    @model_validator(mode="after")
    def _source_and_selectors(self) -> FeedSettings:
        if (self.url is None) == (self.file is None):
            raise ValueError(f"feed {self.name!r}: set exactly one of `url` and `file`")
        if self.stale_after_s < self.interval_s:
            raise ValueError(
                f"feed {self.name!r}: stale_after_s ({self.stale_after_s:g}) must be at "
                f"least interval_s ({self.interval_s:g})"
            )
        required, allowed = _SELECTOR_FIELDS[self.kind]
        for index, selector in enumerate(self.selectors):
            given = {f for f in _MATCH_FIELDS if f in selector.model_fields_set}
            missing = sorted(required - given)
            extra = sorted(given - required - allowed)
            where = f"feed {self.name!r} ({self.kind}) selector {index}"
            if missing:
                raise ValueError(f"{where}: needs {', '.join(missing)}")
            if extra:
                raise ValueError(f"{where}: {', '.join(extra)} is not for {self.kind} feeds")
        return self

    @property
    def sets_prices(self) -> bool:
        """It sets prices (else carbon intensity)."""
        return self.kind in PRICE_FEEDS

    def resolved(self, base_dir: Path) -> FeedSettings:
        """The same settings with relative paths taken from `base_dir`."""
        return self.model_copy(update=_resolved_paths(self, base_dir))


def _check_feeds(feeds: list[FeedSettings], backends: list[BackendSettings]) -> None:
    """ValueError unless every selector covers some backend, and no backend gets its
    price (or carbon) from two feeds, or from two selectors of one feed (except
    gcp-billing's, which add up)."""
    names = {b.name for b in backends}
    feed_names = [f.name for f in feeds]
    duplicates = sorted({n for n in feed_names if feed_names.count(n) > 1})
    if duplicates:
        raise ValueError(f"feed names must be unique: {', '.join(duplicates)}")
    owner: dict[tuple[bool, str], str] = {}
    for feed in feeds:
        covered: set[str] = set()
        for index, selector in enumerate(feed.selectors):
            unknown = sorted(set(selector.backends or ()) - names)
            if unknown:
                raise ValueError(
                    f"feed {feed.name!r} selector {index}: unknown backends {', '.join(unknown)}"
                )
            these = {b.name for b in backends if selector.covers(b.name, b.hardware_class)}
            if not these:
                raise ValueError(
                    f"feed {feed.name!r} selector {index}: no backend has hardware_class "
                    f"{selector.hardware_class!r}"
                )
            twice = sorted(these & covered)
            if twice and feed.kind != "gcp-billing":
                raise ValueError(
                    f"feed {feed.name!r}: backends {', '.join(twice)} are covered by two of "
                    "its selectors"
                )
            covered |= these
        for name in sorted(covered):
            other = owner.setdefault((feed.sets_prices, name), feed.name)
            if other != feed.name:
                what = "price" if feed.sets_prices else "carbon intensity"
                raise ValueError(
                    f"backend {name!r} gets its {what} from two feeds: {other} and {feed.name}"
                )


class FleetConfig(_Strict):
    repository: Path = Path("models")
    """Model repository directory used by launched backends."""
    gateway: GatewaySettings = GatewaySettings()
    backends: list[BackendSettings] = Field(min_length=1)
    policies: PoliciesSettings = PoliciesSettings()
    feeds: list[FeedSettings] = []
    """Live price and carbon feeds (docs/fleet-file.md, `feeds`)."""

    @model_validator(mode="after")
    def _feeds(self) -> FleetConfig:
        _check_feeds(self.feeds, self.backends)
        return self

    @model_validator(mode="after")
    def _unique(self) -> FleetConfig:
        names = [b.name for b in self.backends]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"backend names must be unique: {', '.join(duplicates)}")
        fixed = [
            b.address
            for b in self.backends
            if b.address is not None and not b.address.endswith(":0")
        ]
        clashes = sorted({a for a in fixed if fixed.count(a) > 1})
        if clashes:
            raise ValueError(f"backend addresses must be unique: {', '.join(clashes)}")
        return self


class ConfigError(Exception):
    """The fleet file cannot be read or is not valid."""


Model = TypeVar("Model", bound=BaseModel)


def validate_yaml(text: str, model: type[Model], error: type[Exception], source: str) -> Model:
    """`text` as YAML, validated as `model`; `error` naming `source` when it is not
    YAML, not a mapping, or not valid (for fleet files and scenario files alike)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{source}: expected a mapping at the top level")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(f"{source}: {exc}") from exc


def parse_fleet(text: str, base_dir: Path, source: str = "fleet file") -> FleetConfig:
    config = validate_yaml(text, FleetConfig, ConfigError, source)
    if not config.repository.is_absolute():
        config = config.model_copy(update={"repository": base_dir / config.repository})
    updates: dict[str, object] = {}
    for key in ("admin_token_file", "price_schedule", "state_file"):
        value = getattr(config.gateway, key)
        if value is not None and not value.is_absolute():
            updates[key] = base_dir / value
    if config.gateway.tls is not None:
        updates["tls"] = config.gateway.tls.resolved(base_dir)
    trace_file = config.gateway.tracing.file
    if trace_file is not None and not trace_file.is_absolute():
        updates["tracing"] = config.gateway.tracing.model_copy(
            update={"file": base_dir / trace_file}
        )
    if updates:
        config = config.model_copy(update={"gateway": config.gateway.model_copy(update=updates)})
    if config.feeds:
        feeds = [f.resolved(base_dir) for f in config.feeds]
        config = config.model_copy(update={"feeds": feeds})
    if any(b.tls is not None for b in config.backends):
        backends = [
            b if b.tls is None else b.model_copy(update={"tls": b.tls.resolved(base_dir)})
            for b in config.backends
        ]
        config = config.model_copy(update={"backends": backends})
    return config


def load_fleet(path: Path | None) -> FleetConfig:
    """Reads a fleet file; None gives the embedded demo fleet."""
    if path is None:
        text = resources.files("gateway").joinpath("demo_fleet.yaml").read_text()
        return parse_fleet(text, Path.cwd(), "embedded demo fleet")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read fleet file {path}: {exc}") from exc
    return parse_fleet(text, path.resolve().parent, str(path))


def fleet_hardware(path: Path) -> list[tuple[str, str]]:
    """Each backend of the fleet file at `path` as (name, hardware class): what
    `switchyard compile --fleet` builds for (the compiler is handed this reader, since
    backends import nothing from the gateway). ValueError when the file does not load."""
    try:
        return [(b.name, b.hardware_class) for b in load_fleet(path).backends]
    except ConfigError as exc:
        raise ValueError(str(exc)) from exc
