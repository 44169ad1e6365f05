"""Fleet state: what each backend is, whether it is healthy, which models it
holds, and what is in flight on it. Updated by the prober and the backend pool,
read by the router through immutable snapshots.

Pure state: no I/O, no clock. Every method that depends on time takes `now_s`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from backends.tensors import TensorSpec


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model as a backend reports it (metadata and configuration, as domain types)."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    variant: str
    """The variant the backend serves it with (`remote` when the backend does not say)."""


@dataclass(frozen=True, slots=True)
class Route:
    """A (backend, variant) pair that can serve a model, with what routing weighs."""

    backend: str
    model: str
    variant: str
    address: str
    hardware_class: str
    price_usd_per_hour: float
    in_flight: int
    slots: int


@dataclass(slots=True)
class BackendState:
    name: str
    address: str
    hardware_class: str
    price_usd_per_hour: float
    slots: int = 1
    """How many requests it runs at once (its threads), for load-aware choices."""
    expected_models: tuple[str, ...] = ()
    """Models configured for v2 servers that cannot list their own."""
    healthy: bool = False
    models: dict[str, ModelInfo] = field(default_factory=dict)
    in_flight: int = 0
    last_probe_s: float | None = None
    last_error: str = ""
    consecutive_failures: int = 0


class FleetState:
    """All backends, keyed by name."""

    def __init__(self, backends: list[BackendState]) -> None:
        self.backends = {b.name: b for b in backends}

    # ---- updates (prober, pool, supervisor, admin) ----

    def set_address(self, backend: str, address: str) -> None:
        self.backends[backend].address = address

    def record_probe(self, backend: str, now_s: float, models: dict[str, ModelInfo]) -> None:
        """A successful probe: the backend is ready with exactly these models."""
        state = self.backends[backend]
        state.healthy = True
        state.models = dict(models)
        state.last_probe_s = now_s
        state.last_error = ""
        state.consecutive_failures = 0

    def record_failure(self, backend: str, now_s: float, error: str) -> None:
        """A failed probe or a failed connection: the backend leaves the routes."""
        state = self.backends[backend]
        state.healthy = False
        state.last_probe_s = now_s
        state.last_error = error
        state.consecutive_failures += 1

    def acquire(self, backend: str) -> None:
        self.backends[backend].in_flight += 1

    def release(self, backend: str) -> None:
        self.backends[backend].in_flight -= 1

    # ---- reads ----

    def routes(self, model: str) -> list[Route]:
        """Healthy routes for `model`, in configuration order."""
        return [
            Route(
                backend=b.name,
                model=model,
                variant=info.variant,
                address=b.address,
                hardware_class=b.hardware_class,
                price_usd_per_hour=b.price_usd_per_hour,
                in_flight=b.in_flight,
                slots=b.slots,
            )
            for b in self.backends.values()
            if b.healthy and (info := b.models.get(model)) is not None
        ]

    def model_info(self, model: str) -> ModelInfo | None:
        """The model's metadata from a healthy backend, else from any backend that had it."""
        fallback = None
        for b in self.backends.values():
            info = b.models.get(model)
            if info is not None:
                if b.healthy:
                    return info
                fallback = fallback or info
        return fallback

    def known_models(self) -> list[str]:
        names: set[str] = set()
        for b in self.backends.values():
            names.update(b.models)
            names.update(b.expected_models)
        return sorted(names)

    def model_ready(self, model: str) -> bool:
        return any(b.healthy and model in b.models for b in self.backends.values())

    def any_ready(self) -> bool:
        return any(b.healthy and b.models for b in self.backends.values())

    def variants(self, model: str) -> list[str]:
        return sorted(
            {b.models[model].variant for b in self.backends.values() if model in b.models}
        )

    def snapshot(self) -> list[BackendState]:
        return [replace(b, models=dict(b.models)) for b in self.backends.values()]
