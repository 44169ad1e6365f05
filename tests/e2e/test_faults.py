"""The fault suite: `switchyard serve` on real worker processes, real faults under
traffic. Traffic is open loop (grpc.aio, a steady rate whatever the answers), and each
case checks that every request sent got exactly one answer, each with a clean status
(OK, or where it is the right answer UNAVAILABLE, RESOURCE_EXHAUSTED or
DEADLINE_EXCEEDED; never UNKNOWN, INTERNAL or CANCELLED, and none left waiting for its
deadline), and that traffic went where it should around the fault.

Two fleets: `pair`, two launched digits workers (the deadline storm, kill -9, SIGSTOP,
and the overload burst last: the latencies its queues add stay in the routes' estimates
for a while); `mixed`, a launched worker beside a remote worker that the test
runs behind a TCP proxy (a partition, a tenfold latency jump, a gateway restart with
its state restored). What the cases measure is printed at the end of the module, and
written as JSON to $FAULTS_REPORT_JSON when set (python -m gateway.bench.faults)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import admin_pb2 as apb
from protos import admin_pb2_grpc
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.e2e.conftest import (
    ADMIN_TOKEN,
    ROOT,
    RunningGateway,
    start_serve,
    stop,
    write_fleet,
)
from tests.e2e.proxy import Proxy
from tests.e2e.traffic import OK, Answer, Traffic
from tests.waiting import wait_until

PROBE_INTERVAL_S = 0.2
PROBE_TIMEOUT_S = 1.0
RESTART_AFTER_FAILED_PROBES = 3
AUTH = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
REMOTE_LATENCY_MS = 8.0
"""The remote worker's emulated service time; the latency jump multiplies it by ten,
past digits' SLA (DIGITS_SLA_MS), which it meets before."""
DIGITS_SLA_MS = 50.0


class Admin:
    """The gateway's admin API from the test's event loop."""

    def __init__(self, gateway: RunningGateway) -> None:
        self.channel = grpc.aio.insecure_channel(gateway.info["admin"])
        self.stub = admin_pb2_grpc.AdminStub(self.channel)

    async def routes(self) -> dict[str, apb.RouteStatus]:
        """Digits' default-variant route on each backend, by backend."""
        reply = await self.stub.ListRoutes(
            apb.ListRoutesRequest(model="digits"), metadata=AUTH, timeout=10
        )
        return {r.backend: r for r in reply.routes if r.default_variant}

    async def pids(self) -> dict[str, int]:
        reply = await self.stub.ListBackends(apb.ListBackendsRequest(), metadata=AUTH, timeout=10)
        return {b.backend: b.pid for b in reply.backends}

    async def all_ready(self) -> bool:
        routes = await self.routes()
        return bool(routes) and all(r.status == "ready" for r in routes.values())

    async def close(self) -> None:
        await self.channel.close()


def ejections(gateway: RunningGateway) -> float:
    """switchyard_backend_ejections_total, summed over backends, from /metrics (no
    line at all before a first ejection: 0)."""
    url = f"http://127.0.0.1:{gateway.info['metrics_port']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("switchyard_backend_ejections_total{")
    )


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def measured() -> Iterator[dict[str, Any]]:
    """What the cases measure: printed at the end, and written to $FAULTS_REPORT_JSON."""
    figures: dict[str, Any] = {}
    yield figures
    print("\nfault suite:", json.dumps(figures, indent=2, sort_keys=True))
    report = os.environ.get("FAULTS_REPORT_JSON")
    if report:
        Path(report).write_text(json.dumps(figures, indent=2, sort_keys=True))


def launched(name: str, price: float) -> dict[str, Any]:
    return {
        "name": name,
        "address": "127.0.0.1:0",
        "price_usd_per_hour": price,
        "launch": {"threads": 1, "models": ["digits"]},
    }


GATEWAY = {
    "probe_interval_s": PROBE_INTERVAL_S,
    # A hung worker's requests go elsewhere one probe interval past their route's p99,
    # as the prober would find it hung (the default slack is the default interval, 1 s).
    "attempt_timeout_slack_s": PROBE_INTERVAL_S,
    "probe_timeout_s": PROBE_TIMEOUT_S,
    "restart_after_failed_probes": RESTART_AFTER_FAILED_PROBES,
}


@pytest.fixture(scope="module")
def pair(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """Two launched digits workers: "a" the cheaper, so traffic goes there first."""
    workdir = tmp_path_factory.mktemp("pair")
    fleet = write_fleet(
        workdir / "fleet.yaml", repository, [launched("a", 0.04), launched("b", 0.08)], **GATEWAY
    )
    gateway = start_serve(fleet, workdir)
    yield gateway
    stop(gateway)


@pytest.fixture
async def clients(pair: RunningGateway) -> AsyncIterator[tuple[grpc.aio.Channel, Admin]]:
    async with grpc.aio.insecure_channel(pair.address) as channel:
        admin = Admin(pair)
        await wait_until(admin.all_ready, timeout_s=30, what="every route ready")
        yield channel, admin
        await admin.close()


async def test_deadline_storm_ejects_nothing(
    pair: RunningGateway, clients: tuple[grpc.aio.Channel, Admin], measured: dict[str, Any]
) -> None:
    channel, admin = clients
    before = ejections(pair)
    failures = {name: r.failures for name, r in (await admin.routes()).items()}
    storm = Traffic(channel, timeout_s=0.0005)
    # 60 requests with a 0.5 ms deadline, all at once: each expires at the client, in
    # the gateway or in a worker, which is the caller's doing, never the backend's.
    await asyncio.gather(*(storm.send() for _ in range(60)))
    storm_codes = storm.check((OK, grpc.StatusCode.DEADLINE_EXCEEDED))
    plain = Traffic(channel)
    for _ in range(40):
        await plain.send()
    assert plain.check() == {"OK": 40}
    assert ejections(pair) == before
    assert await admin.all_ready()
    # Not one attempt counted against a backend.
    assert {name: r.failures for name, r in (await admin.routes()).items()} == failures
    measured["deadline_storm"] = {
        "storm": dict(storm_codes),
        "plain_ok": 40,
        "ejections": ejections(pair) - before,
    }


async def test_kill_9_of_a_worker_under_traffic_loses_no_request(
    clients: tuple[grpc.aio.Channel, Admin], measured: dict[str, Any]
) -> None:
    channel, admin = clients
    traffic = Traffic(channel).start()
    loop = asyncio.get_running_loop()
    try:
        await wait_until(lambda: traffic.answered_by("a") >= 10, timeout_s=30, what="traffic on a")
        killed = (await admin.pids())["a"]
        # Stopped a moment first, so that requests are in flight there at the kill
        # for certain (at this rate a request of a few ms is seldom caught otherwise).
        os.kill(killed, signal.SIGSTOP)
        try:
            await wait_until(
                lambda: _in_flight(admin, "a", 3), what="requests held by the stopped a"
            )
        finally:
            killed_at = loop.time()
            os.kill(killed, signal.SIGKILL)

        async def back() -> bool:
            pid = (await admin.pids()).get("a", 0)
            routes = await admin.routes()
            return (
                pid not in (0, killed)
                and routes["a"].status == "ready"
                and traffic.answered_by("a", loop.time() - 0.5) > 0
            )

        await wait_until(back, timeout_s=40, what="a restarted, ready and taking traffic again")
    finally:
        await traffic.stop()
    codes = traffic.check(no_route=True)
    assert all(a.code == OK for a in traffic.answers if a.sent_s < killed_at)
    retried = [a for a in traffic.answers if a.attempts > 1]
    assert retried and {a.backend for a in retried} == {"b"}
    measured["kill_9"] = {
        "requests": traffic.sent,
        "statuses": dict(codes),
        "answered_by_b_after_kill": traffic.answered_by("b", killed_at),
        "retried_on_b": len(retried),
        "worst_latency_ms": round(max(a.latency_s for a in traffic.answers) * 1000, 1),
    }


async def test_sigstop_of_a_worker_under_traffic_fails_over_and_replaces_it(
    pair: RunningGateway, clients: tuple[grpc.aio.Channel, Admin], measured: dict[str, Any]
) -> None:
    channel, admin = clients
    predicted_p99_ms = (await admin.routes())["a"].predicted_p99_ms
    traffic = Traffic(channel).start()
    loop = asyncio.get_running_loop()
    stopped = 0
    try:
        await wait_until(lambda: traffic.answered_by("a") >= 10, timeout_s=30, what="traffic on a")
        stopped = (await admin.pids())["a"]
        stopped_at = loop.time()
        os.kill(stopped, signal.SIGSTOP)
        replaced_at = 0.0

        async def replaced() -> bool:
            nonlocal replaced_at
            pid = (await admin.pids()).get("a", 0)
            if pid in (0, stopped) or (await admin.routes())["a"].status != "ready":
                return False
            replaced_at = replaced_at or loop.time()
            return traffic.answered_by("a", replaced_at) > 0

        await wait_until(replaced, timeout_s=40, what="a replaced, ready and taking traffic")
    finally:
        if stopped and alive(stopped):  # a failed test: let it go
            os.kill(stopped, signal.SIGCONT)
        await traffic.stop()
    codes = traffic.check(no_route=True)
    assert all(a.code == OK for a in traffic.answers if a.sent_s < stopped_at)
    assert not alive(stopped)
    assert f"worker (pid {stopped}) failed {RESTART_AFTER_FAILED_PROBES} probes" in pair.log()
    during = [a for a in traffic.answers if stopped_at <= a.sent_s <= replaced_at]
    worst_ms = max(a.latency_s for a in during) * 1000
    measured["sigstop"] = {
        "requests": traffic.sent,
        "statuses": dict(codes),
        "requests_during_stop": len(during),
        "worst_latency_during_stop_ms": round(worst_ms, 1),
        "predicted_p99_ms": round(predicted_p99_ms, 2),
        "probe_interval_ms": PROBE_INTERVAL_S * 1000,
        "target_ms": round(predicted_p99_ms + PROBE_INTERVAL_S * 1000, 1),
        "replaced_after_s": round(replaced_at - stopped_at, 1),
    }


async def test_overload_burst_answers_each_request_once_and_stays_ready(
    pair: RunningGateway, clients: tuple[grpc.aio.Channel, Admin], measured: dict[str, Any]
) -> None:
    channel, _ = clients
    burst = Traffic(channel)
    loop = asyncio.get_running_loop()
    calls = [loop.create_task(burst.send()) for _ in range(3000)]
    checks: list[tuple[str, float]] = []  # (answer, seconds) of each readiness check
    async with grpc.aio.insecure_channel(pair.address) as probe_channel:
        stub = pb_grpc.GRPCInferenceServiceStub(probe_channel)
        health = health_pb2_grpc.HealthStub(probe_channel)
        while not all(call.done() for call in calls):
            started = loop.time()
            ready = await stub.ServerReady(pb.ServerReadyRequest(), timeout=10)
            serving = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            checks.append(
                (
                    f"{ready.ready}/{health_pb2.HealthCheckResponse.ServingStatus.Name(serving.status)}",
                    loop.time() - started,
                )
            )
    await asyncio.gather(*calls)
    codes = burst.check((OK, grpc.StatusCode.RESOURCE_EXHAUSTED))
    assert sum(codes.values()) == 3000
    assert checks and {answer for answer, _ in checks} == {"True/SERVING"}
    shed = [a for a in burst.answers if a.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert all(a.detail for a in shed), "a shed request's message names why"
    measured["overload_burst"] = {
        "requests": 3000,
        "statuses": dict(codes),
        "readiness_checks": len(checks),
        "slowest_readiness_check_ms": round(max(s for _, s in checks) * 1000, 1),
        "shed_message": shed[0].detail if shed else "",
    }


@dataclass
class Mixed:
    """A launched worker ("local") beside a remote worker ("remote", cheaper) that the
    gateway reaches through `proxy`; `remotes` are the remote worker processes started
    (the one behind the proxy last)."""

    gateway: RunningGateway
    proxy: Proxy
    fleet: Path
    workdir: Path
    repository: Path
    remotes: list[subprocess.Popen[bytes]]

    def start_remote(self, emulate_latency_ms: float) -> str:
        """Starts a remote digits worker (plaintext, as a remote backend without `tls`
        is called); returns its address."""
        log = (self.workdir / f"remote-{len(self.remotes)}.log").open("wb")
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "backends.worker.server"),
                *("--repository", str(self.repository), "--listen", "127.0.0.1:0"),
                *("--threads", "1", "--hardware-class", "cpu-remote", "--models", "digits"),
                *("--emulate-latency-ms", str(emulate_latency_ms)),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        self.remotes.append(process)
        assert process.stdout is not None
        for line in process.stdout:  # its first line says where it listens
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "listening":
                    return str(event["address"])
        raise AssertionError(f"remote worker exited: {log.name}")


@pytest.fixture(scope="module")
def mixed(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mixed]:
    workdir = tmp_path_factory.mktemp("mixed")
    proxy = Proxy("127.0.0.1:1").start()
    fleet = write_fleet(
        workdir / "fleet.yaml",
        repository,
        [
            launched("local", 0.08),
            {
                "name": "remote",
                "address": proxy.address,
                "hardware_class": "cpu-remote",
                # Cheaper per inference than local by far, though ten times slower: the
                # router prefers it whatever the two measure (cost = price x busy time).
                "price_usd_per_hour": 0.0001,
            },
        ],
        state_file=str(workdir / "state.json"),
        **GATEWAY,
    )
    data = yaml.safe_load(fleet.read_text())
    data["policies"] = {"models": {"digits": {"latency_ms": DIGITS_SLA_MS}}}
    fleet.write_text(yaml.safe_dump(data))
    setup = Mixed(None, proxy, fleet, workdir, repository, [])  # type: ignore[arg-type]
    try:
        proxy.retarget(setup.start_remote(REMOTE_LATENCY_MS))
        setup.gateway = start_serve(fleet, workdir)
        yield setup
    finally:
        if setup.gateway is not None:
            stop(setup.gateway)
        proxy.close()
        for process in setup.remotes:
            process.terminate()
            process.wait(timeout=15)


@pytest.fixture
async def mixed_clients(mixed: Mixed) -> AsyncIterator[tuple[grpc.aio.Channel, Admin]]:
    async with grpc.aio.insecure_channel(mixed.gateway.address) as channel:
        admin = Admin(mixed.gateway)
        await wait_until(admin.all_ready, timeout_s=30, what="every route ready")
        yield channel, admin
        await admin.close()


async def test_a_partitioned_backend_is_routed_around_and_comes_back_when_healed(
    mixed: Mixed, mixed_clients: tuple[grpc.aio.Channel, Admin], measured: dict[str, Any]
) -> None:
    channel, admin = mixed_clients
    traffic = Traffic(channel).start()
    loop = asyncio.get_running_loop()
    statuses: set[str] = set()  # the remote route's, during the partition
    try:
        await measured_within_sla(admin, "remote", "local")
        since = loop.time()
        # Remote (the cheaper) takes the traffic: most of it, as its estimate (the proxy's
        # hop included) may brush the SLA on a busy host and send a request to local.
        await wait_until(
            lambda: (
                traffic.answered_by("remote", since) >= 10
                and [a.backend for a in traffic.latest(1)] == ["remote"]
            ),
            timeout_s=30,
            what="traffic on remote",
        )
        mixed.proxy.blackhole()
        cut_at = loop.time()

        def retried() -> list[Answer]:
            """Requests held by the partition, answered by local after their attempt
            on remote timed out."""
            return [
                a
                for a in traffic.answers
                if a.sent_s >= cut_at and a.backend == "local" and a.attempts > 1
            ]

        async def routed_around() -> bool:
            statuses.add((await admin.routes())["remote"].status)
            return (
                bool(statuses - {"ready"})
                and traffic.answered_by("local", cut_at) >= 20
                and bool(retried())
            )

        await wait_until(
            routed_around,
            timeout_s=30,
            what="remote out, local taking traffic, held requests retried there",
        )
        mixed.proxy.heal()
        healed_at = loop.time()
        await wait_until(
            lambda: _ready(admin, "remote"), timeout_s=40, what="remote ready after the heal"
        )
        back_at = loop.time()
        predicted_after_ms = (await admin.routes())["remote"].predicted_p99_ms
        # Ready; yet the requests the partition held and the heal released were
        # answered late, and those latencies may have raised the route's estimate past
        # the SLA, so the router may not choose it for a while. With local drained it
        # is the only route, and it must serve.
        await admin.stub.Drain(apb.DrainRequest(backend="local"), metadata=AUTH, timeout=10)
        try:
            await wait_until(
                lambda: traffic.answered_by("remote", back_at) >= 5,
                what="remote serving again",
            )
        finally:
            await admin.stub.Undrain(apb.DrainRequest(backend="local"), metadata=AUTH, timeout=10)
    finally:
        mixed.proxy.heal()
        await traffic.stop()
    codes = traffic.check(no_route=True)
    assert all(a.code == OK for a in traffic.answers if a.sent_s < cut_at)
    during = [a for a in traffic.answers if cut_at <= a.sent_s <= healed_at]
    assert all(a.backend == "local" for a in during if a.sent_s > cut_at + 5.0)
    measured["partition"] = {
        "requests": traffic.sent,
        "statuses": dict(codes),
        "remote_status_seen": sorted(statuses - {"ready"}),
        "retried_on_local": len(retried()),
        "remote_predicted_p99_ms_at_end": round(
            (await admin.routes())["remote"].predicted_p99_ms, 1
        ),
        "worst_latency_during_partition_ms": round(max(a.latency_s for a in during) * 1000, 1),
        "ready_after_heal_s": round(back_at - healed_at, 1),
        "remote_predicted_p99_ms_after_heal": round(predicted_after_ms, 1),
    }


async def test_traffic_leaves_a_backend_whose_latency_jumps_tenfold(
    mixed: Mixed, mixed_clients: tuple[grpc.aio.Channel, Admin], measured: dict[str, Any]
) -> None:
    channel, admin = mixed_clients
    traffic = Traffic(channel).start()
    loop = asyncio.get_running_loop()
    try:
        # The remote's estimate may still hold the partition's late answers (the case
        # before).
        await measured_within_sla(admin, "remote", "local")
        before_ms = (await admin.routes())["remote"].predicted_p99_ms
        # The remote backend restarts on slower hardware behind the same address: the
        # proxy sends new connections to a worker ten times slower, and the old one
        # stops gracefully (its connections close, the gateway reconnects).
        fast = mixed.remotes[-1]
        mixed.proxy.retarget(mixed.start_remote(REMOTE_LATENCY_MS * 10))
        jumped_at = loop.time()
        fast.terminate()
        await asyncio.to_thread(fast.wait, 15)

        infeasible_at = 0.0

        async def moved() -> bool:
            """The remote ready, its estimate past the SLA, and the requests since then
            on local (the restart alone takes it out of the routes for a moment)."""
            nonlocal infeasible_at
            remote = (await admin.routes())["remote"]
            if remote.status != "ready" or remote.predicted_p99_ms <= DIGITS_SLA_MS:
                infeasible_at = 0.0
                return False
            infeasible_at = infeasible_at or loop.time()
            latest = traffic.latest(20)
            return len(latest) == 20 and all(
                a.sent_s > infeasible_at and a.backend == "local" for a in latest
            )

        await wait_until(
            moved, timeout_s=40, what="remote ready past the SLA and traffic moved to local"
        )
    finally:
        await traffic.stop()
    codes = traffic.check()
    after_ms = (await admin.routes())["remote"].predicted_p99_ms
    assert after_ms > DIGITS_SLA_MS
    measured["latency_jump"] = {
        "requests": traffic.sent,
        "statuses": dict(codes),
        "remote_predicted_p99_ms": [round(before_ms, 1), round(after_ms, 1)],
        "remote_emulated_ms": [REMOTE_LATENCY_MS, REMOTE_LATENCY_MS * 10],
        "sla_ms": DIGITS_SLA_MS,
        "answered_by_remote_after_jump": traffic.answered_by("remote", jumped_at),
        "answered_by_local_after_jump": traffic.answered_by("local", jumped_at),
    }


async def test_a_restarted_gateway_restores_price_and_drain_and_traffic_follows(
    mixed: Mixed, mixed_clients: tuple[grpc.aio.Channel, Admin]
) -> None:
    _, admin = mixed_clients
    price = await admin.stub.SetPrice(
        apb.SetPriceRequest(backend="remote", usd_per_hour=1.0), metadata=AUTH, timeout=10
    )
    assert price.price_usd_per_hour == 1.0
    drained = await admin.stub.Drain(apb.DrainRequest(backend="local"), metadata=AUTH, timeout=10)
    assert drained.status == "drained"
    await admin.close()

    await asyncio.to_thread(stop, mixed.gateway)
    again = mixed.workdir / "again"
    again.mkdir()
    mixed.gateway = await asyncio.to_thread(start_serve, mixed.fleet, again)

    listed = await asyncio.to_thread(mixed.gateway.admin, "--json", "routes", "--model", "digits")
    assert listed.returncode == 0, listed.stderr
    routes = {r["backend"]: r for r in json.loads(listed.stdout)["routes"]}
    assert routes["remote"]["price_usd_per_hour"] == 1.0
    assert routes["local"]["status"] == "drained"
    admin = Admin(mixed.gateway)
    async with grpc.aio.insecure_channel(mixed.gateway.address) as channel:
        traffic = Traffic(channel)
        await wait_until(
            lambda: _ready(admin, "remote"), timeout_s=30, what="remote ready after the restart"
        )
        drained_answers = [await traffic.send() for _ in range(10)]
        assert {(a.code, a.backend) for a in drained_answers} == {(OK, "remote")}
        await admin.stub.Undrain(apb.DrainRequest(backend="local"), metadata=AUTH, timeout=10)
        await wait_until(lambda: _ready(admin, "local"), timeout_s=30, what="local ready")
        # The kept price makes local the cheaper route now.
        priced_answers = [await traffic.send() for _ in range(10)]
        assert {(a.code, a.backend) for a in priced_answers} == {(OK, "local")}
    await admin.close()
    assert "admin API changes kept in" in mixed.gateway.log()


async def _in_flight(admin: Admin, backend: str, at_least: int) -> bool:
    return (await admin.routes())[backend].in_flight >= at_least


async def measured_within_sla(admin: Admin, backend: str, other: str) -> None:
    """With `other` drained for a moment, `backend` serves the traffic (running) until its
    predicted p99 is within digits' SLA: a slow sample it took earlier (a cold first
    inference, answers a partition held) can keep its estimate past the SLA, and the
    route away from traffic, for a minute (latency probes come every 5 s)."""
    await admin.stub.Drain(apb.DrainRequest(backend=other), metadata=AUTH, timeout=10)
    try:

        async def measured() -> bool:
            route = (await admin.routes())[backend]
            return route.status == "ready" and route.predicted_p99_ms <= DIGITS_SLA_MS

        await wait_until(measured, timeout_s=60, what=f"{backend} measured within the SLA")
    finally:
        await admin.stub.Undrain(apb.DrainRequest(backend=other), metadata=AUTH, timeout=10)


async def _ready(admin: Admin, backend: str) -> bool:
    return (await admin.routes())[backend].status == "ready"
