"""For the discovery tests: a real DNS server run by the test (dnslib, UDP on 127.0.0.1
port 0) whose records of NAME the test changes while it serves, and workers in process
each on a loopback address of its own (127.0.0.2, 127.0.0.3: Linux routes all of 127/8
to lo) and one shared port, as a headless Service's pods share theirs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer

from backends.worker.served import WorkerSettings
from backends.worker.server import start_worker
from gateway.config import FleetConfig
from protos import inference_pb2 as pb
from tests.integration.conftest import Worker

NAME = "workers.test.internal."


class Records(BaseResolver):  # type: ignore[misc]
    """Answers NAME with the addresses the test sets (A and AAAA); other names NXDOMAIN."""

    def __init__(self) -> None:
        self.addresses: set[str] = set()
        self.lock = threading.Lock()

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        question = request.q
        if str(question.qname) != NAME:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        with self.lock:
            addresses = sorted(self.addresses)
        for address in addresses:
            if ":" in address and question.qtype == QTYPE.AAAA:
                reply.add_answer(RR(NAME, QTYPE.AAAA, rdata=AAAA(address), ttl=0))
            elif ":" not in address and question.qtype == QTYPE.A:
                reply.add_answer(RR(NAME, QTYPE.A, rdata=A(address), ttl=0))
        return reply


@contextmanager
def running_dns() -> Iterator[tuple[DNSServer, Records]]:
    """A DNS server answering from its Records, on 127.0.0.1 port 0."""
    records = Records()
    server = DNSServer(records, address="127.0.0.1", port=0, logger=DNSLogger(logf=lambda s: None))
    server.start_thread()
    try:
        yield server, records
    finally:
        server.stop()
        server.server.server_close()


def nameserver(dns: DNSServer) -> str:
    """The server's HOST:PORT, for a discovery group's `nameserver`."""
    return f"127.0.0.1:{dns.server.server_address[1]}"


async def worker_on(
    repository: Path, host: str, port: int, credentials: grpc.ServerCredentials | None = None
) -> Worker:
    """A one-thread digits worker on `host:port` (port 0: any), over TLS with
    `credentials`."""
    settings = WorkerSettings(
        repository=repository,
        threads=1,
        hardware_class="test-1c",
        models=("digits",),
    )
    server, bound, models, executor, _ = await start_worker(settings, f"{host}:{port}", credentials)
    return Worker(f"{host}:{bound}", server, models, executor)


def answered_by(reply: pb.ModelInferResponse) -> str:
    return reply.parameters["switchyard_backend"].string_param


def discovery_config(
    dns: DNSServer,
    port: int,
    *,
    state: str | None = None,
    tls: dict[str, str] | None = None,
    static: str | None = None,
) -> FleetConfig:
    """A fleet of the group `workers` (NAME, `port`, 0.05 USD/h), over `tls`, with a
    backend `static` at `static` (0.05 USD/h) if given, keeping its control state at
    `state`."""
    group: dict[str, object] = {
        "name": "workers",
        "price_usd_per_hour": 0.05,
        "discovery": {
            "dns": NAME,
            "port": port,
            "interval_s": 0.2,
            "timeout_s": 0.5,
            "nameserver": nameserver(dns),
        },
    }
    if tls is not None:
        group["tls"] = tls
    backends: list[dict[str, object]] = [group]
    if static is not None:
        backends.append({"name": "static", "address": static, "price_usd_per_hour": 0.05})
    gateway: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "metrics": "127.0.0.1:0",
        "http": None,
        "admin": "127.0.0.1:0",
        "probe_interval_s": 0.2,
        # No warm-up or latency probes: what is in flight on a backend is the callers'.
        "latency_probe_interval_s": 3600,
        "warmup_samples": 0,
        # A request held at a leaving backend finishes there, as the drain counts.
        "attempt_timeout_slack_s": 0,
    }
    if state is not None:
        gateway["state"] = state
    return FleetConfig.model_validate({"gateway": gateway, "backends": backends})
