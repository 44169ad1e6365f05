"""Resolves the SLA policy that applies to a request from the fleet's policies:
the default, overridden by the model's entry, then the request's class, then the
request's own `sla_ms`. Unknown classes are the caller's error.
"""

from __future__ import annotations

from dataclasses import replace

from backends.errors import InvalidInput
from gateway.config import PoliciesSettings, PolicySettings
from gateway.router import Policy, RouteRequest


def _apply(policy: Policy, settings: PolicySettings) -> Policy:
    updates = {k: v for k, v in settings.model_dump().items() if v is not None}
    return replace(policy, **updates)


class PolicyBook:
    """The fleet's SLA policies; replaced whole when they change."""

    def __init__(self, settings: PoliciesSettings) -> None:
        self.settings = settings
        self._default = _apply(Policy(), settings.default)

    def resolve(self, request: RouteRequest) -> Policy:
        policy = self._default
        model = self.settings.models.get(request.model)
        if model is not None:
            policy = _apply(policy, model)
        if request.sla_class is not None:
            cls = self.settings.classes.get(request.sla_class)
            if cls is None:
                known = ", ".join(sorted(self.settings.classes)) or "none"
                raise InvalidInput(f"unknown sla_class {request.sla_class!r} (classes: {known})")
            policy = _apply(policy, cls)
        if request.sla_ms is not None:
            policy = replace(policy, latency_ms=request.sla_ms)
        return policy
