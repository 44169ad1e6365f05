"""Active health probing: asks each backend whether it is ready and which models
it holds (RepositoryIndex, or the models its fleet entry lists), fetches metadata
and configuration for each ready model, and records the result in the fleet state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from gateway.converters import model_info
from gateway.fleet import BackendState, FleetState, ModelInfo
from gateway.pool import BackendPool
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
    ) -> None:
        self.fleet = fleet
        self.pool = pool
        self.clock = clock
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.on_change = on_change
        self._cache: dict[tuple[str, str], ModelInfo] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        while True:
            await self.probe_all()
            await asyncio.sleep(self.interval_s)

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(b) for b in list(self.fleet.backends.values())))
        if self.on_change is not None:
            self.on_change()

    async def probe(self, backend: BackendState) -> None:
        address = backend.address
        if address.endswith(":0"):  # launched, not listening yet
            return
        try:
            models = await self._models(backend, address)
        except (grpc.aio.AioRpcError, BackendNotReady) as exc:
            if isinstance(exc, grpc.aio.AioRpcError):
                error = f"{exc.code().name}: {exc.details()}"
            else:
                error = str(exc)
            was_healthy = backend.healthy
            self.fleet.record_failure(backend.name, self.clock(), error)
            if was_healthy:
                log.warning("backend %s unhealthy: %s", backend.name, error)
            return
        was_healthy = backend.healthy
        self.fleet.record_probe(backend.name, self.clock(), models)
        if not was_healthy:
            log.info("backend %s ready at %s with %s", backend.name, address, sorted(models))

    async def _models(self, backend: BackendState, address: str) -> dict[str, ModelInfo]:
        stub = self.pool.client(address).stub
        timeout = self.timeout_s
        ready = await stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout)
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
                info = await self._describe(stub, name, timeout)
                self._cache[key] = info
            found[name] = info
        return found

    async def _describe(self, stub: object, name: str, timeout_s: float) -> ModelInfo:
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

    def forget(self, address: str) -> None:
        """Drops cached metadata for an address (its backend restarted or changed)."""
        for key in [k for k in self._cache if k[0] == address]:
            del self._cache[key]
