"""`switchyard load`: plays a scenario against a live gateway, open loop.

    switchyard load --target HOST:PORT [--target HOST:PORT ...] --scenario FILE [--short]
                    [--report DIR] [--baseline fastest-only ...] [--json]

Arrivals come from the scenario exactly as `simulate` draws them (Poisson,
constant, bursts or a recorded trace; surges multiply the rate), scaled by the
scenario's `live.rate_scale`, and each is sent when it is due whether or not
earlier ones were answered (open loop: a slow gateway gets more work in flight,
not fewer requests). Every request is a real Open Inference Protocol
ModelInferRequest (zeros of the shapes the gateway's ModelMetadata gives, the
stream's `sla_class` / `sla_ms` as parameters), serialized once per stream and
sent as bytes over a few reused channels; answers are decoded only for the route
and cost the gateway reports.

Events run at their times through the gateway's admin API: set a price, drain
or undrain, kill a backend (its supervised worker gets SIGKILL and stays down)
and restart it, replace the policies. Before the run the scenario's policies and
prices are applied (for the backends the live fleet has); after it the gateway's
own are put back and any backend the run killed is restarted.

The generator says when it could not keep up: each request's lateness (send time
minus due time) is recorded, and the run is flagged when its p99 passes
report.MAX_LAG_P99_MS or it sent under report.MIN_SENT_FRACTION of the asked rate. It
runs in its own process (uvloop when installed; `--cpus` pins it) so its CPU is its own
budget.

Several `--target`s (gateways sharing their control state) take the requests in turn,
round-robin, as a load balancer in front of them would; the events and baselines go
through the admin API named (the store carries them to the others).

With `--baseline NAME` the same arrivals are replayed with the gateway's routing
switched to that baseline (fastest-only, cheapest-only, round-robin,
least-loaded), so savings are measured side by side on the same machine.

A client: imports grpc and generated protobuf (the data plane's and the admin API's
messages), and none of the gateway's running parts (servicer, dispatcher).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from backends.process import use_uvloop
from backends.protocol.codec import zeros_request
from backends.protocol.errors import InvalidInput
from gateway.config import ConfigError, PoliciesSettings
from gateway.control.admin_client import AdminCallError, AdminClient, admin_access, no_token
from gateway.loadtest import report as loadreport
from gateway.loadtest.records import NO_ROUTE, FiredEvent, Records, Stream
from gateway.routing.fleet import ModelInfo
from gateway.routing.policy import PolicyBook
from gateway.routing.router import RouteRequest
from gateway.security import ChannelSecurity, client_security, secure_channel
from gateway.serving.prober import describe
from gateway.sim.arrivals import Trace, make_trace
from gateway.sim.scenario import (
    MultiplyRate,
    Scenario,
    ScenarioError,
    SetCarbonEvent,
    ShareCheck,
    action_of,
    load_scenario,
)
from protos import admin_pb2 as apb
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
CHANNELS = 2
"""Channels the requests are spread over (HTTP/2 connections)."""
CALL_TIMEOUT_S = 30.0
DRAIN_S = 35.0
"""How long after the last send the run waits for outstanding answers."""
READY_TIMEOUT_S = 30.0
VIEW_HZ = 2.0
WINDOW_S = 2.0
"""The live view's rates and shares are over the last this many seconds."""
MAX_MESSAGE = 64 * 1024 * 1024


class LoadError(Exception):
    """The run cannot start (or an event cannot be applied): a clear message."""


# ---- the plan: arrivals and requests ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    scenario: Scenario
    """As played: shortened when asked, rates scaled for the live fleet."""
    streams: list[Stream]
    trace: Trace
    asked_rate_per_s: float


def make_plan(scenario: Scenario, short: bool, rate_scale: float = 1.0) -> Plan:
    if short:
        scenario = scenario.shortened()
    scale = scenario.live.rate_scale * rate_scale
    scenario = scenario.model_copy(
        update={
            "traffic": [
                t.model_copy(update={"rate_per_s": t.rate_per_s * scale}) for t in scenario.traffic
            ]
        }
    )
    book = PolicyBook(scenario.policies)
    streams = []
    for t in scenario.traffic:
        policy = book.resolve(RouteRequest(t.model, t.batch_size, t.sla_ms, t.sla_class))
        live_model = scenario.live.models.get(t.model, t.model)
        streams.append(Stream(live_model, t.class_name, policy.latency_ms, policy.percentile))
    trace = make_trace(scenario)
    return Plan(scenario, streams, trace, len(trace) / scenario.duration_s)


# ---- the admin API: events, setup and restore ----------------------------------------


@dataclass(slots=True)
class Saved:
    """The gateway's settings before the run, put back after it."""

    policy_yaml: str
    prices: dict[str, float]
    routing: str | None
    carbon: dict[str, tuple[float, float]] = field(default_factory=dict)
    """The backends whose carbon figures the run sets: (gCO2eq/kWh, W) before it."""


async def backend_prices(admin: AdminClient) -> dict[str, float]:
    reply = await admin.call("ListRoutes", apb.ListRoutesRequest())
    return {r.backend: r.price_usd_per_hour for r in reply.routes}


async def backend_carbon(admin: AdminClient) -> dict[str, tuple[float, float]]:
    """Per backend: (gCO2eq/kWh, W), each negative when unknown."""
    reply = await admin.call("ListRoutes", apb.ListRoutesRequest())
    return {r.backend: (r.carbon_g_per_kwh, r.power_w) for r in reply.routes}


def carbon_changes(scenario: Scenario) -> set[str]:
    """The backends whose carbon figures a run sets: those with them in the scenario,
    and those its set_carbon events name."""
    named = {b.name for b in scenario.backends if b.power_w is not None}
    return named | {e.set_carbon.backend for e in scenario.events if isinstance(e, SetCarbonEvent)}


async def set_up(admin: AdminClient, plan: Plan, routing: str, console: Console) -> Saved:
    from gateway.control.admin import policies_yaml

    policy = await admin.call("GetPolicy", apb.GetPolicyRequest())
    prices = await backend_prices(admin)
    saved = Saved(policy.yaml, prices, None)
    carbon = await backend_carbon(admin) if carbon_changes(plan.scenario) else {}
    with contextlib.suppress(AdminCallError):
        saved.routing = (await admin.call("GetRouting", apb.GetRoutingRequest())).name
    if routing != "switchyard" or saved.routing not in (None, routing):
        if saved.routing is None:
            raise LoadError(f"the gateway at {admin.target} cannot switch its routing to {routing}")
        await admin.call("SetRouting", apb.Routing(name=routing))
    await admin.call("SetPolicy", apb.PolicyDocument(yaml=policies_yaml(plan.scenario.policies)))
    missing = []
    for backend in plan.scenario.backends:
        if backend.name in prices:
            await admin.call(
                "SetPrice",
                apb.SetPriceRequest(backend=backend.name, usd_per_hour=backend.price_usd_per_hour),
            )
            if backend.power_w is not None:
                saved.carbon[backend.name] = carbon[backend.name]
                g_per_kwh = backend.carbon_g_per_kwh
                await admin.call(
                    "SetCarbon",
                    apb.SetCarbonRequest(
                        backend=backend.name,
                        g_per_kwh=0.0 if g_per_kwh is None else g_per_kwh,
                        power_w=backend.power_w,
                    ),
                )
        else:
            missing.append(backend.name)
    if missing:
        console.print(
            f"not in the live fleet (modelled only): {', '.join(missing)}", style="yellow"
        )
    return saved


async def restore(admin: AdminClient, saved: Saved, killed: set[str]) -> None:
    for backend in sorted(killed):
        with contextlib.suppress(AdminCallError):
            await admin.call("RestartBackend", apb.BackendRequest(backend=backend))
    for backend, price in saved.prices.items():
        with contextlib.suppress(AdminCallError):
            await admin.call("SetPrice", apb.SetPriceRequest(backend=backend, usd_per_hour=price))
    for backend, (g_per_kwh, power_w) in saved.carbon.items():
        if g_per_kwh >= 0 and power_w > 0:  # else the admin API cannot unset it: left as set
            with contextlib.suppress(AdminCallError):
                request = apb.SetCarbonRequest(
                    backend=backend, g_per_kwh=g_per_kwh, power_w=power_w
                )
                await admin.call("SetCarbon", request)
    with contextlib.suppress(AdminCallError):
        await admin.call("SetPolicy", apb.PolicyDocument(yaml=saved.policy_yaml))
    if saved.routing is not None:
        with contextlib.suppress(AdminCallError):
            await admin.call("SetRouting", apb.Routing(name=saved.routing))


async def wait_ready(admin: AdminClient, backends: Sequence[str], timeout_s: float) -> list[str]:
    """Waits until every named backend's routes are ready; returns those that are not."""
    deadline = time.monotonic() + timeout_s
    while True:
        reply = await admin.call("ListRoutes", apb.ListRoutesRequest())
        status: dict[str, bool] = {}
        for r in reply.routes:
            status[r.backend] = status.get(r.backend, True) and r.status == "ready"
        waiting = [b for b in backends if not status.get(b, False)]
        if not waiting or time.monotonic() >= deadline:
            return waiting
        await asyncio.sleep(0.25)


class AdminEvents:
    """Scenario events played on a live gateway through its admin API; each says what
    was done (raises AdminCallError when its call failed, LoadError with no admin API)."""

    def __init__(self, admin: AdminClient | None, killed: set[str]) -> None:
        self._admin = admin
        self.killed = killed

    @property
    def admin(self) -> AdminClient:
        if self._admin is None:
            raise LoadError("no admin API")
        return self._admin

    async def set_price(self, backend: str, usd_per_hour: float) -> str:
        request = apb.SetPriceRequest(backend=backend, usd_per_hour=usd_per_hour)
        await self.admin.call("SetPrice", request)
        return f"price {backend} {usd_per_hour:g} USD/h"

    async def set_carbon(self, backend: str, g_per_kwh: float) -> str:
        request = apb.SetCarbonRequest(backend=backend, g_per_kwh=g_per_kwh)
        await self.admin.call("SetCarbon", request)
        return f"carbon {backend} {g_per_kwh:g} g/kWh"

    async def kill(self, backend: str) -> str:
        reply = await self.admin.call("KillBackend", apb.BackendRequest(backend=backend))
        self.killed.add(backend)
        return f"kill -9 {backend}" + (f" (pid {reply.pid})" if reply.pid else "")

    async def restart(self, backend: str) -> str:
        await self.admin.call("RestartBackend", apb.BackendRequest(backend=backend))
        self.killed.discard(backend)
        return f"restart {backend}"

    async def drain(self, backend: str, drained: bool) -> str:
        await self.admin.call("Drain" if drained else "Undrain", apb.DrainRequest(backend=backend))
        return f"{'drain' if drained else 'undrain'} {backend}"

    async def set_policy(self, policies: PoliciesSettings) -> str:
        from gateway.control.admin import policies_yaml

        await self.admin.call("SetPolicy", apb.PolicyDocument(yaml=policies_yaml(policies)))
        return "policies replaced"

    async def multiply_rate(self, surge: MultiplyRate) -> str:
        # Already in the arrivals.
        return f"rate x{surge.factor:g} for {surge.for_s:g} s"


# ---- one run ------------------------------------------------------------------------


class Run:
    """One open-loop run of a plan against the gateway at `targets` (several: each takes
    the requests in turn)."""

    def __init__(
        self,
        plan: Plan,
        targets: str | Sequence[str],
        payloads: list[bytes],
        security: ChannelSecurity | None = None,
    ) -> None:
        self.plan = plan
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        self.payloads = payloads
        self.security = security
        """How the channels to the gateway are secured (None: plaintext)."""
        n = len(plan.trace)
        self.records = Records(
            streams=plan.streams,
            routes=[],
            statuses=["OK"],
            send_s=np.full(n, np.nan),
            scheduled_s=plan.trace.times.copy(),
            stream=plan.trace.streams.copy(),
            latency_ms=np.full(n, np.nan),
            status=np.zeros(n, dtype=np.int64),
            route=np.full(n, NO_ROUTE, dtype=np.int64),
            cost_usd=np.zeros(n),
            answered=np.zeros(n, dtype=np.bool_),
        )
        self._route_index: dict[tuple[str, str], int] = {}
        self._status_index = {"OK": 0}
        self.sent = 0
        self.outstanding = 0
        self.events: list[FiredEvent] = []
        self.killed: set[str] = set()
        self.started = 0.0
        self.done = asyncio.Event()

    def _route(self, backend: str, variant: str) -> int:
        key = (backend, variant)
        index = self._route_index.get(key)
        if index is None:
            index = self._route_index[key] = len(self.records.routes)
            self.records.routes.append(f"{backend}/{variant or 'default'}")
        return index

    def _status(self, name: str) -> int:
        index = self._status_index.get(name)
        if index is None:
            index = self._status_index[name] = len(self.records.statuses)
            self.records.statuses.append(name)
        return index

    async def _one(self, call: Any, i: int, payload: bytes) -> None:
        rec = self.records
        sent = time.perf_counter()
        try:
            raw = await call(payload, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            rec.latency_ms[i] = (time.perf_counter() - sent) * 1000.0
            rec.status[i] = self._status(exc.code().name)
        except Exception as exc:  # any client failure is this request's outcome
            rec.latency_ms[i] = (time.perf_counter() - sent) * 1000.0
            rec.status[i] = self._status(f"CLIENT_{type(exc).__name__}")
        else:
            rec.latency_ms[i] = (time.perf_counter() - sent) * 1000.0
            params = pb.ModelInferResponse.FromString(raw).parameters
            backend = (
                params["switchyard_backend"].string_param
                if "switchyard_backend" in params
                else self.targets[i % len(self.targets)]
            )
            variant = (
                params["switchyard_variant"].string_param if "switchyard_variant" in params else ""
            )
            rec.route[i] = self._route(backend, variant)
            if "switchyard_cost_usd" in params:
                with contextlib.suppress(ValueError):
                    rec.cost_usd[i] = float(params["switchyard_cost_usd"].string_param)
        finally:
            rec.answered[i] = not math.isnan(rec.latency_ms[i])
            self.outstanding -= 1
            if self.outstanding == 0 and self.sent == len(rec):
                self.done.set()

    async def _events(self, admin: AdminClient | None) -> None:
        loop = asyncio.get_running_loop()
        for event in sorted(self.plan.scenario.events, key=lambda e: e.at_s):
            delay = self.started + event.at_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            at = loop.time() - self.started
            action = action_of(event)
            if admin is None and action != "multiply_rate":
                self.events.append(FiredEvent(at, action, False, "no admin API"))
                continue
            try:
                label = await event.apply(AdminEvents(admin, self.killed))
                self.events.append(FiredEvent(at, label))
            except (LoadError, AdminCallError) as exc:
                self.events.append(FiredEvent(at, action, False, str(exc)))

    async def run(self, admin: AdminClient | None, view: LiveView | None) -> float:
        """Sends every arrival when due and waits for the answers; returns how long
        sending took (the scenario's duration, or longer when the generator fell behind)."""
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            # Each channel its own connection, not one shared subchannel.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        # Request i goes to targets[i % len(targets)]: channel c of each target in turn.
        channels = [
            secure_channel(target, self.security, options)
            for _ in range(CHANNELS)
            for target in self.targets
        ]
        calls = [c.unary_unary(INFER_METHOD) for c in channels]
        loop = asyncio.get_running_loop()
        times: list[float] = self.plan.trace.times.tolist()
        streams: list[int] = self.plan.trace.streams.tolist()
        payloads = self.payloads
        send_s = self.records.send_s
        n = len(times)
        tasks: set[asyncio.Task[None]] = set()
        # Everything made so far (modules, the plan's arrays, the payloads) lives for the
        # whole run: frozen out of the collector's sight, a full collection during the run
        # scans only what the run makes. Unfrozen, one took 30-100 ms on a busy machine,
        # and every send due meanwhile went late.
        gc.collect()
        gc.freeze()
        self.started = loop.time()
        events = asyncio.ensure_future(self._events(admin))
        viewer = asyncio.ensure_future(view.run(self)) if view is not None else None
        try:
            for i in range(n):
                due = self.started + times[i]
                now = loop.time()
                if due > now:
                    await asyncio.sleep(due - now)
                    now = loop.time()
                send_s[i] = now - self.started
                self.outstanding += 1
                self.sent = i + 1
                task = loop.create_task(self._one(calls[i % len(calls)], i, payloads[streams[i]]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if n == 0:
                self.done.set()
            sending_s = max(self.plan.scenario.duration_s, loop.time() - self.started)
            rest = self.started + self.plan.scenario.duration_s - loop.time()
            if rest > 0:
                await asyncio.sleep(rest)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), DRAIN_S)
            await events
            return sending_s
        finally:
            gc.unfreeze()
            for task in list(tasks):
                task.cancel()
            events.cancel()
            if viewer is not None:
                viewer.cancel()
            for channel in channels:
                await channel.close()


# ---- the live view ------------------------------------------------------------------


class LiveView:
    """Rate, SLA attainment and routing shares while the run goes (rich)."""

    def __init__(self, console: Console, title: str) -> None:
        self.console = console
        self.title = title

    def render(self, run: Run) -> Group:
        rec = run.records
        loop_now = asyncio.get_running_loop().time() - run.started
        k = run.sent
        send = rec.send_s[:k]
        recent = send >= loop_now - WINDOW_S
        answered = rec.answered[:k]
        lat = rec.latency_ms[:k]
        ok = answered & (rec.status[:k] == 0)
        duration = run.plan.scenario.duration_s
        due = int(np.searchsorted(run.plan.trace.times, loop_now))
        head = Table.grid(padding=(0, 2))
        head.add_row(
            f"[bold]{self.title}[/]",
            f"{min(loop_now, duration):5.1f} / {duration:g} s",
            f"asked {due / max(loop_now, 1e-9):7.1f}/s",
            f"sent {int(recent.sum()) / WINDOW_S:7.1f}/s (last {WINDOW_S:g} s)",
            f"in flight {run.outstanding}",
            f"behind {max(0, due - k)}",
            f"errors {int((answered & ~ok).sum())}",
        )
        classes = Table(title="SLA attainment so far (last 2 s)", expand=False)
        classes.add_column("class")
        classes.add_column("SLA ms", justify="right")
        classes.add_column("met", justify="right")
        classes.add_column("met, last 2 s", justify="right")
        streams = rec.stream[:k]
        for name in rec.class_names():
            members = [i for i, s in enumerate(rec.streams) if s.sla_class == name]
            sla = np.asarray([rec.streams[i].sla_ms for i in members])
            mask = np.isin(streams, members) & answered
            sla_of = np.zeros(len(rec.streams))
            sla_of[members] = sla
            met = ok & mask & (lat <= sla_of[streams])
            total = int(mask.sum())
            recent_total = int((mask & recent).sum())
            classes.add_row(
                name,
                ", ".join(f"{v:g}" for v in sorted(set(sla.tolist()))),
                f"{met.sum() / total:.2%}" if total else "-",
                f"{(met & recent).sum() / recent_total:.2%}" if recent_total else "-",
            )
        shares = Table(title="routing shares (last 2 s)", expand=False)
        shares.add_column("route")
        shares.add_column("share", justify="right")
        routes = rec.route[:k][ok & recent]
        for index, name in enumerate(list(rec.routes)):
            if len(routes):
                shares.add_row(name, f"{float((routes == index).mean()):.1%}")
        fired = Table(title="events", expand=False)
        fired.add_column("at s", justify="right")
        fired.add_column("event")
        for event in run.events[-6:]:
            fired.add_row(
                f"{event.at_s:.1f}", event.label + ("" if event.ok else f" FAILED: {event.detail}")
            )
        grid = Table.grid(padding=(0, 3))
        grid.add_row(classes, shares, fired)
        return Group(head, grid)

    async def run(self, run: Run) -> None:
        with Live(
            self.render(run), console=self.console, refresh_per_second=VIEW_HZ, transient=True
        ) as live:
            while True:
                await asyncio.sleep(1.0 / VIEW_HZ)
                live.update(self.render(run))


# ---- checks of the scenario's live thresholds ----------------------------------------


def backend_share(
    records: Records, backend: str, from_s: float, to_s: float, sla_class: str | None = None
) -> float | None:
    """`backend`'s share (all its routes) of the OK answers to requests sent in
    [from_s, to_s) (of `sla_class` only, when given); None when the window has none."""
    if sla_class is not None:
        classes = np.asarray([s.sla_class == sla_class for s in records.streams], dtype=bool)
        records = records.where(classes[records.stream])
    shares = loadreport.window_shares(records, from_s, to_s)
    if not shares or any(math.isnan(v) for v in shares.values()):
        return None
    return sum(v for name, v in shares.items() if name.split("/", 1)[0] == backend)


def share_checks(records: Records, checks: Sequence[ShareCheck]) -> list[tuple[str, bool, str]]:
    out = []
    for c in checks:
        share = backend_share(records, c.backend, c.from_s, c.to_s, c.sla_class)
        bounds = []
        if c.min_share is not None:
            bounds.append(f">= {c.min_share:.0%}")
        if c.max_share is not None:
            bounds.append(f"<= {c.max_share:.0%}")
        whose = f" of {c.sla_class}" if c.sla_class is not None else ""
        name = f"{c.backend} share{whose} {c.from_s:g}-{c.to_s:g} s {' and '.join(bounds)}"
        if share is None:
            out.append((name, False, "no answers in the window"))
            continue
        passed = (c.min_share is None or share >= c.min_share) and (
            c.max_share is None or share <= c.max_share
        )
        out.append((name, passed, f"{share:.1%}"))
    return out


# ---- command line -------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        required=True,
        action="append",
        help="the gateway (HOST:PORT); repeat it for several gateways sharing their "
        "control state, which take the requests in turn (round-robin)",
    )
    parser.add_argument("--scenario", type=Path, required=True, help="scenario file (YAML)")
    parser.add_argument("--short", action="store_true", help="the scenario's short form")
    parser.add_argument(
        "--report", type=Path, default=None, metavar="DIR", help="write the report here"
    )
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        choices=["fastest-only", "cheapest-only", "round-robin", "least-loaded"],
        help="also run the same arrivals with this routing policy (repeatable)",
    )
    parser.add_argument(
        "--admin",
        default=None,
        metavar="HOST:PORT",
        help="the gateway's admin API (default: the fleet file's gateway.admin)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="the gateway's fleet file, for the admin address and token "
        "(default: the scenario's live.fleet, else the embedded demo fleet)",
    )
    parser.add_argument("--token-file", type=Path, default=None, help="admin token file")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="multiply every rate")
    parser.add_argument("--cpus", type=int, nargs="+", default=None, help="pin to these CPUs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no live view")
    parser.add_argument(
        "--tls-ca",
        type=Path,
        default=None,
        help="CA certificates (PEM) of a gateway that listens with TLS (gateway.tls)",
    )
    parser.add_argument(
        "--tls-cert", type=Path, default=None, help="client certificate (PEM), for mTLS"
    )
    parser.add_argument("--tls-key", type=Path, default=None, help="its private key (PEM)")
    parser.add_argument(
        "--tls-server-name", default=None, help="the name the gateway's certificate carries"
    )


def _admin_for(
    args: argparse.Namespace, scenario: Scenario, security: ChannelSecurity | None
) -> AdminClient | None:
    """The admin API's client for the scenario's events and baselines (over TLS with
    `security`, as the gateway's listeners share gateway.tls)."""
    fleet = args.config if args.config is not None else scenario.live.fleet
    target, token = admin_access(fleet, args.admin, args.token_file)
    if token is None:
        if scenario.events or args.baseline:
            raise no_token("the scenario's events and baselines need the admin API")
        return None
    return AdminClient(target, token, security=security)


async def _payloads(
    target: str, plan: Plan, security: ChannelSecurity | None = None
) -> list[bytes]:
    """Each stream's request, serialized once: zeros in the shapes the target describes
    (backends.protocol.codec.zeros_request, the prober's rule), with the stream's
    `sla_class` and `sla_ms`."""
    async with secure_channel(target, security) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        cache: dict[str, ModelInfo] = {}
        payloads = []
        for stream, traffic in zip(plan.streams, plan.scenario.traffic, strict=True):
            info = cache.get(stream.model)
            if info is None:
                try:
                    info = await describe(stub, stream.model, 10.0)
                except grpc.aio.AioRpcError as exc:
                    raise LoadError(
                        f"model {stream.model!r} at {target}: {exc.code().name}: {exc.details()}"
                    ) from exc
                cache[stream.model] = info
            params: dict[str, str | float] = {}
            if traffic.sla_class is not None:
                params["sla_class"] = traffic.sla_class
            if traffic.sla_ms is not None:
                params["sla_ms"] = traffic.sla_ms
            try:
                payloads.append(
                    zeros_request(
                        info.name, info.inputs, info.max_batch_size, traffic.batch_size, params
                    )
                )
            except InvalidInput as exc:
                raise LoadError(f"model {info.name!r}: {exc}") from exc
        return payloads


async def _main(args: argparse.Namespace, console: Console) -> int:
    scenario = load_scenario(args.scenario)
    plan = make_plan(scenario, args.short, args.rate_scale)
    security = None
    if args.tls_ca is not None or args.tls_cert is not None:
        security = client_security(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    admin = _admin_for(args, scenario, security)
    payloads = await _payloads(args.target[0], plan, security)
    live_backends: set[str] = set()
    if admin is not None:
        try:
            live_backends = set(await backend_prices(admin))
        except AdminCallError as exc:
            if plan.scenario.events or args.baseline:
                raise
            # A plain v2 server, or a gateway without its admin API: load only.
            console.print(f"{exc}; running without the admin API", style="yellow")
            await admin.close()
            admin = None
    results: list[tuple[str, Records, list[FiredEvent], float]] = []
    try:
        for routing in ["switchyard", *args.baseline]:
            saved = None
            if admin is not None:
                waiting = await wait_ready(admin, sorted(live_backends), READY_TIMEOUT_S)
                if waiting:
                    console.print(
                        f"not ready after {READY_TIMEOUT_S:g} s: {', '.join(waiting)}",
                        style="yellow",
                    )
                saved = await set_up(admin, plan, routing, console)
            run = Run(plan, args.target, payloads, security)
            view = None
            if not args.quiet and not args.json and console.is_terminal:
                view = LiveView(console, f"{plan.scenario.scenario} [{routing}]")
            try:
                duration = await run.run(admin, view)
            finally:
                if admin is not None and saved is not None:
                    await restore(admin, saved, run.killed)
            results.append((routing, run.records, run.events, duration))
    finally:
        if admin is not None:
            await admin.close()
    live = plan.scenario.thresholds.live
    main_routing, records, events, duration = results[0]
    summary = loadreport.summarise(records, main_routing, duration, plan.asked_rate_per_s)
    checks = list(loadreport.check_live(summary, live.classes, live.max_error_fraction))
    checks += share_checks(records, live.shares)
    failed_events = [e for e in events if not e.ok]
    checks.append(
        (
            "every event applied",
            not failed_events,
            "; ".join(f"{e.label}: {e.detail}" for e in failed_events) or f"{len(events)} applied",
        )
    )
    baselines = [
        (loadreport.summarise(r, name, d, plan.asked_rate_per_s), r)
        for name, r, _, d in results[1:]
    ]
    paths = {}
    if args.report is not None:
        args.report.mkdir(parents=True, exist_ok=True)
        paths = loadreport.write_report(
            args.report,
            plan.scenario.scenario,
            plan.scenario.description,
            records,
            summary,
            events,
            checks,
            baselines,
        )
    passed = all(ok for _, ok, _ in checks)
    if args.json:
        print(
            json.dumps(
                {
                    "scenario": plan.scenario.scenario,
                    "summary": summary.to_json(),
                    "baselines": [b.to_json() for b, _ in baselines],
                    "events": [
                        {"at_s": e.at_s, "label": e.label, "ok": e.ok, "detail": e.detail}
                        for e in events
                    ],
                    "checks": [{"name": n, "passed": ok, "detail": d} for n, ok, d in checks],
                    "passed": passed,
                    "report": {k: str(v) for k, v in paths.items()},
                }
            )
        )
    else:
        loadreport.print_summary(console, plan.scenario.scenario, summary, checks, baselines)
        for kind, path in paths.items():
            console.print(f"{kind}: {path}", markup=False, highlight=False, soft_wrap=True)
    return 0 if passed else 1


def run(args: argparse.Namespace) -> int:
    # With --json, stdout carries the one JSON object only: warnings and errors go to stderr.
    out = sys.stderr if args.json else sys.stdout
    console = Console(stderr=args.json, width=None if out.isatty() else 160)
    if args.cpus:
        try:
            os.sched_setaffinity(0, set(args.cpus))
        except OSError as exc:
            console.print(f"--cpus {args.cpus}: {exc}", style="red")
            return 2
    use_uvloop()
    try:
        return asyncio.run(_main(args, console))
    except (ScenarioError, ConfigError, LoadError, AdminCallError) as exc:
        console.print(str(exc), style="red", markup=False, highlight=False, soft_wrap=True)
        return 2
