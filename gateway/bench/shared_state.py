"""Shared control state: how long an admin change made through one gateway takes to be
in force on another gateway sharing the same Redis store (target: p99 <= 1 s).

Two gateways in this process over a redis-server of their own (Debian's package, on a
Unix socket in a temporary folder); 200 prices set one after the other through the
first gateway's admin API (gRPC, bearer token); for each, the time from sending it
until the second gateway's fleet routes at that price, and how long the admin call
took (it answers once the store holds the change).

`python -m gateway.bench.shared_state [--out BENCHMARKS.md]` writes its section of
BENCHMARKS.md (between markers) and leaves the rest. The redis-server process is
gateway.control.redis_server's `RedisServer` (the tests' fixture uses it too).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc

from gateway.bench.report import publish
from gateway.config import FleetConfig
from gateway.control.redis_server import RedisServer
from gateway.report.markdown import markdown_table
from gateway.routing.percentiles import percentile
from gateway.server import Gateway, start_gateway
from protos import admin_pb2 as apb
from protos import admin_pb2_grpc

BEGIN = "<!-- shared-state: written by `python -m gateway.bench.shared_state` -->"
END = "<!-- /shared-state -->"
TOKEN = "shared-state-bench"
TARGET_P99_S = 1.0


def bench_fleet(url: str) -> FleetConfig:
    """Two backends nobody serves (the control state is what is measured), probed
    rarely, no latency probes, every port picked by the system."""
    return FleetConfig.model_validate(
        {
            "gateway": {
                "listen": "127.0.0.1:0",
                "metrics": "127.0.0.1:0",
                "http": None,
                "admin": "127.0.0.1:0",
                "probe_interval_s": 60,
                "probe_timeout_s": 0.2,
                "latency_probe_interval_s": 0,
                "warmup_samples": 0,
                "watch_config_s": 0,
                "state": url,
            },
            "backends": [
                {"name": "a", "address": "127.0.0.1:9", "price_usd_per_hour": 0.5},
                {"name": "b", "address": "127.0.0.1:7", "price_usd_per_hour": 0.7},
            ],
        }
    )


async def measure(url: str, changes: int) -> tuple[list[float], list[float]]:
    """Per change: seconds until the second gateway had it, and the admin call's."""
    os.environ["SWITCHYARD_ADMIN_TOKEN"] = TOKEN
    first: Gateway = await start_gateway(bench_fleet(url))
    second: Gateway = await start_gateway(bench_fleet(url))
    seen: list[float] = []
    calls: list[float] = []
    try:
        assert first.admin_address is not None
        async with grpc.aio.insecure_channel(first.admin_address) as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            auth = (("authorization", f"Bearer {TOKEN}"),)
            backend = second.fleet.backends["a"]
            for i in range(changes):
                price = 1.0 + i / 1000
                sent = time.perf_counter()
                await admin.SetPrice(
                    apb.SetPriceRequest(backend="a", usd_per_hour=price), metadata=auth
                )
                calls.append(time.perf_counter() - sent)
                while backend.price_usd_per_hour != price:
                    if time.perf_counter() - sent > 30:
                        raise RuntimeError(f"change {i} never reached the second gateway")
                    await asyncio.sleep(0.0005)
                seen.append(time.perf_counter() - sent)
    finally:
        await second.stop()
        await first.stop()
    return seen, calls


def run(args: argparse.Namespace) -> int:
    executable = RedisServer.find()
    if executable is None:
        print("shared-state bench: redis-server not found (apt-get install redis-server)")
        return 1
    with tempfile.TemporaryDirectory(prefix="redis-") as folder:
        server = RedisServer(Path(folder), executable)
        server.start()
        try:
            seen, calls = asyncio.run(measure(server.url, args.changes))
        finally:
            server.stop()
    version = subprocess.run(
        [executable, "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    redis_version = next((w[2:] for w in version if w.startswith("v=")), "?")

    def ms(values: list[float], q: float) -> str:
        return f"{percentile(values, q) * 1000:.1f}"

    p99 = percentile(seen, 99)
    status = "met" if p99 <= TARGET_P99_S else "NOT met"
    body = "\n".join(
        [
            "## Shared control state: an admin change on every gateway",
            "",
            f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; Python "
            f"{platform.python_version()}, redis-server {redis_version} on a Unix socket, "
            "two gateways in one process, the machine shared with whatever else runs.",
            "- Command: `python -m gateway.bench.shared_state` (part of `make bench`).",
            f"- {len(seen)} prices set one after the other through the first gateway's "
            "admin API; each row times from sending the change until the second gateway's "
            "fleet routes at that price (announced over pub/sub; a resync every 0.5 s is "
            "the backstop), and the admin call itself (answered once the store holds it).",
            "",
            markdown_table(
                ("measured", "p50 ms", "p99 ms", "max ms"),
                [
                    (
                        "change in force on the other gateway",
                        ms(seen, 50),
                        ms(seen, 99),
                        f"{max(seen) * 1000:.1f}",
                    ),
                    (
                        "admin call answered",
                        ms(calls, 50),
                        ms(calls, 99),
                        f"{max(calls) * 1000:.1f}",
                    ),
                ],
            ),
            "",
            f"Target: an admin change on every gateway within p99 <= 1 s: "
            f"{p99 * 1000:.1f} ms, {status}.",
            "",
        ]
    )
    publish(body, args.out, BEGIN, END)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="BENCHMARKS.md to update")
    parser.add_argument("--changes", type=int, default=200, help="admin changes to time")
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
