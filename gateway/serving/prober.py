"""Active health probing: asks each backend whether it is ready and which models
it holds (RepositoryIndex, or the models its fleet entry lists), fetches metadata
and configuration for each ready model, and records the result in the fleet state.

A backend's answers are untrusted input (a foreign v2 server may advertise anything):
bad profile figures are left out with a log line (converters.parse_profile), a model
whose zeros would be too large for a message gets no latency probe, and whatever
fails while probing one backend is logged and marks that backend unhealthy; it never
stops the loop, nor the probes of the others.

A protocol edge (with the converters): imports grpc and generated protobuf; nothing of
the control plane.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable

import grpc

from backends.protocol.codec import MAX_ZEROS_BYTES, zeros_request
from backends.protocol.errors import InvalidInput
from backends.protocol.load import ReportError, split_report
from gateway.routing.estimates import service_sample
from gateway.routing.fleet import BackendState, FleetState, ModelInfo, Route
from gateway.serving.converters import after_waiting_parameter, model_info
from gateway.serving.pool import BackendPool
from protos import inference_pb2 as pb

log = logging.getLogger("switchyard.prober")


class BackendNotReady(Exception):
    """The backend answered but says it is not ready."""


class Prober:
    def __init__(
        self,
        fleet: FleetState,
        pool: BackendPool,
        clock: Callable[[], float],
        interval_s: float,
        timeout_s: float,
        on_change: Callable[[], None] | None = None,
        latency_interval_s: float = 0.0,
        max_probe_bytes: int = MAX_ZEROS_BYTES,
        on_probe: Callable[[str, bool, str], None] | None = None,
        warmup_samples: int = 0,
        warmup_timeout_s: float = 30.0,
        probe_when_busy: bool = True,
    ) -> None:
        """`max_probe_bytes`: the largest latency probe (zeros of a model's inputs) sent;
        a model whose one-row request would be larger is not probed (the gateway passes
        its `max_message_bytes`). `on_probe(backend, ok, error)`: told each health
        probe's outcome (the supervisor restarts a launched worker that stops answering).
        `warmup_samples`: latency probes each route takes before the fleet says it is
        ready (`FleetState.warming`, set here), until `warmup_timeout_s` after the start
        at the latest (0, or no latency probes: no warm-up). `probe_when_busy`: a
        route due a latency probe whose backend has no free slot is probed all the same,
        the probe taking the next slot that frees."""
        self.fleet = fleet
        self.pool = pool
        self.caller = b""
        """This gateway's name as its requests to Switchyard workers carry it (the
        transport's `caller`): a latency probe is this gateway's own request, never
        another gateway's in the load reports that come back."""
        self._after_waiting = after_waiting_parameter()
        self.clock = clock
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.on_change = on_change
        self.latency_interval_s = latency_interval_s
        self.max_probe_bytes = max_probe_bytes
        self.on_probe = on_probe
        self._cache: dict[tuple[str, str], ModelInfo] = {}
        self._unprobed: set[tuple[str, str, str]] = set()
        self._task: asyncio.Task[None] | None = None
        self._latency: asyncio.Task[int] | None = None
        self.warmup_samples = warmup_samples if latency_interval_s > 0 else 0
        self.warmup_timeout_s = warmup_timeout_s
        self.probe_when_busy = probe_when_busy
        self._started_s = clock()
        if self.warmup_samples > 0:
            fleet.warming = True

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        for task in (self._task, self._latency):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):  # stopping: its end is moot
                    pass

    async def _loop(self) -> None:
        # The first round of latency probes goes with the first health probes: routes
        # the backends' profiles did not seed are measured before traffic relies on
        # their first guess (a cold route looks as fast as any).
        last_latency_probe = self.clock() - self.latency_interval_s
        while True:
            try:
                await self.probe_all()
            except Exception:  # a fault of ours: logged, and the next round goes on
                log.exception("probe round failed")
            now = self.clock()
            idle = self._latency is None or self._latency.done()
            if idle and self.unwarmed():
                # Routes that came up since (a backend that just became ready, a model
                # it just loaded) take their warm-up measurements at once.
                self._latency = asyncio.get_running_loop().create_task(self.warm_up())
            elif (
                self.latency_interval_s > 0
                and idle
                and now - last_latency_probe >= self.latency_interval_s
            ):
                # Its own task: a round of latency probes (one route after another on
                # each backend) must not hold up the health probes.
                last_latency_probe = now
                self._latency = asyncio.get_running_loop().create_task(
                    self.probe_latency(now, self.latency_interval_s)
                )
            await asyncio.sleep(self.interval_s)

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(b) for b in list(self.fleet.backends.values())))
        self._check_warm()
        if self.on_change is not None:
            self.on_change()

    def unwarmed(self) -> list[Route]:
        """The available routes short of their warm-up measurements (less those that
        can get no probe: their models' inputs have no request of zeros)."""
        if self.warmup_samples <= 0:
            return []
        return [
            r
            for r in self.fleet.all_routes()
            if r.state.available
            and r.estimate.samples < self.warmup_samples
            and r.key not in self._unprobed
        ]

    async def warm_up(self) -> int:
        """Measures each route short of its warm-up samples (backends side by side,
        each backend's routes in turn); returns how many routes were measured. The
        fleet says it is ready once every route is warm (see `_check_warm`)."""
        warmed = await self._per_backend(self.unwarmed(), self._warm_in_turn, "warm-up")
        if self._check_warm() and self.on_change is not None:
            self.on_change()
        return warmed

    async def _warm_in_turn(self, routes: list[Route]) -> int:
        warmed = 0
        for route in routes:
            needed = self.warmup_samples - route.estimate.samples
            if needed > 0 and route.state.available:
                warmed += await self._latency_probe(route, needed)
        return warmed

    def _check_warm(self) -> bool:
        """Ends the warm-up once every backend is healthy and every available route
        has its warm-up samples, or `warmup_timeout_s` after the start, whatever is
        left (named in a warning: a backend still down joins the routes when it comes
        up, the routes start from their profiles or first guesses, and the latency
        probes go on measuring them); True when it just ended."""
        fleet = self.fleet
        if not fleet.warming:
            return False
        late = self.clock() - self._started_s >= self.warmup_timeout_s
        healthy = all(b.healthy for b in fleet.backends.values())
        cold = self.unwarmed()
        if healthy and not cold:
            log.info("warm-up done: every route has %d latency samples", self.warmup_samples)
        elif late:
            down = [b.name for b in fleet.backends.values() if not b.healthy]
            log.warning(
                "warm-up timed out after %g s: ready without warm-up samples of %s",
                self.warmup_timeout_s,
                ", ".join(["/".join(r.key) for r in cold] + [f"backend {d}" for d in down]),
            )
        else:
            return False
        fleet.warming = False
        return True

    async def probe(self, backend: BackendState) -> None:
        address = backend.address
        if address.endswith(":0"):  # launched, not listening yet
            return
        was_healthy = backend.healthy
        was_ejected = backend.ejected_until_s is not None
        try:
            models, rtt_ms = await self._models(backend, address)
            if self.fleet.backends.get(backend.name) is not backend:
                return  # it left the fleet while probed (discovery)
            self.fleet.record_probe(backend.name, self.clock(), models, rtt_ms)
        except Exception as exc:  # whatever the backend said, it stops here
            if self.fleet.backends.get(backend.name) is not backend:
                return
            if isinstance(exc, grpc.aio.AioRpcError):
                error = f"{exc.code().name}: {exc.details()}"
            elif isinstance(exc, BackendNotReady):
                error = str(exc)
            else:
                error = f"probe failed: {type(exc).__name__}: {str(exc)[:200]}"
                if backend.last_error != error:  # once, with its traceback
                    log.warning("backend %s: %s", backend.name, error, exc_info=exc)
            # A probe that timed out may be a busy host's stall: a healthy backend
            # leaves the routes on the second in a row (its attempts in flight are
            # covered by their attempt timeouts meanwhile); any other failure, at once.
            timed_out = (
                isinstance(exc, grpc.aio.AioRpcError)
                and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            )
            self.fleet.record_failure(
                backend.name, self.clock(), error, confirm_after=2 if timed_out else 1
            )
            if was_healthy and not backend.healthy:
                log.warning("backend %s unhealthy: %s", backend.name, error)
            if self.on_probe is not None:
                self.on_probe(backend.name, False, error)
            return
        if self.on_probe is not None:
            self.on_probe(backend.name, True, "")
        if was_ejected and backend.ejected_until_s is None:
            log.info("backend %s re-admitted after ejection", backend.name)
        if not was_healthy:
            log.info("backend %s ready at %s with %s", backend.name, address, sorted(models))

    async def probe_latency(self, now_s: float, idle_s: float) -> int:
        """One probe inference on each available route that got no traffic for
        `idle_s`, so its estimate stays fresh; returns how many were sent.

        Backends are probed side by side, each backend's routes one after another
        (the least recently measured first): probes sent together would queue behind
        each other at the worker, and each would take the wait for its route's
        service time."""
        stale = [
            route
            for route in self.fleet.all_routes()
            if route.state.available
            and (
                route.estimate.last_sample_s is None
                or now_s - route.estimate.last_sample_s >= idle_s
            )
        ]
        return await self._per_backend(stale, self._probe_in_turn, "latency")

    async def _per_backend(
        self,
        routes: Iterable[Route],
        in_turn: Callable[[list[Route]], Awaitable[int]],
        what: str,
    ) -> int:
        """Runs `in_turn` on each backend's `routes`, backends side by side; returns the
        probes they counted (a backend whose probes fail is logged and counts none)."""
        by_backend: dict[str, list[Route]] = {}
        for route in routes:
            by_backend.setdefault(route.backend, []).append(route)
        results = await asyncio.gather(
            *(in_turn(r) for r in by_backend.values()), return_exceptions=True
        )
        counted = 0
        for backend, result in zip(by_backend, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("%s probes of %s failed", what, backend, exc_info=result)
            else:
                counted += result
        return counted

    async def _probe_in_turn(self, routes: list[Route]) -> int:
        sent = 0
        for route in sorted(routes, key=lambda r: r.estimate.last_sample_s or -math.inf):
            state = route.state
            if not state.available:
                break
            if state.in_flight >= state.slots:
                # Saturated: a probe that waited its turn would measure the queue, and one
                # that waited for a free slot would never go (a backend kept busy by traffic
                # never has one), leaving the routes traffic does not take unmeasured. So
                # it takes the next slot that frees, ahead of the queue, and measures from
                # then to its answer, as an attempt that waited does.
                if not self.probe_when_busy:
                    break
                sent += await self._queued_probe(route)
            else:
                sent += await self._latency_probe(route)
        return sent

    def _probe_request(self, route: Route) -> bytes | None:
        """A one-row request of zeros, naming the route's variant; None for a model whose
        inputs have no such request (BYTES, a dimension of any size, a malformed shape,
        or more than max_probe_bytes of zeros): it is not probed."""
        info = route.state.models.get(route.model)
        if info is None:
            return None
        variant = {} if route.default else {"switchyard_variant": route.variant}
        try:
            return zeros_request(
                info.name, info.inputs, info.max_batch_size, 1, variant, self.max_probe_bytes
            )
        except InvalidInput as exc:
            if route.key not in self._unprobed:
                self._unprobed.add(route.key)
                log.info("route %s/%s/%s gets no latency probe: %s", *route.key, exc)
            return None

    async def _queued_probe(self, route: Route) -> bool:
        """One probe of a route whose backend has no free slot: due when the latest-due
        of the requests waiting there is, so that it goes after every one of them and
        ahead of those that come later (the backend's queue, and the gateway's model of
        it, are earliest deadline first; a Switchyard worker places it so by its own
        queue, `switchyard_after_waiting`, which holds the other gateways' requests too;
        a backend no other gateway sends to has only this gateway's requests in transit
        waiting there, the rest held by its coalescer, so the model places it first);
        its sample is the time from when it took a slot to its answer. It makes none of
        the requests waiting at the backend late; those that come while it waits know
        it is ahead."""
        request = self._probe_request(route)
        if request is None:
            return False
        if route.deadlines:
            request += self._after_waiting + self.caller
        state = route.state
        now = self.clock()
        # Where the worker will place it in this gateway's view: after every request
        # waiting, where they all wait at the worker (a shared backend gets every request
        # at once); else first, as this gateway's own wait here, held by its coalescer.
        due_s = state.latest_due_s(now) if state.shared(now) else now
        ticket = state.admit(route, route.estimate.mean_ms, due_s, now)
        free_slot = ticket.started_s is not None
        started = time.perf_counter()
        try:
            answer = await self.pool.client(route.address).infer(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.debug("latency probe of %r failed: %s", route, exc.details())
            return False
        finally:
            state.finish(ticket, self.clock())
        now = self.clock()
        queued_ms = self._queued_ms(state, answer, now)
        if free_slot or queued_ms is not None:
            # A slot freed meanwhile, or the worker said how long the probe waited there:
            # its latency (less that wait) measures the route.
            elapsed_ms = (time.perf_counter() - started) * 1000.0 - (queued_ms or 0.0)
            sample = service_sample(elapsed_ms, state.network.rtt_ms)
        elif ticket.started_s is not None and ticket.timed:
            sample = (now - ticket.started_s) * 1000.0
        else:
            return False  # answered while modelled waiting: nothing to measure by
        route.estimate.observe(sample, now)
        return True

    async def _latency_probe(self, route: Route, samples: int = 1) -> int:
        """`samples` probes of a route whose backend has a free slot, after one that
        wakes it; returns how many were measured."""
        request = self._probe_request(route)
        if request is None:
            return 0
        if route.deadlines:
            # Free in this gateway's view, the backend may not be (other gateways, or
            # its own requests in transit): after its waiting requests, not after all
            # that come (a request with no due time ranks after every one with one).
            request += self._after_waiting + self.caller
        client = self.pool.client(route.address)
        # The probe holds a slot like any request, so a request sent meanwhile knows
        # it may wait and does not take its own latency for the route's service time.
        state = route.state
        ticket = state.admit(route, route.estimate.mean_ms, math.inf, self.clock())
        try:
            # A first call after an idle spell wakes what went to sleep (the runtime's
            # threads, the connection) and takes about a millisecond more than the
            # calls of a steady flow, which the estimate is for: it goes unmeasured.
            await client.infer(request, timeout=self.timeout_s)
            # The round trip the sample is taken less, on the connection just woken: the
            # first health probe's held the connection's set-up (7 ms, where 1 ms is
            # usual), and the first latency probes go with it.
            started = time.perf_counter()
            await client.stub.ServerReady(pb.ServerReadyRequest(), timeout=self.timeout_s)
            state.network.observe((time.perf_counter() - started) * 1000.0)
            measured = 0
            for _ in range(samples):
                started = time.perf_counter()
                answer = await client.infer(request, timeout=self.timeout_s)
                elapsed_ms = (time.perf_counter() - started) * 1000.0
                # Behind other gateways' requests at the worker, the probe's wait there
                # is not the route's service: the worker's report says how long it was.
                elapsed_ms -= self._queued_ms(state, answer, self.clock()) or 0.0
                sample = service_sample(elapsed_ms, state.network.rtt_ms)
                route.estimate.observe(sample, self.clock())
                measured += 1
        except grpc.aio.AioRpcError as exc:
            log.debug("latency probe of %r failed: %s", route, exc.details())
            return 0
        finally:
            state.finish(ticket, self.clock())
        return measured

    def _queued_ms(self, state: BackendState, answer: bytes, now_s: float) -> float | None:
        """How long (ms) a probe waited in its worker's queue, as the load report ending
        its answer says, where other gateways send there too (`shared`: as the
        dispatcher takes a request's wait off its sample); None where the backend is this
        gateway's alone, there is no report (not a Switchyard worker, or the fleet's
        `load_reports` off) or it does not read."""
        if not self.fleet.load_reports or not state.shared(now_s):
            return None
        try:
            _, report = split_report(answer)
        except ReportError:
            return None
        if report is None or report.queued_us is None:
            return None
        return report.queued_us * 0.001

    async def _models(
        self, backend: BackendState, address: str
    ) -> tuple[dict[str, ModelInfo], float]:
        stub = self.pool.client(address).stub
        timeout = self.timeout_s
        started = time.perf_counter()
        ready = await stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout)
        # The cheapest call there is: its round trip stands for the network and
        # gRPC overhead of every call to this backend.
        rtt_ms = (time.perf_counter() - started) * 1000.0
        if not ready.ready:
            raise BackendNotReady("backend reports not ready")
        if backend.expected_models:
            names = list(backend.expected_models)
        else:
            index = await stub.RepositoryIndex(
                pb.RepositoryIndexRequest(ready=True), timeout=timeout
            )
            names = [m.name for m in index.models if m.state in ("", "READY")]
        found: dict[str, ModelInfo] = {}
        for name in names:
            reply = await stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=timeout)
            if not reply.ready:
                continue
            key = (address, name)
            info = self._cache.get(key)
            if info is None:
                info = await describe(stub, name, timeout)
                self._cache[key] = info
            found[name] = info
        return found, rtt_ms

    def forget(self, address: str) -> None:
        """Drops cached metadata for an address (its backend restarted or changed)."""
        for key in [k for k in self._cache if k[0] == address]:
            del self._cache[key]


async def describe(stub: object, name: str, timeout_s: float) -> ModelInfo:
    """A model as a v2 server describes it: its metadata, and its configuration where
    the server has Triton's extension (UNIMPLEMENTED: none)."""
    metadata = await stub.ModelMetadata(  # type: ignore[attr-defined]
        pb.ModelMetadataRequest(name=name), timeout=timeout_s
    )
    config = None
    try:
        reply = await stub.ModelConfig(  # type: ignore[attr-defined]
            pb.ModelConfigRequest(name=name), timeout=timeout_s
        )
        config = reply.config
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
    return model_info(metadata, config)
