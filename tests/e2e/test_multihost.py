"""Several gateways on several hosts route as one: hosts are network namespaces made by
the test (tests/e2e/netns.py), each process runs in its own, and every request crosses
a bridge between them.

The hosts: `store` runs redis-server; `g1` and `g2` run `switchyard serve` on the same
fleet file, sharing their control state through the store; `b1`, `b2` and `b3` each run
one digits worker (`switchyard backend`), b1 the cheapest and b3 the dearest, each
price ten times the last so that the router's choice does not hang on sub-millisecond
differences in service time. The test process is the client, on the same segment. Each
gateway's admin API listens on its host's loopback, as an SRE would reach it on the
host: the test runs `switchyard admin` inside that host.

Traffic goes through both gateways at once in each case, and each case checks that
every request sent got one clean answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc
import pytest
import yaml

from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.e2e import netns
from tests.e2e.conftest import ADMIN_TOKEN, ROOT, SWITCHYARD, RunningGateway, start_serve
from tests.e2e.traffic import OK, Traffic
from tests.integration.conftest import raw_request, samples
from tests.waiting import wait_until

WORKER_PORT = 9000
STORE_PORT = 6379
PRICES = {"b1": 0.01, "b2": 0.1, "b3": 1.0}
"""USD per hour: each ten times the last."""
SPIKE = 10.0
"""A price for b1 that makes it the dearest by far."""
RATE_PER_S = 25.0
"""Each gateway's share of the test traffic."""
SLOT_MS = 30.0
"""b4's emulated service time: one request at a time, cnn only, the cheapest by far."""
CNN_SLA_MS = 120.0
"""cnn's SLA: three requests at b4 (about 96 ms: one gateway's two callers and a latency
probe, plus the hops' 5-15 ms here) meet it, four (about 128 ms) do not. (Against 100 ms
a third took 96-100 ms, a coin toss for any router; against 110 ms, 0-11% of b4's
answers came late with two gateways, 6 runs on a 2-core AMD Zen 3 VM, where 120 ms gave
1-6%.)"""
WORKERS = {
    "b1": (["digits"], 0.0),
    "b2": (["digits"], 0.0),
    "b3": (["digits", "cnn"], 0.0),  # cnn's spare
    "b4": (["cnn"], SLOT_MS),
}
"""Each worker host's models and emulated latency."""
FLEET_PRICES = {**PRICES, "b4": 0.001}
CALLERS = 2
"""Closed-loop callers on cnn at each gateway: one gateway's fill b4 within the SLA, both
gateways' do not."""

why_not = netns.available()
pytestmark = pytest.mark.skipif(why_not is not None, reason=f"multi-host tests: {why_not}")


@dataclass
class Gateway(RunningGateway):
    """`switchyard serve` on a test host."""

    host: netns.Host

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`switchyard admin ARGS` run on the gateway's host, against its admin API."""
        return self.host.run(
            [*SWITCHYARD, "admin", "--target", str(self.info["admin"]), *args],
            cwd=ROOT,
            env={**os.environ, "SWITCHYARD_ADMIN_TOKEN": ADMIN_TOKEN},
        )

    def metric(self, name: str) -> float | None:
        """One unlabelled sample of the gateway's /metrics (None when absent)."""
        url = f"http://{self.host.address}:{self.info['metrics_port']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith(f"{name} "):
                    return float(line.split()[1])
        return None


@dataclass
class Cluster:
    network: netns.Network
    workdir: Path
    repository: Path
    store: netns.Host
    gateways: list[Gateway] = field(default_factory=list)
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    others: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(self, name: str) -> None:
        host = self.network.hosts[name]
        models, emulate_ms = WORKERS[name]
        log = (self.workdir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            host.command(
                [
                    *(sys.executable, "-m", "backends.worker.server"),
                    *("--repository", str(self.repository)),
                    *("--listen", f"{host.address}:{WORKER_PORT}"),
                    *("--threads", "1", "--hardware-class", f"cpu-{name}"),
                    *("--models", *models, "--emulate-latency-ms", str(emulate_ms)),
                ]
            ),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        assert process.stdout is not None
        for line in process.stdout:  # its first line says where it listens
            with contextlib.suppress(ValueError):
                if json.loads(line).get("event") == "listening":
                    self.workers[name] = process
                    return
        raise AssertionError(
            f"worker on {name} exited: {(self.workdir / f'{name}.log').read_text()}"
        )

    def start_gateway(self, name: str, fleet: Path) -> Gateway:
        host = self.network.hosts[name]
        running = start_serve(fleet, self.workdir, name=name, prefix=host.command([]))
        gateway = Gateway(running.process, running.info, running.log_path, host)
        self.gateways.append(gateway)
        return gateway

    def stop(self) -> None:
        processes = [g.process for g in self.gateways] + [*self.workers.values(), *self.others]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def fleet_file(path: Path, repository: Path, network: netns.Network, gateway: netns.Host) -> Path:
    store = network.hosts["store"].address
    path.write_text(
        yaml.safe_dump(
            {
                "repository": str(repository),
                "gateway": {
                    "listen": f"{gateway.address}:8001",
                    "http": None,
                    "metrics": f"{gateway.address}:0",
                    "admin": "127.0.0.1:0",
                    "state": f"redis://{store}:{STORE_PORT}/0",
                    "probe_interval_s": 0.2,
                    "attempt_timeout_slack_s": 0.2,
                },
                "backends": [
                    {
                        "name": name,
                        "address": f"{network.hosts[name].address}:{WORKER_PORT}",
                        "hardware_class": f"cpu-{name}",
                        "price_usd_per_hour": price,
                    }
                    for name, price in FLEET_PRICES.items()
                ],
                "policies": {"models": {"cnn": {"latency_ms": CNN_SLA_MS}}},
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def cluster(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    redis_server = subprocess.run(["which", "redis-server"], capture_output=True, text=True)
    if redis_server.returncode != 0:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    workdir = tmp_path_factory.mktemp("multihost")
    network = netns.Network().open()
    try:
        store = network.add("store")
        for name in ("g1", "g2", *WORKERS):
            network.add(name)
        cluster = Cluster(network, workdir, repository, store)
        try:
            cluster.others.append(
                subprocess.Popen(
                    store.command(
                        [
                            redis_server.stdout.strip(),
                            *("--bind", store.address, "--port", str(STORE_PORT)),
                            *("--save", "", "--appendonly", "no", "--protected-mode", "no"),
                        ]
                    ),
                    stdout=(workdir / "store.log").open("wb"),
                    stderr=subprocess.STDOUT,
                )
            )
            for name in WORKERS:
                cluster.start_worker(name)
            for name in ("g1", "g2"):
                host = network.hosts[name]
                cluster.start_gateway(
                    name, fleet_file(workdir / f"{name}.yaml", repository, network, host)
                )
            yield cluster
        finally:
            cluster.stop()
    finally:
        network.close()
        assert netns.leftovers(network.tag) == []


@pytest.fixture
async def traffic(cluster: Cluster) -> AsyncIterator[list[Traffic]]:
    """Traffic through each gateway, started once every gateway routes to b1 (the
    cheapest); stopped and checked (every request one clean answer) after the case."""
    channels = [grpc.aio.insecure_channel(g.address) for g in cluster.gateways]
    flows = [Traffic(channel, RATE_PER_S, timeout_s=20.0).start() for channel in channels]
    try:
        await routed_to(flows, "b1", "both gateways routing to b1, the cheapest", timeout_s=30)
        yield flows
    finally:
        for flow in flows:
            await flow.stop()
        for channel in channels:
            await channel.close()


def _latest_from(flow: Traffic, backends: set[str], count: int = 5) -> bool:
    latest = flow.latest(count)
    return len(latest) == count and all(a.code == OK and a.backend in backends for a in latest)


async def routed_to(flows: list[Traffic], backend: str, what: str, timeout_s: float = 10) -> None:
    """Waits until each flow's latest answers all came from `backend`."""
    await wait_until(lambda: all(_latest_from(flow, {backend}) for flow in flows), timeout_s, what)


async def finish(traffic: list[Traffic]) -> None:
    """Stops the traffic; every request sent through either gateway got one OK answer."""
    for flow in traffic:
        await flow.stop()
    for flow in traffic:
        assert flow.check() == {"OK": flow.sent}


async def _set_price(gateway: Gateway, backend: str, usd_per_hour: float) -> str:
    """Sets the price through `gateway`'s admin API (the traffic going on meanwhile);
    returns what it warned of."""
    result = await asyncio.to_thread(gateway.admin, "set-price", backend, str(usd_per_hour))
    assert result.returncode == 0, result.stderr
    return result.stderr


async def test_a_price_set_on_one_gateway_moves_both_gateways_traffic(
    cluster: Cluster, traffic: list[Traffic]
) -> None:
    g1, _ = cluster.gateways
    assert await _set_price(g1, "b1", SPIKE) == ""
    try:
        await routed_to(
            traffic, "b2", "both gateways' traffic on b2 after b1's price rose", timeout_s=10
        )
    finally:
        await _set_price(g1, "b1", PRICES["b1"])
    await routed_to(traffic, "b1", "both gateways back on b1")
    await finish(traffic)


async def test_a_backend_host_whose_worker_is_killed_loses_no_request_at_either_gateway(
    cluster: Cluster, traffic: list[Traffic]
) -> None:
    loop = asyncio.get_running_loop()
    worker = cluster.workers["b1"]
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    killed_at = loop.time()
    await wait_until(
        lambda: all(
            sum(1 for a in flow.answers if a.sent_s > killed_at + 0.5) >= 10 for flow in traffic
        ),
        timeout_s=20,
        what="traffic after the kill",
    )
    for flow in traffic:
        after = [a for a in flow.answers if a.sent_s > killed_at + 0.5]
        assert {a.backend for a in after if a.code == OK} <= {"b2", "b3"}
    # The host's worker comes back at the same address and the gateways return to it.
    cluster.start_worker("b1")
    await routed_to(traffic, "b1", "both gateways back on the restarted b1", timeout_s=30)
    await finish(traffic)


async def test_a_gateway_cut_off_from_the_store_keeps_serving_and_reconciles(
    cluster: Cluster, traffic: list[Traffic]
) -> None:
    g1, g2 = cluster.gateways
    flow1, flow2 = traffic
    g1.host.cut_off_from(cluster.store)
    try:
        await wait_until(
            lambda: g1.metric("switchyard_state_store_up") == 0.0,
            timeout_s=20,
            what="g1 reporting its store down",
            interval_s=0.2,
        )
        assert g2.metric("switchyard_state_store_up") == 1.0
        warning = await _set_price(g1, "b1", SPIKE)
        assert warning.startswith("warning:"), f"no not-shared warning: {warning!r}"
        await routed_to([flow1], "b2", "g1 on b2")
        # g2 never heard of it: b1 is still the cheapest there.
        assert _latest_from(flow2, {"b1"}, count=10)
    finally:
        g1.host.reconnect_to(cluster.store)
    await wait_until(
        lambda: g1.metric("switchyard_state_store_up") == 1.0,
        timeout_s=20,
        what="g1 reporting its store back",
        interval_s=0.2,
    )
    await routed_to([flow2], "b2", "g1's change reconciled into the store and applied on g2")
    await _set_price(g1, "b1", PRICES["b1"])
    await routed_to(traffic, "b1", "both gateways back on b1")
    await finish(traffic)


@dataclass
class Tally:
    answers: int = 0
    late: int = 0
    where: Counter[str] = field(default_factory=Counter)
    late_where: Counter[str] = field(default_factory=Counter)
    slowest_ms: float = 0.0


async def closed_loop(
    gateway: Gateway,
    request: pb.ModelInferRequest,
    start_s: float,
    count_from_s: float,
    until_s: float,
) -> Tally:
    """`CALLERS` callers through `gateway`, each sending cnn requests one after another
    from `start_s` to `until_s` (perf_counter); tallies the answers to those sent from
    `count_from_s` on."""
    tally = Tally()
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await asyncio.sleep(max(0.0, start_s - time.perf_counter()))

        async def caller() -> None:
            while time.perf_counter() < until_s:
                sent = time.perf_counter()
                reply = await stub.ModelInfer(request, timeout=10.0)
                if sent < count_from_s:
                    continue
                tally.answers += 1
                tally.where[reply.parameters["switchyard_backend"].string_param] += 1
                latency_ms = (time.perf_counter() - sent) * 1e3
                tally.slowest_ms = max(tally.slowest_ms, latency_ms)
                if latency_ms > CNN_SLA_MS:
                    tally.late += 1
                    tally.late_where[reply.parameters["switchyard_backend"].string_param] += 1

        await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return tally


async def test_two_gateways_sharing_a_one_slot_backend_keep_its_sla_as_one_does(
    cluster: Cluster, repository: Path
) -> None:
    """b4 is one worker thread adding 30 ms to each run, far the cheapest for cnn; b3 is
    the spare. One gateway's callers fill b4 within the SLA. With both gateways'
    callers, each gateway learns the other's queue at b4 from b4's load reports (and
    the other's requests sent since, at their recent rate); what both send in the same
    moment b4 refuses at once where it would answer it late (`switchyard_refuse_late`),
    and the gateway sends it to the spare: no more than 5% of the answers late, as for
    one. (Before the refusals, and before b4's variants' batchers stopped taking turns at
    its slot and its latency probes stopped going ahead of its queue, 4-6% were late,
    most of one gateway's answers from b4.)"""
    images, _ = samples(repository, "cnn")
    request = raw_request("cnn", {"image": images["image"][:1]}, {"image": "FP32"})
    g1, g2 = cluster.gateways

    async def on_b4(gateway: Gateway) -> bool:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            reply: pb.ModelInferResponse = await pb_grpc.GRPCInferenceServiceStub(
                channel
            ).ModelInfer(request, timeout=10)
        return reply.parameters["switchyard_backend"].string_param == "b4"

    for gateway in (g1, g2):
        await wait_until(partial(on_b4, gateway), timeout_s=30, what="cnn on b4")

    # Counted over 5.5 s alone and 6 s together: one stall of this machine (the slowest
    # answers take 150-230 ms) makes the 3-4 answers in flight late at once, which over
    # the 2.5 s and 3 s counted before (70 and 80 answers from b4) was up to 7% of them.
    now = time.perf_counter()
    alone = await closed_loop(g1, request, now, now + 0.5, now + 6.0)
    now = time.perf_counter()
    joined, counted, until = now + 1.0, now + 1.5, now + 7.5
    first, second = await asyncio.gather(
        closed_loop(g1, request, now, counted, until),
        closed_loop(g2, request, joined, counted, until),
    )
    print(
        f"\none gateway: {alone.late}/{alone.answers} late, {dict(alone.where)}; "
        f"two: g1 {first.late}/{first.answers} late {dict(first.where)}, "
        f"g2 {second.late}/{second.answers} late {dict(second.where)}; late on "
        f"{dict(first.late_where + second.late_where)}, slowest "
        f"{max(first.slowest_ms, second.slowest_ms):.0f} ms"
    )
    # The idle second gateway's latency probes at b4 count at their expected number, not
    # as requests at the SLA's percentile (which sent 10-35% of these answers to the spare,
    # 0-2 late either way): 70-71 of 70-71 on b4 in three runs over 2.5 s.
    assert alone.where["b4"] >= 0.9 * alone.answers, "one gateway's callers fit on b4"
    assert alone.late <= 0.05 * alone.answers
    both = first.answers + second.answers
    assert first.where["b4"] + second.where["b4"] >= 30, "b4 kept busy"
    assert first.where["b3"] + second.where["b3"] > 0, "the rest spilled to the spare"
    late_share = (first.late + second.late) / both
    assert late_share <= 0.05, f"two gateways overfilled b4: {late_share:.0%} of answers late"
    # The spare's answers are quick and many: b4's own answers, late, say more.
    b4_answers = first.where["b4"] + second.where["b4"]
    late_on_b4 = first.late_where["b4"] + second.late_where["b4"]
    assert late_on_b4 <= 0.1 * b4_answers, f"{late_on_b4} of b4's {b4_answers} answers late"
