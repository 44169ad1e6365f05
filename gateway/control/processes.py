"""`switchyard serve --processes N`: N gateway processes on one machine under one parent.

The parent serves no request. It holds the client ports (inference gRPC, REST, admin,
probes) with SO_REUSEPORT sockets that never listen (so a port 0 resolves once for the
whole group, and no other program can take a port while a process restarts); starts
and supervises the fleet's launched workers (one Supervisor, as a single gateway
does); starts N processes of `switchyard serve` (`--process-of`, hidden) that each
bind those ports with SO_REUSEPORT, the kernel spreading connections over them; and
serves `/metrics` merged over the processes (prometheus-client's multiprocess mode:
each process writes its values to files of a private folder, PROMETHEUS_MULTIPROC_DIR,
set before it starts). A process that exits is restarted with a growing back-off (a
log line each time); SIGTERM or SIGINT stops the processes first (each drains what
it has in flight), then the workers.

Each process routes on its own (its own probes and estimates), with the control state
(prices, carbon figures, policies, drains, the routing rule, ejections) shared over
`gateway.state` as separate gateways share it; when the fleet says `memory` (or names no store), the
parent starts a private redis-server on a Unix socket for its processes. Each process
reaches the launched workers as remote backends at the addresses they listen on, over
mTLS with the parent's client certificate of the workers' private CA.

Imports no generated protobuf, and not gateway.server: its processes are
`switchyard serve` themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from backends.files import write_text_atomically
from backends.process import stop_on_signals, use_uvloop
from gateway.config import BackendTLS, FleetConfig
from gateway.control.admin_token import admin_token
from gateway.control.redis_server import RedisServer
from gateway.control.supervisor import MAX_BACKOFF_S, MIN_BACKOFF_S, STABLE_AFTER_S, Supervisor
from gateway.security import WorkerPKI, ssl_server_context
from gateway.serving.metrics import serve_metrics_tls

log = logging.getLogger("switchyard.processes")

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Where prometheus-client's multiprocess mode keeps a process's values (read by
prometheus-client when it is imported: set only in the environment of the processes)."""

CALLER_GROUP_ENV = "SWITCHYARD_CALLER_GROUP"
"""The group's name, the same for each of its processes, which they name themselves by
in their requests to workers (`GROUP/ID`), so that the workers' load reports tell the
group's processes apart from other gateways (backends.protocol.load)."""

STOP_GRACE_S = 15.0
"""How long a process may take to drain and exit after SIGTERM before it is killed."""

SHARED_PORTS = ("listen", "http", "admin", "probes")
"""The gateway settings whose ports every process of the group binds."""


class GroupError(Exception):
    """The group cannot start (a port in use, no store for the control state, a process
    that exits before it serves)."""


def reserve_port(listen: str) -> socket.socket:
    """Holds HOST:PORT for the group: a socket bound with SO_REUSEPORT that never listens
    (the kernel hands connections only to listening sockets), beside which the
    processes' listeners bind; port 0 picks a free port. OSError when another program
    holds a fixed port, with SO_REUSEPORT or without: the port is first bound without
    it, which fails then."""
    host, port_text = listen.rsplit(":", 1)
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    port = int(port_text)
    if port != 0:
        with socket.socket(family, socket.SOCK_STREAM) as check:
            check.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            check.bind((host, port))
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def with_port(listen: str, port: int) -> str:
    """`listen` (HOST:PORT) with its port replaced."""
    return f"{listen.rsplit(':', 1)[0]}:{port}"


def process_config(
    config: FleetConfig,
    ports: Mapping[str, int],
    workers: Mapping[str, str],
    worker_tls: BackendTLS | None,
    state_url: str,
) -> FleetConfig:
    """The fleet as each process of the group serves it: the client ports the group
    holds (`ports`, by setting name), its own metrics on a loopback port of its own
    (the group's /metrics is the parent's), the control state in `state_url`, no watch
    of a fleet file; each launched backend a backend at the address its worker listens
    on (`workers`, by name; its configured address where it has none yet), with the
    worker's threads as its slots, reached over mTLS with `worker_tls`."""
    settings = config.gateway
    updates: dict[str, object] = {
        name: with_port(getattr(settings, name), port) for name, port in ports.items()
    }
    updates.update(metrics="127.0.0.1:0", state=state_url, watch_config_s=0)
    backends = []
    for backend in config.backends:
        if backend.launch is None:
            backends.append(backend)
            continue
        backends.append(
            backend.model_copy(
                update={
                    "launch": None,
                    "address": workers.get(backend.name, backend.address),
                    "slots": backend.slots or backend.launch.threads,
                    "tls": worker_tls,
                }
            )
        )
    return config.model_copy(
        update={"gateway": settings.model_copy(update=updates), "backends": backends}
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


@dataclass(slots=True)
class Member:
    """One gateway process of the group (index 1..N), restarted as it exits."""

    index: int
    process: asyncio.subprocess.Process | None = None
    info: dict[str, Any] | None = None
    """What the running process wrote to its ready file; None until it serves."""
    restarts: int = 0

    @property
    def pid(self) -> int:
        return 0 if self.process is None else self.process.pid

    @property
    def ready_file(self) -> str:
        return f"process-{self.index}.json"


class ProcessGroup:
    """The parent of `switchyard serve --processes N` (see the module's docstring)."""

    def __init__(
        self, config: FleetConfig, count: int, ready_file: Path | None, log_level: str
    ) -> None:
        self.config = config
        self.count = count
        self.ready_file = ready_file
        self.log_level = log_level
        self.members = [Member(i + 1) for i in range(count)]
        self.registry = CollectorRegistry()
        self.serving = Gauge(
            "switchyard_gateway_processes",
            "Gateway processes of a `--processes` group serving now.",
            registry=self.registry,
        )
        self.restarts = Counter(
            "switchyard_gateway_process_restarts",
            "Gateway processes of a `--processes` group restarted after they exited.",
            registry=self.registry,
        )
        self.ports: dict[str, int] = {}
        self.state_url = ""
        self.private_store: RedisServer | None = None
        self.supervisor: Supervisor | None = None
        self._folder = Path(tempfile.mkdtemp(prefix="switchyard-processes-"))  # mode 0700
        self._metrics_dir = self._folder / "metrics"
        self._metrics_dir.mkdir()
        self.caller_group = uuid.uuid4().hex[:8]
        """The group's name in its processes' requests to workers (CALLER_GROUP_ENV)."""
        self._config_file = self._folder / "fleet.json"
        self._sockets: list[socket.socket] = []
        self._metrics_server: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    # -- start ------------------------------------------------------------------------

    async def start(self) -> None:
        """Holds the ports, starts the store, the workers and the processes; returns
        once every process serves. GroupError when one of them cannot."""
        settings = self.config.gateway
        for name in SHARED_PORTS:
            listen = getattr(settings, name)
            if listen is None:
                continue
            try:
                sock = reserve_port(listen)
            except OSError as exc:
                raise GroupError(
                    f"cannot listen on {listen} (gateway.{name}): {exc.strerror or exc}"
                ) from exc
            self._sockets.append(sock)
            self.ports[name] = sock.getsockname()[1]
        self._serve_metrics()
        # A missing token file is made once here, not raced for by the processes.
        admin_token(self.config)
        await self._start_store()
        worker_tls = await self._start_workers()
        config = process_config(
            self.config, self.ports, self._worker_addresses(), worker_tls, self.state_url
        )
        self._config_file.write_text(json.dumps(config.model_dump(mode="json")))
        started = await asyncio.gather(*(self._start_member(m) for m in self.members))
        failed = [m for m, ok in zip(self.members, started, strict=True) if not ok]
        if failed:
            raise GroupError(
                "gateway process "
                + ", ".join(str(m.index) for m in failed)
                + " did not start (its log is above)"
            )
        self._tasks = [asyncio.create_task(self._keep(m)) for m in self.members]
        self.write_ready()

    def _serve_metrics(self) -> None:
        settings = self.config.gateway
        MultiProcessCollector(self.registry, path=str(self._metrics_dir))  # type: ignore[no-untyped-call]
        host, port_text = settings.metrics.rsplit(":", 1)
        try:
            if settings.metrics_tls and settings.tls is not None:
                self._metrics_server = serve_metrics_tls(
                    host, int(port_text), self.registry, ssl_server_context(settings.tls)
                )
            else:
                self._metrics_server, _ = start_http_server(
                    int(port_text), addr=host, registry=self.registry
                )
        except OSError as exc:
            raise GroupError(f"cannot serve metrics on {settings.metrics}: {exc}") from exc

    async def _start_store(self) -> None:
        settings = self.config.gateway
        if settings.state is not None and settings.state != "memory":
            self.state_url = settings.state
            return
        executable = RedisServer.find()
        if executable is None:
            raise GroupError(
                f"--processes {self.count} shares the control state between the processes: "
                "set gateway.state to a Redis store (redis://HOST:PORT/DB), or install "
                "redis-server (the processes then share a private one)"
            )
        folder = self._folder / "redis"
        folder.mkdir()
        store = RedisServer(folder, executable, detached=True)
        try:
            # On this thread: its parent-death signal follows the thread that starts it.
            store.start()
        except RuntimeError as exc:
            raise GroupError(f"cannot start the processes' private redis-server: {exc}") from exc
        self.private_store = store
        self.state_url = store.url
        if settings.state_file is not None:
            log.warning(
                "the processes share their control state in a private redis-server that "
                "lasts as long as this gateway; gateway.state_file %s is not read or written "
                "(set gateway.state to a Redis store of your own to keep changes)",
                settings.state_file,
            )

    async def _start_workers(self) -> BackendTLS | None:
        launched = [b for b in self.config.backends if b.launch is not None]
        if not launched:
            return None
        settings = self.config.gateway
        pki = WorkerPKI(time.time)
        self.supervisor = Supervisor(
            self.config.backends,
            self.config.repository,
            lambda name, address: log.info("backend %s listening on %s", name, address),
            lambda name, reason: None,  # the supervisor logs it; the processes probe it
            pki,
            tracing=settings.tracing,
        )
        self.supervisor.start()
        late = await self.supervisor.wait_listening(settings.startup_timeout_s)
        unknown = [b.name for b in launched if b.name in late and b.fixed_address.endswith(":0")]
        if unknown:
            raise GroupError(
                f"backends not listening after {settings.startup_timeout_s:g}s, on ports not "
                f"known yet: {', '.join(unknown)}"
            )
        if late:
            log.error("backends not listening after %.0fs: %s", settings.startup_timeout_s, late)
        folder = self._folder / "worker-client"
        folder.mkdir(mode=0o700)
        files = {"ca.crt": pki.ca.cert_pem, "client.crt": pki.client.cert_pem}
        files["client.key"] = pki.client.key_pem
        for name, data in files.items():
            _write_private(folder / name, data)
        return BackendTLS(
            ca_file=folder / "ca.crt",
            cert_file=folder / "client.crt",
            key_file=folder / "client.key",
        )

    def _worker_addresses(self) -> dict[str, str]:
        if self.supervisor is None:
            return {}
        return {name: w.address for name, w in self.supervisor.workers.items() if w.address}

    # -- the processes ----------------------------------------------------------------

    def _command(self, member: Member) -> list[str]:
        return [
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            "--config",
            str(self._config_file),
            "--ready-file",
            str(self._folder / member.ready_file),
            "--log-level",
            self.log_level,
            "--process-of",
            str(os.getpid()),
        ]

    async def _start_member(self, member: Member) -> bool:
        """Starts the member's process; True once it serves, False if it exits first
        (or the group stops)."""
        ready = self._folder / member.ready_file
        ready.unlink(missing_ok=True)
        member.info = None
        process = member.process = await asyncio.create_subprocess_exec(
            *self._command(member),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,  # its describe(): the parent prints the group's
            env={
                **os.environ,
                MULTIPROC_DIR_ENV: str(self._metrics_dir),
                CALLER_GROUP_ENV: self.caller_group,
            },
            # Its own session: a terminal's Ctrl-C reaches the parent, which stops it.
            start_new_session=True,
        )
        log.info("gateway process %d started (pid %d)", member.index, process.pid)
        exited = asyncio.create_task(process.wait())
        try:
            while not ready.exists():
                if exited.done() or self._stopping.is_set():
                    return False
                await asyncio.wait((exited,), timeout=0.05)
        finally:
            if not exited.done():
                exited.cancel()
        member.info = json.loads(ready.read_text())
        self.serving.set(sum(m.info is not None for m in self.members))
        return True

    async def _keep(self, member: Member) -> None:
        """Restarts the member's process whenever it exits, until the group stops."""
        loop = asyncio.get_running_loop()
        backoff_s = MIN_BACKOFF_S
        started = loop.time()
        while True:
            process = member.process
            assert process is not None
            code = await process.wait()
            if self._stopping.is_set():
                return
            member.info = None
            self.serving.set(sum(m.info is not None for m in self.members))
            mark_process_dead(process.pid, str(self._metrics_dir))  # type: ignore[no-untyped-call]
            if loop.time() - started > STABLE_AFTER_S:
                backoff_s = MIN_BACKOFF_S
            log.warning(
                "gateway process %d (pid %d) exited with status %d; restarting in %.1fs",
                member.index,
                process.pid,
                code,
                backoff_s,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff_s):
                    await self._stopping.wait()
            if self._stopping.is_set():
                return
            backoff_s = min(MAX_BACKOFF_S, backoff_s * 2)
            member.restarts += 1
            self.restarts.inc()
            started = loop.time()
            if await self._start_member(member):
                log.info("gateway process %d serving again (pid %d)", member.index, member.pid)
                self.write_ready()

    # -- what it tells ----------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """The group as the ready file describes it (the keys of a single gateway's,
        and `processes`)."""
        settings = self.config.gateway
        first = next((m.info for m in self.members if m.info is not None), {})
        admin = first.get("admin")
        return {
            "address": with_port(settings.listen, self.ports["listen"]),
            "metrics_port": self._metrics_server.server_port,
            "admin": admin,
            "probes_port": self.ports.get("probes"),
            "http_port": self.ports.get("http"),
            "backends": first.get("backends", {}),
            "pids": {} if self.supervisor is None else self.supervisor.pids(),
            "processes": [
                {
                    "index": m.index,
                    "pid": m.process.pid if m.info and m.process else None,
                    "metrics_port": m.info["metrics_port"] if m.info else None,
                    "restarts": m.restarts,
                }
                for m in self.members
            ],
            "state": "private redis-server" if self.private_store else self.state_url,
        }

    def write_ready(self) -> None:
        if self.ready_file is not None:
            write_text_atomically(self.ready_file, json.dumps(self.info()))

    def describe(self) -> str:
        info = self.info()
        settings = self.config.gateway
        lines = [
            f"switchyard gateway: {self.count} processes listening on {info['address']} "
            "(Open Inference Protocol gRPC, SO_REUSEPORT)"
        ]
        if info["http_port"] is not None and settings.http is not None:
            web = "https" if settings.tls is not None else "http"
            http_host = settings.http.rsplit(":", 1)[0]
            lines.append(f"  REST:     {web}://{http_host}:{info['http_port']}/v2")
        scheme = "https" if settings.metrics_tls and settings.tls is not None else "http"
        metrics_host = settings.metrics.rsplit(":", 1)[0]
        lines.append(
            f"  metrics:  {scheme}://{metrics_host}:{info['metrics_port']}/metrics "
            "(merged over the processes)"
        )
        lines.append(f"  admin:    {info['admin'] or 'off (no admin token)'}")
        if info["probes_port"] is not None and settings.probes is not None:
            probe_host = settings.probes.rsplit(":", 1)[0]
            lines.append(f"  probes:   {probe_host}:{info['probes_port']}")
        store = info["state"]
        lines.append(f"  state:    shared by the processes over {store}")
        for process in info["processes"]:
            lines.append(
                f"  process {process['index']}: pid {process['pid']}, its own metrics "
                f"127.0.0.1:{process['metrics_port']}"
            )
        for name, pid in info["pids"].items():
            lines.append(f"  backend {name:<12} worker pid {pid}")
        return "\n".join(lines)

    # -- stop -------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stops the processes (SIGTERM: each drains what it has in flight; killed
        after STOP_GRACE_S), then the workers and the store; frees the ports."""
        self._stopping.set()
        for task in self._tasks:
            task.cancel()  # each waits on its process, or its back-off
        await asyncio.gather(*self._tasks, return_exceptions=True)
        processes = [m.process for m in self.members if m.process is not None]
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), STOP_GRACE_S)
            except TimeoutError:
                log.warning("gateway process (pid %d) still runs: killing it", process.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self.private_store is not None:
            await asyncio.to_thread(self.private_store.stop)
        for sock in self._sockets:
            sock.close()
        shutdown = getattr(self._metrics_server, "shutdown", None)
        if shutdown is not None:
            shutdown()
        shutil.rmtree(self._folder, ignore_errors=True)


async def serve_group(
    config: FleetConfig, count: int, ready_file: Path | None, log_level: str
) -> None:
    stop = stop_on_signals()
    group = ProcessGroup(config, count, ready_file, log_level)
    try:
        await group.start()
        print(group.describe(), flush=True)
        await stop.wait()
        log.info("shutting down %d gateway processes", count)
    finally:
        await group.stop()


def run(config: FleetConfig, count: int, ready_file: Path | None, log_level: str) -> int:
    """`switchyard serve --processes COUNT`: the group's parent, until SIGTERM or SIGINT."""
    use_uvloop()
    try:
        asyncio.run(serve_group(config, count, ready_file, log_level))
    except GroupError as exc:
        print(f"switchyard: {exc}", file=sys.stderr)
        return 1
    return 0
