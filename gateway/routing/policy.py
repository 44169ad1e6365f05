"""Resolves the SLA policy that applies to a request from the fleet's policies:
the default, overridden by the model's entry, then the request's class, then the
request's own `sla_ms`. Unknown classes are the caller's error.

Pure, as the rest of gateway/routing: imports no grpc, no protobuf, no clock, no asyncio
and no randomness.
"""

from __future__ import annotations

from dataclasses import replace

from backends.protocol.errors import InvalidInput
from gateway.config import PoliciesSettings, PolicySettings
from gateway.routing.router import RouteRequest
from gateway.routing.sla import Policy


def _updates(settings: PolicySettings) -> dict[str, object]:
    return {k: v for k, v in settings.model_dump().items() if v is not None}


class PolicyBook:
    """The fleet's SLA policies; replaced whole when they change. Overrides are
    flattened once here, so resolving a request's policy costs no validation."""

    def __init__(self, settings: PoliciesSettings, overhead_ms: float = 0.0) -> None:
        """`overhead_ms`: the gateway's `request_overhead_ms`, carried by every policy."""
        self.settings = settings
        self.overhead_ms = overhead_ms
        self._default = replace(
            Policy(overhead_ms=overhead_ms),
            **_updates(settings.default),  # type: ignore[arg-type]
        )
        self._models = {
            name: replace(self._default, **_updates(s))  # type: ignore[arg-type]
            for name, s in settings.models.items()
        }
        self._classes = {name: _updates(s) for name, s in settings.classes.items()}
        self._resolved: dict[tuple[str, str], Policy] = {}

    def resolve(self, request: RouteRequest) -> Policy:
        policy = self._models.get(request.model, self._default)
        if request.sla_class is not None:
            key = (request.model, request.sla_class)
            cached = self._resolved.get(key)
            if cached is None:
                updates = self._classes.get(request.sla_class)
                if updates is None:
                    known = ", ".join(sorted(self._classes)) or "none"
                    raise InvalidInput(
                        f"unknown sla_class {request.sla_class!r} (classes: {known})"
                    )
                cached = replace(policy, name=request.sla_class, **updates)  # type: ignore[arg-type]
                # Bounded: models are known ones and classes are validated above.
                self._resolved[key] = cached
            policy = cached
        if request.sla_ms is not None:
            policy = replace(policy, latency_ms=request.sla_ms, name="custom")
        return policy
