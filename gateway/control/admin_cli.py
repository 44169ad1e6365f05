"""`switchyard admin ...`: the SRE's controls over a running gateway, through the
admin API. Human tables by default, `--json` for machines.

Where to connect and the token: `--target` (default: the fleet's `gateway.admin`),
the token from SWITCHYARD_ADMIN_TOKEN, else `--token-file`, else the fleet's
`gateway.admin_token_file`; the fleet is `--config`, default the embedded demo fleet.
An admin API that listens with TLS takes `--tls-ca` (the CA that signed its
certificate), and `--tls-cert`/`--tls-key` when it asks for client certificates.

Imports the admin client and the generated admin messages; nothing of a running
gateway's parts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from gateway.config import ConfigError
from gateway.control.admin_client import (
    AdminCallError,
    AdminClient,
    admin_access,
    no_token,
    tls_security,
)
from gateway.security import ChannelSecurity
from protos import admin_pb2 as apb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="fleet file (default: demo)")
    parser.add_argument("--target", default=None, help="admin API HOST:PORT (default: fleet's)")
    parser.add_argument("--token-file", type=Path, default=None, help="file holding the token")
    parser.add_argument("--json", action="store_true", help="print JSON for machines")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per call")
    parser.add_argument(
        "--tls-ca", type=Path, default=None, help="TLS: the CA that signed the admin API's cert"
    )
    parser.add_argument("--tls-cert", type=Path, default=None, help="mTLS: client certificate")
    parser.add_argument("--tls-key", type=Path, default=None, help="mTLS: the client cert's key")
    parser.add_argument(
        "--tls-server-name",
        default=None,
        help="TLS: the name to check the certificate against (default: the target's host)",
    )
    sub = parser.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    routes = sub.add_parser(
        "routes", help="every route's live state (a table), and each backend with none and why"
    )
    routes.add_argument("--model", default="", help="only this model's routes")
    routes.add_argument("--watch", type=float, default=0.0, metavar="S", help="refresh every S s")
    price = sub.add_parser("set-price", help="set a backend's price (USD per hour)")
    price.add_argument("backend")
    price.add_argument("usd_per_hour", type=float)
    carbon = sub.add_parser(
        "set-carbon",
        help="set a backend's carbon intensity (gCO2eq/kWh) for the carbon objective "
        "(on every gateway sharing the state store)",
    )
    carbon.add_argument("backend")
    carbon.add_argument("g_per_kwh", type=float)
    carbon.add_argument(
        "--power-w",
        type=float,
        default=0.0,
        metavar="W",
        help="also set its power draw while busy (default: keep the backend's)",
    )
    policy = sub.add_parser("policy", help="show the SLA policies, or replace them")
    policy.add_argument("--set", type=Path, default=None, metavar="FILE", help="YAML policies")
    for name, text in (("drain", "take a backend out"), ("undrain", "put a backend back")):
        p = sub.add_parser(name, help=text + " of the routes")
        p.add_argument("backend")
    sub.add_parser("backends", help="every backend with its worker process (a table)")
    kill = sub.add_parser("kill", help="SIGKILL a launched backend's worker and hold it down")
    kill.add_argument("backend")
    restart = sub.add_parser("restart", help="start a killed backend's worker again now")
    restart.add_argument("backend")
    routing = sub.add_parser("routing", help="show the routing rule in force, or set it")
    routing.add_argument(
        "name", nargs="?", default=None, help="switchyard, or a baseline (round-robin, ...)"
    )
    explain = sub.add_parser("explain", help="which route a request would take now, and why")
    explain.add_argument("model")
    explain.add_argument("--sla-ms", type=float, default=0.0)
    explain.add_argument("--sla-class", default="")
    explain.add_argument("--batch-size", type=int, default=1)


def _request(args: argparse.Namespace) -> tuple[str, Message]:
    """The admin API method the command calls, and its request."""
    command = args.admin_command
    if command == "routes":
        return "ListRoutes", apb.ListRoutesRequest(model=args.model)
    if command == "set-price":
        return "SetPrice", apb.SetPriceRequest(backend=args.backend, usd_per_hour=args.usd_per_hour)
    if command == "set-carbon":
        return "SetCarbon", apb.SetCarbonRequest(
            backend=args.backend, g_per_kwh=args.g_per_kwh, power_w=args.power_w
        )
    if command == "policy":
        if args.set is None:
            return "GetPolicy", apb.GetPolicyRequest()
        return "SetPolicy", apb.PolicyDocument(yaml=args.set.read_text())
    if command in ("drain", "undrain"):
        return command.capitalize(), apb.DrainRequest(backend=args.backend)
    if command == "backends":
        return "ListBackends", apb.ListBackendsRequest()
    if command in ("kill", "restart"):
        method = "KillBackend" if command == "kill" else "RestartBackend"
        return method, apb.BackendRequest(backend=args.backend)
    if command == "routing":
        if args.name is None:
            return "GetRouting", apb.GetRoutingRequest()
        return "SetRouting", apb.Routing(name=args.name)
    explain = apb.ExplainRequest(
        model=args.model,
        sla_ms=args.sla_ms,
        sla_class=args.sla_class,
        batch_size=args.batch_size,
    )
    return "Explain", explain


def _ms(value: float) -> str:
    return f"{value:.2f}" if value > 0 else "-"


def routes_table(reply: apb.ListRoutesResponse) -> Any:
    from rich.table import Table

    table = Table(title="routes")
    for column in (
        "backend",
        "model",
        "variant",
        "status",
        "$/h",
        "pred p50",
        "pred p99",
        "obs p50",
        "obs p99",
        "in flight",
        "share",
        "$/1M",
    ):
        table.add_column(
            column,
            justify="left" if column in ("backend", "model", "variant", "status") else "right",
        )
    for r in reply.routes:
        status = r.status if r.status == "ready" else f"[red]{r.status}[/red]"
        table.add_row(
            r.backend,
            r.model,
            r.variant + ("" if not r.default_variant else " *"),
            status,
            f"{r.price_usd_per_hour:.4f}",
            _ms(r.predicted_p50_ms),
            _ms(r.predicted_p99_ms),
            _ms(r.observed_p50_ms),
            _ms(r.observed_p99_ms),
            f"{r.in_flight}/{r.slots}",
            f"{r.traffic_share:.0%}",
            f"{r.cost_usd_per_1m:.4f}",
        )
    table.caption = "ms; * the backend's default variant; share of the model's requests, last ~10 s"
    return table


def without_routes_lines(reply: apb.ListRoutesResponse) -> list[str]:
    """Each backend with no routes and why, for below the routes table."""
    lines = []
    for b in reply.without_routes:
        why = b.detail or ("not probed yet" if b.status == "unhealthy" else "no models known")
        lines.append(f"{b.backend} at {b.address}: no routes, {b.status}: {why}")
    return lines


def routes_view(reply: apb.ListRoutesResponse) -> Any:
    """The routes table, and below it each backend that has none, with why."""
    from rich.console import Group
    from rich.text import Text

    table = routes_table(reply)
    lines = without_routes_lines(reply)
    if not lines:
        return table
    # Text, not markup: an error's words may hold brackets.
    return Group(table, Text("backends with no routes:"), *(Text("  " + line) for line in lines))


def _figure(value: float) -> str:
    """A figure that may be unknown (negative)."""
    return f"{value:g}" if value >= 0 else "-"


def backends_table(reply: apb.ListBackendsResponse) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title="backends")
    for column in (
        "backend",
        "pid",
        "status",
        "held",
        "restarts",
        "address",
        "$/h",
        "gCO2/kWh",
        "W",
        "detail",
    ):
        numeric = column in ("pid", "restarts", "$/h", "gCO2/kWh", "W")
        table.add_column(column, justify="right" if numeric else "left")
    for b in reply.backends:
        status = b.status if b.status == "ready" else f"[red]{b.status}[/red]"
        table.add_row(
            b.backend,
            str(b.pid) if b.pid else "-",
            status,
            "held down" if b.held_down else "-",
            str(b.restarts) if b.supervised else "-",
            b.address,
            f"{b.price_usd_per_hour:.4f}",
            _figure(b.carbon_g_per_kwh),
            _figure(b.power_w),
            Text(b.detail),
        )
    table.caption = (
        "pid and restarts: for the workers the gateway launches; "
        "gCO2/kWh and W: its carbon intensity and power draw (- unknown)"
    )
    return table


def process_line(reply: apb.BackendProcess) -> str:
    if not reply.pid:
        running = "not running"
    else:
        running = f"pid {reply.pid}"
    held = ", held down" if reply.held_down else ""
    return (
        f"{reply.backend}: {running}{held}, {reply.status}, {reply.address}, "
        f"{reply.restarts} restarts"
    )


def explain_view(reply: apb.ExplainResponse) -> Any:
    from rich.table import Table

    chosen = (
        f"{reply.chosen_backend}/{reply.chosen_variant} ({reply.reason}, "
        f"{reply.predicted_ms:.2f} ms predicted, ${reply.cost_usd_per_1m:.4f}/1M)"
        if reply.chosen_backend
        else f"none ({reply.reason}: {reply.message})"
    )
    table = Table(
        title=f"{reply.model}: p{reply.percentile:g} <= {reply.sla_ms:g} ms, "
        f"objective {reply.objective}, on infeasible {reply.on_infeasible}\nchosen: {chosen}"
    )
    for column in ("backend", "variant", "status", "predicted ms", "$/1M", "why"):
        table.add_column(column)
    for v in reply.routes:
        table.add_row(
            v.route.backend,
            v.route.variant,
            v.route.status,
            f"{v.predicted_ms:.2f}",
            f"{v.route.cost_usd_per_1m:.4f}",
            ("[green]" if v.chosen else "") + v.why,
        )
    return table


def _render(args: argparse.Namespace, reply: Message) -> Any:
    if isinstance(reply, apb.ListRoutesResponse):
        return routes_view(reply)
    if isinstance(reply, apb.ExplainResponse):
        return explain_view(reply)
    if isinstance(reply, apb.PolicyDocument):
        return reply.yaml.rstrip()
    if isinstance(reply, apb.ListBackendsResponse):
        return backends_table(reply)
    if isinstance(reply, apb.BackendProcess):
        return process_line(reply)
    if isinstance(reply, apb.Routing):
        return f"routing: {reply.name} (available: {', '.join(reply.available)})"
    assert isinstance(reply, apb.BackendStatus)
    carbon = ""
    if args.admin_command == "set-carbon":
        power = f"{reply.power_w:g} W" if reply.power_w >= 0 else "no power draw"
        carbon = f", {reply.carbon_g_per_kwh:g} gCO2eq/kWh at {power}"
    return (
        f"{reply.backend}: {reply.status}, ${reply.price_usd_per_hour:.4f}/h{carbon}, "
        f"{reply.in_flight} in flight"
    )


def run(args: argparse.Namespace) -> int:
    try:
        target, token = admin_access(args.config, args.target, args.token_file)
        if token is None:
            raise no_token("no admin token")
        security = tls_security(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    except ConfigError as exc:
        print(f"switchyard admin: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args, target, token, security))
    except AdminCallError as exc:
        print(f"switchyard admin: {exc.code.name}: {exc.details}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"switchyard admin: {exc}", file=sys.stderr)
        return 2


async def _run(
    args: argparse.Namespace, target: str, token: str, security: ChannelSecurity | None
) -> int:
    from rich.console import Console

    # Piped output (scripts, logs) gets the whole table rather than a terminal's width.
    console = Console(width=None if sys.stdout.isatty() else 240)
    async with AdminClient(target, token, timeout_s=args.timeout, security=security) as admin:
        method, request = _request(args)
        reply = await admin.call(method, request)
        if admin.not_shared is not None:
            print(f"warning: {admin.not_shared}", file=sys.stderr)
        if args.json:
            print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))
            return 0
        if args.admin_command == "routes" and args.watch > 0:
            from rich.live import Live

            with Live(_render(args, reply), console=console, auto_refresh=False) as live:
                while True:
                    await asyncio.sleep(args.watch)
                    live.update(_render(args, await admin.call(method, request)), refresh=True)
        console.print(_render(args, reply))
    return 0
