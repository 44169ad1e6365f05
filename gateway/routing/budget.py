"""The retry budget: how many retries and hedges the gateway may send, as a share of the
requests it takes (after Finagle's and Linkerd's retry budgets).

Each request deposits `ratio` of a token; each retry or hedge withdraws one; time
deposits `min_per_s` tokens a second, so a quiet gateway may still retry. The balance
is capped at what the last `ttl_s` seconds deposited, so a long quiet spell cannot
bank a storm. When a fault hits every backend (a poisoned request, a failing
network), retries stay a bounded share of the traffic instead of multiplying it.

Pure: time comes in as `now_s`; no I/O, no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class RetryBudget:
    ratio: float = 0.2
    """Retries and hedges per request, at most, over time (0.2: 20%)."""
    min_per_s: float = 10.0
    """Retries a second allowed whatever the traffic."""
    ttl_s: float = 10.0
    """How long a deposit stays spendable."""
    balance: float = 0.0
    recent_requests: float = 0.0
    """Requests over about the last `ttl_s` (exponentially decayed)."""
    at_s: float | None = None
    """When the balance was last brought up to date."""
    withdrawn: int = 0
    refused: int = 0

    def __post_init__(self) -> None:
        self.balance = self.min_per_s * self.ttl_s

    @property
    def unlimited(self) -> bool:
        return math.isinf(self.ratio)

    def deposit(self, now_s: float) -> None:
        """One request taken."""
        if self.unlimited:
            return
        self._advance(now_s)
        self.recent_requests += 1.0
        self.balance = min(self._cap(), self.balance + self.ratio)

    def withdraw(self, now_s: float) -> bool:
        """One retry or hedge wanted: True when the budget allows it (and it is counted)."""
        if self.unlimited:
            self.withdrawn += 1
            return True
        self._advance(now_s)
        if self.balance < 1.0 - 1e-9:  # ten deposits of 0.1 make one token
            self.refused += 1
            return False
        self.balance -= 1.0
        self.withdrawn += 1
        return True

    def _cap(self) -> float:
        return self.min_per_s * self.ttl_s + self.ratio * self.recent_requests

    def _advance(self, now_s: float) -> None:
        at = self.at_s
        self.at_s = now_s
        if at is None or now_s <= at:
            return
        elapsed = now_s - at
        self.recent_requests *= math.exp(-elapsed / self.ttl_s)
        self.balance = min(self._cap(), self.balance + self.min_per_s * elapsed)
