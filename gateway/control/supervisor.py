"""Launches and supervises the local backend workers a fleet file names under
`launch`: starts each as its own process, learns its address from the JSON line
it prints, restarts it with growing back-off when it exits, and stops them all
on shutdown. Workers are asked to die with the gateway (Linux PR_SET_PDEATHSIG).

Workers speak mTLS with the gateway: each start gets a new server certificate of the
gateway's private CA (gateway.security.WorkerPKI) in a private directory, removed once
the worker listens, and answers only clients with a certificate of that CA. A worker's
environment is the gateway's without its secrets (the admin token, and any variable
whose name says token, secret, password, credential or key).

For failure drills, `kill` SIGKILLs a worker and holds it down (the gateway sees
the death as it sees a crash, but nothing restarts it) until `restart` releases
the hold and the worker starts at once, on the port it had.

A worker that runs but does not answer (stopped, deadlocked, stuck in a call) is
found by its probes: the prober reports each probe's outcome (`probed`), and a
worker that was once probed ready and then failed `restart_after_failed_probes`
probes in a row is SIGKILLed (a stopped process ignores SIGTERM until it is continued) and restarted
as after a crash.

Imports no generated protobuf: it starts and watches processes (grpc only through
the certificates of gateway.security).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from backends.process import PARENT_PID_ENV
from backends.protocol.errors import DeadlineExceeded, FailedPrecondition
from gateway.config import BackendSettings, TracingSettings
from gateway.security import WorkerFiles, WorkerPKI

log = logging.getLogger("switchyard.supervisor")

MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
STABLE_AFTER_S = 30.0


SECRET_ENV = re.compile(
    r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|ACCESS_KEY|API_KEY", re.IGNORECASE
)
"""Environment variables whose names match are kept from workers (SWITCHYARD_ADMIN_TOKEN,
cloud credentials, ...): a worker needs none of the gateway's secrets."""


def worker_command(
    backend: BackendSettings,
    repository: Path,
    listen: str,
    tls: WorkerFiles | None = None,
    tracing: TracingSettings | None = None,
) -> list[str]:
    """The command that starts `backend`'s worker on `listen`, with mTLS from `tls`'s
    files when given, and the gateway's `tracing` (its exporter, collector or file and
    sample ratio; the worker's spans keep their own service name)."""
    launch = backend.launch
    assert launch is not None
    command = [
        sys.executable,
        "-m",
        "backends.worker.server",
        "--repository",
        str(repository),
        "--listen",
        listen,
        "--threads",
        str(launch.threads),
        "--hardware-class",
        backend.hardware_class,
        "--emulate-latency-ms",
        str(launch.emulate_latency_ms),
        "--max-queue-delay-us",
        str(launch.max_queue_delay_us),
        "--max-batch-rows",
        str(launch.max_batch_rows),
    ]
    if launch.models:
        command += ["--models", *launch.models]
    if launch.batching:
        command += [
            "--batching",
            *(
                f"{model}={b.max_batch_rows}:{b.max_queue_delay_us}"
                for model, b in sorted(launch.batching.items())
            ),
        ]
    if launch.max_queue is not None:
        command += ["--max-queue", str(launch.max_queue)]
    if launch.cpus:
        command += ["--cpus", *map(str, launch.cpus)]
    if launch.precisions:
        command += ["--precisions", *launch.precisions]
    if tls is not None:
        command += tls.arguments()
    if tracing is not None:
        command += tracing_arguments(tracing)
    return command


def tracing_arguments(tracing: TracingSettings) -> list[str]:
    """`switchyard backend`'s --trace-* flags for the settings given (none for those
    left unset: the worker reads OpenTelemetry's environment variables, inherited from
    the gateway, for them)."""
    arguments: list[str] = []
    if tracing.exporter is not None:
        arguments += ["--trace-exporter", tracing.exporter]
    if tracing.endpoint is not None:
        arguments += ["--trace-endpoint", tracing.endpoint]
    if tracing.file is not None:
        arguments += ["--trace-file", str(tracing.file)]
    if tracing.sample_ratio is not None:
        arguments += ["--trace-sample-ratio", repr(tracing.sample_ratio)]
    return arguments


def worker_environment(
    backend: BackendSettings, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The worker's environment: the gateway's (`environ`, default os.environ) without
    its secrets (SECRET_ENV), the runtimes' thread counts fixed from its first
    instruction, TVM's runtime library only."""
    threads = str(backend.launch.threads if backend.launch else 1)
    inherited = os.environ if environ is None else environ
    return {
        **{name: value for name, value in inherited.items() if not SECRET_ENV.search(name)},
        # The worker arms its own parent-death signal with it (backends.process).
        PARENT_PID_ENV: str(os.getpid()),
        "TVM_USE_RUNTIME_LIB": "1",
        "TVM_NUM_THREADS": threads,
        "OMP_NUM_THREADS": threads,
    }


@dataclass(slots=True)
class Supervised:
    backend: BackendSettings
    process: asyncio.subprocess.Process | None = None
    address: str = ""
    restarts: int = 0
    """Processes started after the first (after crashes, kills, restarts)."""
    listening: asyncio.Event = field(default_factory=asyncio.Event)
    held: bool = False
    """Killed through `kill`: not restarted until `restart`."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by `restart`: start now, without waiting out the back-off."""
    spawned: asyncio.Event = field(default_factory=asyncio.Event)
    """Set each time a worker process is created."""
    tls_files: WorkerFiles | None = None
    """The starting worker's certificate files, until it listens (or exits)."""
    serving: bool = False
    """A probe found the running process ready: its failed probes count from then
    on. A starting worker's do not (it loads its models; the gateway's channel may
    still be waiting out a reconnect back-off from the previous process)."""
    failed_probes: int = 0
    """Probes failed in a row since the running process was last probed ready."""
    kill_reason: str = ""
    """Why the supervisor killed the running process, for its exit's log line."""

    def remove_tls_files(self) -> None:
        if self.tls_files is not None:
            self.tls_files.remove()
            self.tls_files = None

    @property
    def pid(self) -> int:
        """The running worker's process id; 0 when none runs."""
        process = self.process
        return process.pid if process is not None and process.returncode is None else 0


class NotSupervised(FailedPrecondition):
    """The backend is not one the gateway launches (an external address)."""


class WorkerTimeout(DeadlineExceeded):
    """A worker did not exit, or start, in time."""


class Supervisor:
    def __init__(
        self,
        backends: list[BackendSettings],
        repository: Path,
        on_address: Callable[[str, str], None],
        on_exit: Callable[[str, str], None],
        pki: WorkerPKI | None = None,
        restart_after_failed_probes: int = 0,
        tracing: TracingSettings | None = None,
    ) -> None:
        """`pki`: the CA that secures the workers' listeners (None: plaintext workers,
        for tests of supervision alone). `restart_after_failed_probes`: failed probes
        in a row that get a listening worker killed and restarted (0: never).
        `tracing`: the gateway's, which its workers follow."""
        self.repository = repository
        self.tracing = tracing
        self.pki = pki
        self.restart_after_failed_probes = restart_after_failed_probes
        self.on_address = on_address
        self.on_exit = on_exit
        self.workers = {b.name: Supervised(b) for b in backends if b.launch is not None}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._supervise(w)) for w in self.workers.values()]

    async def wait_listening(self, timeout_s: float) -> list[str]:
        """Waits until every worker listens; returns the names of those that did not."""
        waits = {name: w.listening.wait() for name, w in self.workers.items()}
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits.values()), timeout_s)
        return [name for name, w in self.workers.items() if not w.listening.is_set()]

    def pids(self) -> dict[str, int]:
        return {name: w.pid for name, w in self.workers.items() if w.pid}

    def worker(self, name: str) -> Supervised:
        worker = self.workers.get(name)
        if worker is None:
            raise NotSupervised(f"backend {name!r} is not launched by the gateway")
        return worker

    async def kill(self, name: str, timeout_s: float = 5.0) -> Supervised:
        """SIGKILLs the backend's worker, if one runs, and holds it down until
        `restart`; returns once the process is gone."""
        worker = self.worker(name)
        worker.held = True
        worker.wake.set()  # a worker waiting out a back-off waits for `restart` instead
        process = worker.process
        if process is not None and process.returncode is None:
            log.warning("backend %s: killing worker (pid %d), held down", name, process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            try:
                await asyncio.wait_for(process.wait(), timeout_s)
            except TimeoutError as exc:
                raise WorkerTimeout(
                    f"backend {name!r}: worker {process.pid} still runs {timeout_s:g} s after "
                    "SIGKILL"
                ) from exc
        return worker

    async def restart(self, name: str, timeout_s: float = 5.0) -> Supervised:
        """Releases a hold (or a crash back-off): the worker starts now. Returns once
        its process exists (it listens and is probed ready shortly after); a running
        worker is left alone."""
        worker = self.worker(name)
        if worker.pid and not worker.held:
            return worker
        worker.held = False
        worker.spawned.clear()
        worker.wake.set()
        log.info("backend %s: restart requested", name)
        try:
            await asyncio.wait_for(worker.spawned.wait(), timeout_s)
        except TimeoutError as exc:
            raise WorkerTimeout(
                f"backend {name!r}: no worker process started within {timeout_s:g} s"
            ) from exc
        return worker

    def probed(self, name: str, ok: bool, error: str = "") -> None:
        """A probe's outcome for backend `name` (any backend: those not launched are
        ignored). A worker whose process was probed ready and has since failed
        `restart_after_failed_probes` probes in a row is hung: SIGKILLed, and restarted
        as after a crash."""
        worker = self.workers.get(name)
        process = worker.process if worker is not None else None
        if worker is None or process is None or self._stopping or worker.held:
            return
        if process.returncode is not None:
            return  # gone: `_supervise` sees the exit
        if ok:
            worker.serving = True
            worker.failed_probes = 0
            return
        if not worker.serving:
            return  # starting
        worker.failed_probes += 1
        limit = self.restart_after_failed_probes
        if limit <= 0 or worker.failed_probes < limit:
            return
        worker.kill_reason = (
            f"killed after {worker.failed_probes} failed probes in a row (last: {error})"
        )
        worker.serving = False
        worker.failed_probes = 0
        log.warning(
            "backend %s: worker (pid %d) failed %d probes in a row, hung (last: %s): "
            "killing it (SIGKILL) to restart it",
            name,
            process.pid,
            limit,
            error,
        )
        with contextlib.suppress(ProcessLookupError):
            process.kill()

    async def _supervise(self, worker: Supervised) -> None:
        backoff = MIN_BACKOFF_S
        loop = asyncio.get_running_loop()
        listen = worker.backend.fixed_address
        while not self._stopping:
            if worker.held:
                await self._pause(worker, 0.0)
            started = loop.time()
            worker.wake.clear()
            if worker.process is not None:
                worker.restarts += 1
            # A restarted worker reuses the port it got the first time.
            address = worker.address or listen
            if self.pki is not None:
                worker.remove_tls_files()
                worker.tls_files = self.pki.worker_files(
                    worker.backend.name, address.rsplit(":", 1)[0]
                )
            worker.serving = False
            worker.failed_probes = 0
            worker.kill_reason = ""
            worker.process = await asyncio.create_subprocess_exec(
                *worker_command(
                    worker.backend, self.repository, address, worker.tls_files, self.tracing
                ),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=worker_environment(worker.backend),
            )
            worker.spawned.set()
            log.info("started backend %s (pid %d)", worker.backend.name, worker.process.pid)
            readers = [
                loop.create_task(self._read_stdout(worker, worker.process)),
                loop.create_task(self._relay_stderr(worker.backend.name, worker.process)),
            ]
            code = await worker.process.wait()
            worker.remove_tls_files()
            for reader in readers:
                reader.cancel()
            if self._stopping:
                return
            reason = f"worker exited with status {code}"
            if worker.kill_reason:
                reason += f", {worker.kill_reason}"
            killed = worker.held
            if killed:
                log.warning("backend %s: %s; held down", worker.backend.name, reason)
            else:
                log.warning(
                    "backend %s: %s; restarting in %.1fs", worker.backend.name, reason, backoff
                )
            self.on_exit(worker.backend.name, reason)
            if loop.time() - started > STABLE_AFTER_S:
                backoff = MIN_BACKOFF_S
            await self._pause(worker, backoff)
            if not killed:  # a kill on request is no sign of a crashing worker
                backoff = min(MAX_BACKOFF_S, backoff * 2)

    async def _pause(self, worker: Supervised, backoff_s: float) -> None:
        """Waits out the back-off before a restart; while held, until released. A
        `restart` cuts either short."""
        deadline = asyncio.get_running_loop().time() + backoff_s
        while True:
            remaining = None if worker.held else deadline - asyncio.get_running_loop().time()
            if remaining is not None and remaining <= 0:
                return
            try:
                async with asyncio.timeout(remaining):
                    await worker.wake.wait()
            except TimeoutError:
                return
            worker.wake.clear()
            if not worker.held:
                return

    async def _read_stdout(self, worker: Supervised, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "listening":
                worker.address = str(event["address"])
                worker.remove_tls_files()  # read at start: no copy of the key stays behind
                self.on_address(worker.backend.name, worker.address)
                worker.listening.set()

    async def _relay_stderr(self, name: str, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        backend_log = logging.getLogger(f"switchyard.backend.{name}")
        async for line in process.stderr:
            text = line.decode(errors="replace").rstrip()
            backend_log.info("%s", text)

    async def stop(self, grace_s: float = 5.0) -> None:
        self._stopping = True
        processes = [w.process for w in self.workers.values() if w.process is not None]
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), grace_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in self.workers.values():
            worker.remove_tls_files()
