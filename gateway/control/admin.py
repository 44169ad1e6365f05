"""The admin API (`switchyard.admin.Admin`, gRPC on port 8003): routes, prices,
carbon intensity, policies, drains, `explain`, the routing rule in force, and killing and
restarting launched backend workers (failure drills), behind a bearer token.

The token comes from the environment variable SWITCHYARD_ADMIN_TOKEN, else from
the file the fleet names (`gateway.admin_token_file`, created with a random
token when missing, readable by its owner only). With neither, the admin API
does not start. It listens with `gateway.tls` (TLS, or mTLS with a client CA);
without it, only on a loopback address (gateway.server refuses anything else), so
the token does not cross a network in plaintext.

A protocol edge: imports grpc and the generated admin protobuf; of the data plane, only
the routing core's views.
"""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import yaml
from pydantic import ValidationError

from backends.protocol.errors import InvalidInput, Unauthenticated
from backends.protocol.status import aborts_with_status
from gateway.config import PoliciesSettings
from gateway.control.admin_token import NOT_SHARED, TOKEN_ENV
from gateway.control.plane import BackendProcess, Control, check_price
from gateway.routing.fleet import BackendState, FleetState, Route
from gateway.routing.router import ROUTING, RouteRequest, carbon_g, cost_usd, explain
from protos import admin_pb2 as apb
from protos import admin_pb2_grpc

log = logging.getLogger("switchyard.control")

SERVICE = "switchyard.admin.Admin"


def route_status(route: Route, shares: dict[str, float], now_s: float) -> apb.RouteStatus:
    state = route.state
    total = shares.get(route.model, 0.0)
    carbon = carbon_g(route)
    est = route.estimate
    rtt = state.network.rtt_ms
    return apb.RouteStatus(
        backend=route.backend,
        model=route.model,
        variant=route.variant,
        default_variant=route.default,
        hardware_class=state.hardware_class,
        status=state.status,
        detail=state.last_error,
        price_usd_per_hour=state.price_usd_per_hour,
        predicted_p50_ms=rtt + est.p50_ms,
        predicted_p99_ms=rtt + est.p99_ms,
        observed_p50_ms=route.observed.p50_ms if route.observed.samples else 0.0,
        observed_p99_ms=route.observed.p99_ms if route.observed.samples else 0.0,
        in_flight=state.in_flight,
        slots=state.slots,
        requests=route.requests,
        failures=route.failures,
        traffic_share=route.recent_requests(now_s) / total if total else 0.0,
        cost_usd_per_1m=cost_usd(route) * 1e6,
        carbon_g_per_1m=-1.0 if carbon is None else carbon * 1e6,
        samples=est.samples,
        address=state.address,
        carbon_g_per_kwh=_known(state.carbon_g_per_kwh),
        power_w=_known(state.power_w),
    )


def _known(value: float | None) -> float:
    """A figure that may be unknown, as the admin messages carry it (negative: unknown)."""
    return -1.0 if value is None else value


def _shares(fleet: FleetState, now_s: float) -> dict[str, float]:
    """Per model, its routes' recent attempts (the denominator of each route's share)."""
    totals: dict[str, float] = {}
    for route in fleet.all_routes():
        totals[route.model] = totals.get(route.model, 0.0) + route.recent_requests(now_s)
    return totals


def _backend_status(state: BackendState) -> apb.BackendStatus:
    return apb.BackendStatus(
        backend=state.name,
        status=state.status,
        price_usd_per_hour=state.price_usd_per_hour,
        in_flight=state.in_flight,
        carbon_g_per_kwh=_known(state.carbon_g_per_kwh),
        power_w=_known(state.power_w),
        detail=state.last_error,
        address=state.address,
    )


def without_routes(fleet: FleetState, model: str) -> list[BackendState]:
    """The fleet's backends with no route at all (never ready: their models are not
    known), in fleet order; with `model`, those that may hold it (the fleet file names
    no models for them, or names it)."""
    routed = {r.backend for r in fleet.all_routes()}
    return [
        state
        for name, state in fleet.backends.items()
        if name not in routed
        and (not model or not state.expected_models or model in state.expected_models)
    ]


def _backend_process(process: BackendProcess) -> apb.BackendProcess:
    state, worker = process.state, process.worker
    return apb.BackendProcess(
        backend=state.name,
        pid=0 if worker is None else worker.pid,
        supervised=worker is not None,
        held_down=worker is not None and worker.held,
        status=state.status,
        address=state.address,
        price_usd_per_hour=state.price_usd_per_hour,
        restarts=0 if worker is None else worker.restarts,
        detail=state.last_error,
        carbon_g_per_kwh=_known(state.carbon_g_per_kwh),
        power_w=_known(state.power_w),
    )


def _routing(name: str) -> apb.Routing:
    return apb.Routing(name=name, available=ROUTING)


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def _guarded(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Checks the bearer token before the method runs."""

    async def wrapper(self: AdminServicer, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        metadata = dict(context.invocation_metadata() or ())
        given = str(metadata.get("authorization", ""))
        expected = f"Bearer {self.token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise Unauthenticated(
                "admin API needs `authorization: Bearer <token>` "
                f"(the gateway's {TOKEN_ENV} or its admin token file)"
            )
        return await method(self, request, context)

    return wrapper


@aborts_with_status
class AdminServicer(admin_pb2_grpc.AdminServicer):
    """The admin API. Every method checks the token (`_guarded`); the control plane's
    errors (SwitchyardErrors: an unknown backend, one the gateway does not launch, a
    worker that did not stop or start in time, bad input) are the caller's status
    through the one mapping, backends.protocol.status."""

    def __init__(self, control: Control, token: str, clock: Callable[[], float]) -> None:
        self.control = control
        self.fleet = control.fleet
        self.token = token
        self.clock = clock

    async def _shared(self, context: grpc.aio.ServicerContext) -> None:
        """Answers a change once its store has it; when a shared store cannot take it,
        the change stands here and the answer's trailing metadata says why
        (`NOT_SHARED`)."""
        why = await self.control.share()
        if why is not None:
            text = why.encode("ascii", "replace").decode("ascii")
            context.set_trailing_metadata(((NOT_SHARED, f"applied here, not shared yet: {text}"),))

    @_guarded
    async def ListRoutes(
        self, request: apb.ListRoutesRequest, context: grpc.aio.ServicerContext
    ) -> apb.ListRoutesResponse:
        now = self.clock()
        shares = _shares(self.fleet, now)
        routes = self.fleet.routes(request.model) if request.model else self.fleet.all_routes()
        if request.model and not routes and request.model not in self.fleet.known_models():
            raise InvalidInput(f"unknown model {request.model!r}")
        return apb.ListRoutesResponse(
            routes=[route_status(r, shares, now) for r in routes],
            without_routes=[_backend_status(b) for b in without_routes(self.fleet, request.model)],
        )

    @_guarded
    async def SetPrice(
        self, request: apb.SetPriceRequest, context: grpc.aio.ServicerContext
    ) -> apb.BackendStatus:
        state = self.control.override_price(request.backend, request.usd_per_hour)
        await self._shared(context)
        return _backend_status(state)

    @_guarded
    async def SetCarbon(
        self, request: apb.SetCarbonRequest, context: grpc.aio.ServicerContext
    ) -> apb.BackendStatus:
        """On every gateway sharing the store, as a price is; with a local store, kept
        in the state file across restarts, as a price is."""
        check_price(request.g_per_kwh, "g_per_kwh")
        check_price(request.power_w, "power_w")
        state = self.control.backend(request.backend)
        power_w = request.power_w or state.power_w
        if power_w is None:
            raise InvalidInput(
                f"backend {request.backend!r} has no power_w in the fleet file: give power_w "
                "too (carbon intensity alone gives no carbon per request)"
            )
        state = self.control.override_carbon(state.name, request.g_per_kwh, power_w)
        await self._shared(context)
        return _backend_status(state)

    @_guarded
    async def GetPolicy(
        self, request: apb.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> apb.PolicyDocument:
        return apb.PolicyDocument(yaml=policies_yaml(self.control.policies.settings))

    @_guarded
    async def SetPolicy(
        self, request: apb.PolicyDocument, context: grpc.aio.ServicerContext
    ) -> apb.PolicyDocument:
        self.control.override_policies(parse_policies(request.yaml))
        await self._shared(context)
        return apb.PolicyDocument(yaml=policies_yaml(self.control.policies.settings))

    @_guarded
    async def Drain(
        self, request: apb.DrainRequest, context: grpc.aio.ServicerContext
    ) -> apb.BackendStatus:
        state = self.control.set_drained(request.backend, True)
        await self._shared(context)
        return _backend_status(state)

    @_guarded
    async def Undrain(
        self, request: apb.DrainRequest, context: grpc.aio.ServicerContext
    ) -> apb.BackendStatus:
        state = self.control.set_drained(request.backend, False)
        await self._shared(context)
        return _backend_status(state)

    @_guarded
    async def Explain(
        self, request: apb.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> apb.ExplainResponse:
        model = request.model
        if model not in self.fleet.known_models():
            raise InvalidInput(f"unknown model {model!r}")
        if not math.isfinite(request.sla_ms):
            raise InvalidInput(f"sla_ms must be a finite number, not {request.sla_ms}")
        if request.sla_ms < 0 or request.batch_size < 0:
            raise InvalidInput("sla_ms and batch_size must not be negative")
        route_req = RouteRequest(
            model=model,
            batch_size=max(1, request.batch_size),
            sla_ms=request.sla_ms or None,
            sla_class=request.sla_class or None,
        )
        policy = self.control.policies.resolve(route_req)
        decision, verdicts = explain(route_req, self.fleet.routes(model), policy, self.clock())
        now = self.clock()
        shares = _shares(self.fleet, now)
        reply = apb.ExplainResponse(
            model=model,
            reason=decision.reason,
            predicted_ms=decision.predicted_ms if decision.route is not None else 0.0,
            cost_usd_per_1m=decision.cost_usd / route_req.batch_size * 1e6,
            message=decision.message,
            sla_ms=policy.latency_ms,
            percentile=policy.percentile,
            objective=policy.objective,
            on_infeasible=policy.on_infeasible,
        )
        if decision.route is not None:
            reply.chosen_backend = decision.route.backend
            reply.chosen_variant = decision.route.variant
        for v in verdicts:
            reply.routes.add(
                route=route_status(v.route, shares, now),
                predicted_ms=v.predicted_ms,
                feasible=v.feasible,
                chosen=v.chosen,
                why=v.why,
            )
        return reply

    @_guarded
    async def ListBackends(
        self, request: apb.ListBackendsRequest, context: grpc.aio.ServicerContext
    ) -> apb.ListBackendsResponse:
        return apb.ListBackendsResponse(
            backends=[_backend_process(p) for p in self.control.processes()]
        )

    @_guarded
    async def KillBackend(
        self, request: apb.BackendRequest, context: grpc.aio.ServicerContext
    ) -> apb.BackendProcess:
        return _backend_process(await self.control.kill(request.backend))

    @_guarded
    async def RestartBackend(
        self, request: apb.BackendRequest, context: grpc.aio.ServicerContext
    ) -> apb.BackendProcess:
        return _backend_process(await self.control.restart(request.backend))

    @_guarded
    async def GetRouting(
        self, request: apb.GetRoutingRequest, context: grpc.aio.ServicerContext
    ) -> apb.Routing:
        return _routing(self.control.routing)

    @_guarded
    async def SetRouting(
        self, request: apb.Routing, context: grpc.aio.ServicerContext
    ) -> apb.Routing:
        name = self.control.set_routing(request.name, "admin API")
        await self._shared(context)
        return _routing(name)


def policies_yaml(settings: PoliciesSettings) -> str:
    return yaml.safe_dump(settings.model_dump(exclude_none=True), sort_keys=False)


def parse_policies(text: str) -> PoliciesSettings:
    """Policies from YAML (the fleet file's `policies` section, or a whole fleet file);
    InvalidInput says what is wrong."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidInput(f"policies are not valid YAML: {exc}") from exc
    if isinstance(data, dict) and "policies" in data:
        data = data["policies"]
    if not isinstance(data, dict):
        raise InvalidInput("policies must be a mapping (default, classes, models)")
    try:
        return PoliciesSettings.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"policies are not valid: {exc}") from exc


def add_to_server(server: grpc.aio.Server, servicer: AdminServicer) -> None:
    admin_pb2_grpc.add_AdminServicer_to_server(servicer, server)
