"""`switchyard serve`: assembles the gateway from a fleet file.

Starts the launched backend workers, the prober, the Open Inference Protocol
server (with `grpc.health.v1`), and the Prometheus endpoint; prints where to
send requests; stops everything cleanly on SIGINT/SIGTERM. The listeners speak TLS
with `gateway.tls`; launched workers speak mTLS with certificates of the gateway's
private CA, and remote backends TLS with their `tls` (gateway.security).

The one module that assembles every plane; only the CLI and the tests import it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from backends.files import write_text_atomically
from backends.process import die_with_parent, stop_on_signals, use_uvloop
from backends.protocol.errors import InvalidInput
from gateway.config import ConfigError, FleetConfig, load_fleet
from gateway.control.admin import AdminServicer, add_to_server
from gateway.control.admin_token import admin_token
from gateway.control.discovery import (
    Discovery,
    DiscoveryMetrics,
    backend_state,
    discovery_group,
    group_tls,
)
from gateway.control.feeds.poller import ControlFeedTarget, FeedPoller
from gateway.control.plane import (
    Control,
    file_stamp,
    read_price_schedule,
    replay_prices,
    watch_fleet_file,
)
from gateway.control.shared_state import RedisStateStore, run_leased
from gateway.control.state import StateStore, state_store
from gateway.control.supervisor import Supervisor
from gateway.routing.fleet import BackendState, Ejection, FleetState
from gateway.routing.policy import PolicyBook
from gateway.routing.router import Chooser, cost_usd
from gateway.security import (
    ChannelSecurity,
    WorkerPKI,
    backend_security,
    is_loopback,
    server_credentials,
    ssl_server_context,
)
from gateway.serving.metrics import GatewayMetrics, serve_metrics_tls
from gateway.serving.pool import BackendPool
from gateway.serving.prober import Prober
from gateway.serving.probes import ProbePort
from gateway.serving.rest import RestApp, RestServer
from gateway.serving.servicer import SERVICE, GatewayServicer, generic_handler

log = logging.getLogger("switchyard.gateway")


class StartupError(Exception):
    """The gateway cannot start (a port in use, a missing repository)."""


@dataclass(slots=True)
class Gateway:
    """A running gateway and its parts."""

    config: FleetConfig
    fleet: FleetState
    pool: BackendPool
    prober: Prober
    supervisor: Supervisor
    server: grpc.aio.Server
    port: int
    metrics_port: int
    registry: CollectorRegistry
    servicer: GatewayServicer
    health: health.aio.HealthServicer
    probes: ProbePort | None
    rest: RestServer | None
    control: Control
    admin_server: grpc.aio.Server | None
    admin_port: int | None
    shared_state: RedisStateStore | None
    """The store shared with other gateways (`gateway.state: redis://...`); None: none."""
    _metrics_server: object
    _stop: asyncio.Event
    _tasks: list[asyncio.Task[None]]
    discovery: Discovery
    """The DNS discovery of the fleet's `discovery` groups (none: it does nothing)."""

    @property
    def address(self) -> str:
        return f"{self.config.gateway.listen.rsplit(':', 1)[0]}:{self.port}"

    @property
    def admin_address(self) -> str | None:
        if self.admin_port is None:
            return None
        return f"{self.config.gateway.admin.rsplit(':', 1)[0]}:{self.admin_port}"

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await self.discovery.stop()
        if self.shared_state is not None:
            await self.shared_state.close()
        if self.admin_server is not None:
            await self.admin_server.stop(grace=0.5)
        if self.rest is not None:
            await self.rest.stop()
        await self.server.stop(grace=2.0)
        self.servicer.stop_tracing()
        await self.prober.stop()
        # Nothing is forwarded any more: the streams to the backends close before the
        # launched workers are told to stop, which would otherwise wait out their
        # grace for those streams to end.
        await self.pool.close()
        await self.supervisor.stop()
        if self.probes is not None:
            self.probes.stop()
        shutdown = getattr(self._metrics_server, "shutdown", None)
        if shutdown is not None:
            shutdown()


def forget_backend_metrics(metrics: GatewayMetrics, state: BackendState) -> None:
    """Drops every series of a backend that left the fleet (its gauges and counters)."""
    metrics.forget_backend(state.name)


def check_admin_listen(config: FleetConfig) -> None:
    """ConfigError when the admin API would listen beyond this host in plaintext."""
    settings = config.gateway
    if settings.tls is None and not is_loopback(settings.admin):
        raise ConfigError(
            f"gateway.admin {settings.admin} is not a loopback address: the admin API "
            "listens beyond this host only over TLS (set gateway.tls, or listen on "
            "127.0.0.1)"
        )


def build_fleet(config: FleetConfig) -> FleetState:
    settings = config.gateway
    return FleetState(
        [
            backend_state(b, b.fixed_address, settings)
            for b in config.backends
            if b.discovery is None
        ],
        Ejection(
            settings.eject_after_failures,
            settings.eject_base_s,
            settings.eject_max_s,
            settings.eject_max_share,
            settings.eject_success_rate_below,
            settings.eject_window_s,
            settings.eject_min_requests,
        ),
        load_reports=settings.load_reports,
    )


async def start_gateway(
    config: FleetConfig,
    config_path: Path | None = None,
    reuse_port: bool = False,
    caller_group: str | None = None,
) -> Gateway:
    """Starts every part; returns once launched backends listen and the server is up.
    `reuse_port`: the inference, REST, admin and probes ports are bound with
    SO_REUSEPORT, shared with the other processes of a `--processes` group (otherwise a
    port another program holds fails the start); `caller_group`: that group's name in
    this process's requests to workers (backends.protocol.load)."""
    settings = config.gateway
    loaded_stamp = None if config_path is None else file_stamp(config_path)
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    fleet = build_fleet(config)
    token = admin_token(config)
    if token is not None:
        check_admin_listen(config)
    # Certificates first: a file that does not load fails before anything listens.
    listener_credentials = None if settings.tls is None else server_credentials(settings.tls)
    admin_credentials = None if settings.tls is None else server_credentials(settings.tls)
    remote = {
        b.name: backend_security(tls) for b in config.backends if (tls := group_tls(b)) is not None
    }
    static = {b.name for b in config.backends if b.discovery is None}
    launched = {b.name for b in config.backends if b.launch is not None}
    pki = WorkerPKI(time.time) if launched else None

    def security(address: str) -> ChannelSecurity | None:
        for b in fleet.backends.values():
            if b.address == address:
                if b.name in launched and pki is not None:
                    return pki.security
                group = None if b.name in static else discovery_group(config.backends, b.name)
                return remote.get(b.name if group is None else group.name)
        return None

    pool = BackendPool(
        settings.max_message_bytes,
        security,
        settings.backend_keepalive_s,
        settings.backend_streams,
    )
    health_servicer = health.aio.HealthServicer()
    probes = None
    if settings.probes is not None:
        try:
            probes = ProbePort(settings.probes, reuse_port=reuse_port)
        except RuntimeError as exc:
            raise StartupError(f"cannot serve probes on {settings.probes}: {exc}") from exc
    loop = asyncio.get_running_loop()
    background: set[asyncio.Task[None]] = set()

    def spawn(coro: Coroutine[Any, Any, None]) -> None:
        task = loop.create_task(coro)
        background.add(task)
        task.add_done_callback(background.discard)

    def refresh() -> None:
        for b in fleet.backends.values():
            metrics.healthy.labels(b.name).set(1 if b.healthy else 0)
            metrics.available.labels(b.name).set(1 if b.available else 0)
            metrics.price.labels(b.name).set(b.price_usd_per_hour)
            metrics.queue_depth.labels(b.name).set(b.queued)
        for r in fleet.all_routes():
            labels = (r.backend, r.model, r.variant)
            rtt = r.state.network.rtt_ms
            for quantile, predicted, observed in (
                ("0.5", r.estimate.p50_ms, r.observed.p50_ms),
                ("0.99", r.estimate.p99_ms, r.observed.p99_ms),
            ):
                metrics.route_latency.labels(*labels, "predicted", quantile).set(rtt + predicted)
                if r.observed.samples:
                    metrics.route_latency.labels(*labels, "observed", quantile).set(observed)
            metrics.route_cost.labels(*labels).set(cost_usd(r) * 1e6)
        for model in fleet.known_models():
            metrics.model_ready.labels(model).set(1 if fleet.model_ready(model) else 0)
        control.publish_sla_targets()  # a model first learnt from a probe gets its targets
        ready = fleet.any_ready()
        if probes is not None:
            probes.set_ready(ready)
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE):
            spawn(health_servicer.set(service, status))

    prober = Prober(
        fleet,
        pool,
        time.monotonic,
        settings.probe_interval_s,
        settings.probe_timeout_s,
        refresh,
        settings.latency_probe_interval_s,
        settings.max_message_bytes,
        on_probe=lambda name, ok, error: supervisor.probed(name, ok, error),
        warmup_samples=settings.warmup_samples,
        warmup_timeout_s=settings.warmup_timeout_s,
        probe_when_busy=settings.latency_probe_when_busy,
    )

    def on_exit(name: str, reason: str) -> None:
        fleet.record_failure(name, time.monotonic(), reason)
        refresh()

    def on_address(name: str, address: str) -> None:
        fleet.set_address(name, address)
        prober.forget(address)
        spawn(prober.probe(fleet.backends[name]))

    servicer = GatewayServicer(
        fleet,
        pool,
        PolicyBook(config.policies, settings.request_overhead_ms),
        metrics,
        coalesce_in_flight=settings.coalesce_in_flight,
    )
    if caller_group is not None:
        servicer.transport.name_caller(caller_group)
    prober.caller = servicer.transport.caller
    servicer.dispatcher.guard(settings, fleet.throttle)
    servicer.trace_as(settings.tracing)  # off unless configured

    def set_policies(book: PolicyBook) -> None:
        servicer.policies = book

    def set_chooser(chooser: Chooser) -> None:
        servicer.chooser = chooser

    async def probe_now(name: str) -> None:
        await prober.probe(fleet.backends[name])
        refresh()

    store: StateStore
    shared_state = None
    if settings.state is not None and settings.state != "memory":
        try:
            shared_state = RedisStateStore.from_url(
                settings.state, lambda up: metrics.state_store_up.set(1 if up else 0)
            )
        except InvalidInput as exc:
            raise ConfigError(str(exc)) from exc
        await shared_state.connect()
        store = shared_state
    else:
        store = state_store(settings)
        metrics.state_store_up.set(1)
    supervisor = Supervisor(
        config.backends,
        config.repository,
        on_address,
        on_exit,
        pki,
        settings.restart_after_failed_probes,
        settings.tracing,
    )
    control = Control(
        fleet,
        metrics,
        lambda: servicer.policies,
        set_policies,
        set_chooser=set_chooser,
        config=config,
        wall_clock=time.time,
        store=store,
        supervisor=supervisor,
        probe=probe_now,
    )
    control.restore()

    async def release(state: BackendState) -> None:
        """A backend gone from discovery has drained: its channel and metrics go."""
        if all(b.address != state.address for b in fleet.backends.values()):
            prober.forget(state.address)
            await pool.discard(state.address)
        if state.name not in fleet.backends:
            forget_backend_metrics(metrics, state)

    discovery = Discovery(
        config.backends,
        settings,
        control,
        DiscoveryMetrics(registry),
        time.monotonic,
        probe=probe_now,
        release=release,
    )
    log.info("admin API changes kept in %s", control.store.where)
    if shared_state is not None:
        shared_state.start(control.apply_state)
    schedule = read_price_schedule(settings.price_schedule) if settings.price_schedule else []
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            # Calls gRPC accepted but has not yet handed to the servicer wait in its
            # backlog; past 1,000 it cancels them at random (CANCELLED, which a caller
            # cannot act on). A deep backlog instead: each call reaches the concurrency
            # limit or a queue limit and is answered RESOURCE_EXHAUSTED.
            ("grpc.server.max_pending_requests", 20_000),
            ("grpc.server.max_pending_requests_hard_limit", 40_000),
        ],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
    )
    server.add_generic_rpc_handlers((generic_handler(servicer),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # Bind both ports before launching anything: a port in use fails fast.
    try:
        if listener_credentials is None:
            port = server.add_insecure_port(settings.listen)
        else:
            port = server.add_secure_port(settings.listen, listener_credentials)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {settings.listen}: {exc}") from exc
    host, metrics_port_text = settings.metrics.rsplit(":", 1)
    try:
        metrics_server: Any
        if settings.metrics_tls and settings.tls is not None:
            # The listener's context: its files are read again after they change.
            metrics_server = serve_metrics_tls(
                host, int(metrics_port_text), registry, ssl_server_context(settings.tls)
            )
        else:
            metrics_server, _ = start_http_server(
                int(metrics_port_text), addr=host, registry=registry
            )
    except OSError as exc:
        raise StartupError(f"cannot serve metrics on {settings.metrics}: {exc}") from exc

    rest = None
    if settings.http is not None:
        try:
            rest = RestServer(
                RestApp(servicer, settings.max_message_bytes),
                settings.http,
                None if settings.tls is None else ssl_server_context(settings.tls),
                settings.max_concurrent_rpcs or None,
                reuse_port=reuse_port,
            )
        except OSError as exc:
            raise StartupError(f"cannot serve REST on {settings.http}: {exc}") from exc

    admin_server = None
    admin_port = None
    if token is None:
        log.warning(
            "admin API off: set SWITCHYARD_ADMIN_TOKEN or gateway.admin_token_file to enable it"
        )
    else:
        admin_server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if reuse_port else 0)])
        add_to_server(admin_server, AdminServicer(control, token, time.monotonic))
        try:
            if admin_credentials is None:
                admin_port = admin_server.add_insecure_port(settings.admin)
            else:
                admin_port = admin_server.add_secure_port(settings.admin, admin_credentials)
        except RuntimeError as exc:
            raise StartupError(f"cannot serve the admin API on {settings.admin}: {exc}") from exc

    supervisor.start()
    late = await supervisor.wait_listening(settings.startup_timeout_s)
    if late:
        log.error("backends not listening after %.0fs: %s", settings.startup_timeout_s, late)
    await discovery.resolve_all()  # discovered backends are probed and warmed up with the rest
    await prober.probe_all()
    await prober.warm_up()  # the backends up by now are measured before it returns
    prober.start()
    await server.start()
    if rest is not None:
        await rest.start()
    if admin_server is not None:
        await admin_server.start()
    if probes is not None:
        probes.start()
    refresh()
    stop = asyncio.Event()
    tasks = []
    if config_path is not None and settings.watch_config_s > 0:
        tasks.append(
            loop.create_task(
                watch_fleet_file(
                    control, config_path, config, settings.watch_config_s, stop, loaded_stamp
                )
            )
        )
    if discovery.groups:
        tasks.append(loop.create_task(discovery.run(stop)))
    if schedule:
        # With a shared store, one gateway at a time plays the schedule (a lease).
        lease = None if shared_state is None else shared_state.lease("price-schedule")
        tasks.append(
            loop.create_task(
                run_leased(
                    lease,
                    lambda until: replay_prices(
                        control, schedule, time.monotonic, settings.price_schedule_loop, until
                    ),
                    stop,
                )
            )
        )
    for feed in config.feeds:
        poller = FeedPoller(
            feed,
            ControlFeedTarget(control, feed.sets_prices),
            metrics,
            clock=time.monotonic,
            wall_clock=time.time,
        )
        # With a shared store, one gateway at a time polls a feed (a lease) and its prices
        # or carbon figures are shared.
        feed_lease = None if shared_state is None else shared_state.lease(f"feed:{feed.name}")
        tasks.append(loop.create_task(run_leased(feed_lease, poller.run, stop)))
    return Gateway(
        config=config,
        fleet=fleet,
        pool=pool,
        prober=prober,
        supervisor=supervisor,
        server=server,
        port=port,
        metrics_port=metrics_server.server_port,
        registry=registry,
        servicer=servicer,
        health=health_servicer,
        probes=probes,
        rest=rest,
        control=control,
        admin_server=admin_server,
        admin_port=admin_port,
        shared_state=shared_state,
        _metrics_server=metrics_server,
        _stop=stop,
        _tasks=tasks,
        discovery=discovery,
    )


def describe(gateway: Gateway) -> str:
    settings = gateway.config.gateway
    metrics_host = settings.metrics.rsplit(":", 1)[0]
    scheme = "https" if settings.metrics_tls else "http"
    over = ""
    if settings.tls is not None:
        over = ", mTLS" if settings.tls.client_ca_file is not None else ", TLS"
    lines = [
        f"switchyard gateway listening on {gateway.address} (Open Inference Protocol gRPC{over})",
    ]
    if gateway.rest is not None and settings.http is not None:
        http_host = settings.http.rsplit(":", 1)[0]
        web = "https" if settings.tls is not None else "http"
        lines.append(
            f"  REST:     {web}://{http_host}:{gateway.rest.port}/v2 (Open Inference Protocol)"
        )
    lines += [
        f"  metrics:  {scheme}://{metrics_host}:{gateway.metrics_port}/metrics",
        f"  admin:    {gateway.admin_address or 'off (no admin token)'}"
        + ("  (`switchyard admin routes`)" if gateway.admin_address else ""),
    ]
    if gateway.probes is not None and settings.probes is not None:
        probe_host = settings.probes.rsplit(":", 1)[0]
        lines.append(f"  probes:   {probe_host}:{gateway.probes.port} (health and readiness)")
    for b in gateway.fleet.backends.values():
        state = "ready" if b.healthy else f"not ready ({b.last_error or 'starting'})"
        models = ", ".join(sorted(b.models)) or "-"
        lines.append(
            f"  backend {b.name:<12} {b.address:<18} {b.hardware_class:<20} "
            f"${b.price_usd_per_hour:.4f}/h  {state}  models: {models}"
        )
    lines.append(
        '  try:      .venv/bin/python -c "import tritonclient.grpc as g; '
        f"print(g.InferenceServerClient('{gateway.address}').get_model_repository_index())\""
    )
    if gateway.rest is not None and settings.http is not None and settings.tls is None:
        http_host = settings.http.rsplit(":", 1)[0]
        lines.append(
            f"            curl -s -X POST http://{http_host}:{gateway.rest.port}/v2/repository/index"
        )
    return "\n".join(lines)


async def serve(
    config: FleetConfig,
    ready_file: Path | None,
    config_path: Path | None = None,
    reuse_port: bool = False,
    caller_group: str | None = None,
) -> None:
    gateway = await start_gateway(config, config_path, reuse_port, caller_group)
    # What start-up built lives as long as the process: kept out of the collector's way,
    # a full collection under a flood holds the event loop 2-3 ms, not 45-55 ms.
    gc.collect()
    gc.freeze()
    print(describe(gateway), flush=True)
    if ready_file is not None:
        await asyncio.to_thread(
            write_text_atomically,
            ready_file,
            json.dumps(
                {
                    "address": gateway.address,
                    "metrics_port": gateway.metrics_port,
                    "admin": gateway.admin_address,
                    "probes_port": None if gateway.probes is None else gateway.probes.port,
                    "http_port": None if gateway.rest is None else gateway.rest.port,
                    "backends": {
                        b.name: {"address": b.address, "healthy": b.healthy}
                        for b in gateway.fleet.backends.values()
                    },
                    "pids": gateway.supervisor.pids(),
                }
            ),
        )
    await stop_on_signals().wait()
    log.info("shutting down")
    await gateway.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="fleet file (YAML); default: the embedded demo fleet",
    )
    parser.add_argument("--listen", default=None, help="override gateway.listen (HOST:PORT)")
    parser.add_argument("--metrics", default=None, help="override gateway.metrics (HOST:PORT)")
    parser.add_argument(
        "--http", default=None, help="override gateway.http, the REST endpoint (HOST:PORT)"
    )
    parser.add_argument(
        "--ready-file",
        type=Path,
        default=None,
        help="write a JSON description here once serving (for scripts and tests)",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG shows the workers' logs")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="gateway processes sharing the inference, REST, admin and probes ports "
        "(SO_REUSEPORT) under one parent that supervises them and the launched workers and "
        "serves the merged /metrics; N > 1 shares control state over gateway.state, or a "
        "private redis-server when that is memory (docs/operations.md)",
    )
    parser.add_argument(
        "--process-of",
        type=int,
        default=None,
        metavar="PID",
        help=argparse.SUPPRESS,  # one process of a --processes group started by PID
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        config = load_fleet(args.config)
    except ConfigError as exc:
        print(f"switchyard: {exc}", file=sys.stderr)
        return 2
    overrides = {
        k: v
        for k, v in (
            ("listen", args.listen),
            ("metrics", args.metrics),
            ("http", args.http),
        )
        if v
    }
    if overrides:
        config = config.model_copy(update={"gateway": config.gateway.model_copy(update=overrides)})
    if not config.repository.is_dir() and any(b.launch for b in config.backends):
        print(
            f"switchyard: model repository {config.repository} does not exist "
            "(`make models` builds the demo repository)",
            file=sys.stderr,
        )
        return 2
    if args.processes < 1:
        print("switchyard: --processes must be at least 1", file=sys.stderr)
        return 2
    if args.processes > 1:
        from gateway.control import processes

        return processes.run(config, args.processes, args.ready_file, args.log_level)
    caller_group = None
    if args.process_of is not None:
        from gateway.control.processes import CALLER_GROUP_ENV

        die_with_parent(args.process_of)
        caller_group = os.environ.get(CALLER_GROUP_ENV) or None
    use_uvloop()
    try:
        asyncio.run(
            serve(
                config,
                args.ready_file,
                args.config,
                reuse_port=args.process_of is not None,
                caller_group=caller_group,
            )
        )
    except (StartupError, ConfigError) as exc:
        print(f"switchyard: {exc}", file=sys.stderr)
        return 1
    return 0
