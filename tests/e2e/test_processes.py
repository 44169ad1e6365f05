"""`switchyard serve --processes 2` as users run it: a parent, two gateway processes on
the same ports, a launched worker. Which process answered a request is read from the
kernel: the gateway-side end of each keep-alive REST connection belongs to one
process's open files (/proc)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import ADMIN_TOKEN, ROOT, SWITCHYARD, RunningGateway, write_fleet
from tests.waiting import wait_until_blocking

EMULATED_MS = 100
"""The worker's service time per request: long enough that requests are still in flight
when the test stops the gateway."""

BODY = json.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}
)


def start_group(fleet: Path, workdir: Path, *options: str) -> RunningGateway:
    ready = workdir / "ready.json"
    log_path = workdir / "gateway.log"
    process = subprocess.Popen(
        [*SWITCHYARD, "serve", "--config", str(fleet), "--ready-file", str(ready), *options],
        cwd=ROOT,
        env={**os.environ, "SWITCHYARD_ADMIN_TOKEN": ADMIN_TOKEN},
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    wait_until_blocking(
        lambda: ready.exists() or process.poll() is not None, 90, "the group's ready file"
    )
    assert process.poll() is None, log_path.read_text()
    gateway = RunningGateway(process, {}, log_path)
    gateway.info = read_ready(workdir)
    return gateway


def read_ready(workdir: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((workdir / "ready.json").read_text())  # type: ignore[no-any-return]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def group(
    repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningGateway, Path]]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (`make redis`): the processes share state")
    workdir = tmp_path_factory.mktemp("processes")
    fleet = write_fleet(
        workdir / "fleet.yaml",
        repository,
        [
            {
                "name": "small",
                "address": "127.0.0.1:0",
                "hardware_class": "cpu-1c",
                "price_usd_per_hour": 0.04,
                "launch": {"threads": 1, "models": ["digits"], "emulate_latency_ms": EMULATED_MS},
            }
        ],
        probes="127.0.0.1:0",
    )
    gateway = start_group(fleet, workdir, "--processes", "2")
    yield gateway, workdir
    if gateway.process.poll() is None:
        gateway.process.kill()
        gateway.process.wait()


# -- which process holds a connection -------------------------------------------------


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def server_side_inode(server_port: int, client_port: int) -> str | None:
    """The inode of the gateway's end of the connection from `client_port`."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        remote_port = int(fields[2].split(":")[1], 16)
        if local_port == server_port and remote_port == client_port:
            return fields[9]
    return None


@dataclass
class Connection:
    http: http.client.HTTPConnection
    pid: int

    def infer(self) -> int:
        self.http.request(
            "POST", "/v2/models/digits/infer", BODY, {"Content-Type": "application/json"}
        )
        response = self.http.getresponse()
        response.read()
        return response.status


def connect(port: int, pids: list[int]) -> Connection:
    """A keep-alive REST connection that has answered once, and the process holding it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection = Connection(conn, 0)
    assert connection.infer() == 200
    inode = server_side_inode(port, conn.sock.getsockname()[1])
    connection.pid = next((pid for pid in pids if inode in socket_inodes(pid)), 0)
    assert connection.pid, "no gateway process holds the connection"
    return connection


def connections_on_both(info: dict, at_least: int = 2) -> list[Connection]:  # type: ignore[type-arg]
    """Opens connections until each process holds `at_least` of them (the kernel spreads
    new connections over the listeners by a hash of their addresses)."""
    pids = [p["pid"] for p in info["processes"]]
    opened: list[Connection] = []
    while any(sum(c.pid == pid for c in opened) < at_least for pid in pids):
        assert len(opened) < 64, f"64 connections and one process holds them all: {pids}"
        opened.append(connect(info["http_port"], pids))
    return opened


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(value for (sample, _), value in samples.items() if sample == name)


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    (found,) = [v for (sample, _), v in samples.items() if sample == name]
    return found


# -- the tests ------------------------------------------------------------------------


def test_both_processes_answer_and_the_metrics_merge_their_counts(
    group: tuple[RunningGateway, Path],
) -> None:
    gateway, _ = group
    info = gateway.info
    assert [p["restarts"] for p in info["processes"]] == [0, 0]
    connections = connections_on_both(info)
    for conn in connections:
        assert conn.infer() == 200
        conn.http.close()
    own = {p["pid"]: scrape(p["metrics_port"]) for p in info["processes"]}
    for pid, samples in own.items():
        counted = total(samples, "switchyard_requests_total")
        held = sum(c.pid == pid for c in connections)
        assert counted >= 2 * held, (pid, counted, held)
    merged = scrape(info["metrics_port"])
    assert total(merged, "switchyard_requests_total") == sum(
        total(samples, "switchyard_requests_total") for samples in own.values()
    )
    assert value(merged, "switchyard_gateway_processes") == 2


def test_each_process_merges_its_own_requests_beside_the_others(
    group: tuple[RunningGateway, Path],
) -> None:
    """Both processes send to the one worker, so each one's load reports show the
    other's requests there; as they name one group, neither takes the other for another
    gateway, and each still holds its requests behind its own call in flight and merges
    them (`switchyard_coalesced_requests_per_call`), wave after wave, as one process
    would. Four requests at a time on each process, 100 ms of emulated work a row."""
    gateway, _ = group
    info = gateway.info
    pids = [p["pid"] for p in info["processes"]]
    opened = connections_on_both(info, at_least=4)
    chosen = [c for pid in pids for c in [c for c in opened if c.pid == pid][:4]]

    def merged_calls() -> dict[int, float]:
        return {
            p["pid"]: total(
                scrape(p["metrics_port"]), "switchyard_coalesced_requests_per_call_count"
            )
            for p in info["processes"]
        }

    def wave() -> None:
        statuses: list[int] = []
        threads = [threading.Thread(target=lambda c=c: statuses.append(c.infer())) for c in chosen]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert statuses == [200] * len(chosen)

    wave()  # each process's first call goes alone: the others' reports come with it
    before = merged_calls()
    for _ in range(3):
        wave()
    after = merged_calls()
    for conn in opened:
        conn.http.close()
    assert all(after[pid] > before[pid] for pid in pids), (before, after)


def test_an_admin_change_reaches_both_processes(group: tuple[RunningGateway, Path]) -> None:
    gateway, _ = group
    done = gateway.admin("set-price", "small", "0.5")
    assert done.returncode == 0, done.stderr
    ports = [p["metrics_port"] for p in gateway.info["processes"]]
    for port in ports:

        def new_price(port: int = port) -> bool:
            return value(scrape(port), "switchyard_backend_price_usd_per_hour") == 0.5

        wait_until_blocking(
            new_price,
            10,
            f"the new price in the process with metrics on {port}",
        )


def test_set_carbon_reaches_both_processes(group: tuple[RunningGateway, Path]) -> None:
    """Carbon figures are shared as prices are: after a `set-carbon` that one process
    took, the requests each process answers count carbon (the fleet gives none)."""
    gateway, _ = group
    ports = {p["pid"]: p["metrics_port"] for p in gateway.info["processes"]}
    for port in ports.values():
        assert total(scrape(port), "switchyard_carbon_grams_total") == 0
    done = gateway.admin("set-carbon", "small", "100", "--power-w", "50")
    assert done.returncode == 0, done.stderr
    connections = connections_on_both(gateway.info, at_least=1)

    def counts_carbon(conn: Connection) -> bool:
        assert conn.infer() == 200
        return total(scrape(ports[conn.pid]), "switchyard_carbon_grams_total") > 0

    try:
        for conn in connections:
            wait_until_blocking(
                lambda conn=conn: counts_carbon(conn),  # type: ignore[misc]
                10,
                f"carbon counted by the process with pid {conn.pid}",
            )
    finally:
        for conn in connections:
            conn.http.close()


def test_a_killed_process_is_restarted_and_the_other_loses_no_request(
    group: tuple[RunningGateway, Path],
) -> None:
    gateway, workdir = group
    info = read_ready(workdir)
    victim, survivor = (p["pid"] for p in info["processes"])
    connections = connections_on_both(info)
    failures: dict[int, list[str]] = {victim: [], survivor: []}
    answered = {victim: 0, survivor: 0}
    stop = threading.Event()

    def drive(conn: Connection) -> None:
        while not stop.is_set():
            try:
                status = conn.infer()
            except (OSError, http.client.HTTPException) as exc:
                failures[conn.pid].append(repr(exc))
                return  # its process is gone
            if status != 200:
                failures[conn.pid].append(str(status))
            answered[conn.pid] += 1

    threads = [threading.Thread(target=drive, args=(c,)) for c in connections]
    for thread in threads:
        thread.start()
    try:
        wait_until_blocking(lambda: answered[survivor] >= 4, 30, "answers before the kill")
        os.kill(victim, signal.SIGKILL)
        wait_until_blocking(
            lambda: read_ready(workdir)["processes"][0]["restarts"] == 1,
            60,
            "the parent to restart the killed process",
        )
        after = answered[survivor]
        wait_until_blocking(lambda: answered[survivor] >= after + 4, 30, "answers after")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert failures[survivor] == [], failures
    restarted = read_ready(workdir)
    gateway.info = restarted
    new_pid = restarted["processes"][0]["pid"]
    assert new_pid != victim and alive(new_pid)
    assert f"gateway process 1 (pid {victim}) exited with status -9; restarting" in gateway.log()
    assert (
        value(scrape(restarted["metrics_port"]), "switchyard_gateway_process_restarts_total") == 1
    )
    # The restarted process takes connections again.
    for conn in connections_on_both(restarted, at_least=1):
        conn.http.close()


def test_sigterm_drains_the_requests_in_flight_and_stops_every_process(
    group: tuple[RunningGateway, Path],
) -> None:
    gateway, workdir = group
    info = read_ready(workdir)
    connections = connections_on_both(info, at_least=1)
    answered = total(scrape(info["metrics_port"]), "switchyard_requests_total")
    for conn in connections:
        conn.http.request(
            "POST", "/v2/models/digits/infer", BODY, {"Content-Type": "application/json"}
        )

    # One worker thread at EMULATED_MS each: they finish one after the other. Every
    # request read by a gateway process (answered or in flight), some still in flight:
    def all_read_some_in_flight() -> bool:
        samples = scrape(info["metrics_port"])
        in_flight = value(samples, "switchyard_backend_in_flight")
        done = total(samples, "switchyard_requests_total") - answered
        return in_flight >= 1 and done + in_flight == len(connections)

    wait_until_blocking(all_read_some_in_flight, 30, "the requests in flight", interval_s=0.005)
    gateway.process.send_signal(signal.SIGTERM)
    statuses = []
    for conn in connections:
        response = conn.http.getresponse()
        response.read()
        statuses.append(response.status)
    assert statuses == [200] * len(connections)
    assert gateway.process.wait(30) == 0, gateway.log()
    pids = [p["pid"] for p in info["processes"]] + list(info["pids"].values())
    for pid in pids:

        def ended(pid: int = pid) -> bool:
            return not alive(pid)

        wait_until_blocking(ended, 10, f"process {pid} to end")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", info["http_port"]), 1)


def test_a_port_another_program_holds_fails_the_group_clearly(
    repository: Path, tmp_path: Path
) -> None:
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        fleet = write_fleet(
            tmp_path / "fleet.yaml",
            repository,
            [{"name": "remote", "address": "127.0.0.1:9", "hardware_class": "cpu"}],
            listen=f"127.0.0.1:{port}",
        )
        for options in (["--processes", "2"], []):
            done = subprocess.run(
                [*SWITCHYARD, "serve", "--config", str(fleet), *options],
                cwd=ROOT,
                env={**os.environ, "SWITCHYARD_ADMIN_TOKEN": ADMIN_TOKEN},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 1, (options, done.stdout, done.stderr)
            assert f"cannot listen on 127.0.0.1:{port}" in done.stderr, (options, done.stderr)
