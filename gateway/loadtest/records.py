"""What `switchyard load` records of a run: one row per request, in arrays.

Every request the load generator sends is one row: when it was sent (relative to
the run's start), which traffic stream it belongs to (model, SLA class), how long
its answer took, the gRPC status it ended with, the route that answered
(`switchyard_backend` / `switchyard_variant` of the response) and what the
gateway says it cost (`switchyard_cost_usd`). Rows are never dropped: a request
that got an error is a row with its status; `answered` is False only for requests
still outstanding when the run was cut short.

Kept as numpy arrays so a 2,000 requests/s run costs little memory, and written
as CSV (`requests.csv`) so SREs can read it with anything.

Imports numpy only: no grpc, no protobuf.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

NO_ROUTE = -1
"""`route` of a request no backend answered (an error from the gateway itself)."""


@dataclass(frozen=True, slots=True)
class Stream:
    """One traffic stream of the scenario, as sent."""

    model: str
    sla_class: str
    """The class attainment is reported under: the request's `sla_class`, `custom`
    for its own `sla_ms`, else `default`."""
    sla_ms: float
    """The latency target the request is held to (resolved from the scenario's policies)."""
    percentile: float = 99.0
    """The share of the class's requests (in %) that must be within `sla_ms`: its SLA is
    p`percentile` <= `sla_ms`."""


@dataclass(frozen=True, slots=True)
class FiredEvent:
    """A scenario event as it happened."""

    at_s: float
    """When it was applied, relative to the run's start."""
    label: str
    """e.g. `set_price big-cpu 0.80 USD/h`, `kill big-cpu (pid 1234)`."""
    ok: bool = True
    detail: str = ""


@dataclass(slots=True)
class Records:
    """One row per request sent, in send order."""

    streams: list[Stream]
    routes: list[str] = field(default_factory=list)
    """Route names, `backend/variant`, indexed by `route`."""
    statuses: list[str] = field(default_factory=list)
    """gRPC status names (`OK`, `UNAVAILABLE`, ...), indexed by `status`."""
    send_s: FloatArray = field(default_factory=lambda: np.zeros(0))
    scheduled_s: FloatArray = field(default_factory=lambda: np.zeros(0))
    """When the request was due (open loop): send_s - scheduled_s is the generator's lag."""
    stream: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    latency_ms: FloatArray = field(default_factory=lambda: np.zeros(0))
    """Send to answer (or error); NaN when not answered."""
    status: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    route: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    cost_usd: FloatArray = field(default_factory=lambda: np.zeros(0))
    answered: BoolArray = field(default_factory=lambda: np.zeros(0, dtype=np.bool_))

    def __len__(self) -> int:
        return len(self.send_s)

    @property
    def ok(self) -> BoolArray:
        if "OK" not in self.statuses:
            return np.zeros(len(self), dtype=np.bool_)
        ok: BoolArray = self.answered & (self.status == self.statuses.index("OK"))
        return ok

    def where(self, mask: BoolArray) -> Records:
        """The rows where `mask` (one bool per row) holds."""
        return Records(
            self.streams,
            self.routes,
            self.statuses,
            self.send_s[mask],
            self.scheduled_s[mask],
            self.stream[mask],
            self.latency_ms[mask],
            self.status[mask],
            self.route[mask],
            self.cost_usd[mask],
            self.answered[mask],
        )

    def class_names(self) -> list[str]:
        return sorted({s.sla_class for s in self.streams})

    def write_csv(self, path: Path) -> None:
        with path.open("w", newline="") as f:
            out = csv.writer(f)
            out.writerow(
                [
                    "send_s",
                    "scheduled_s",
                    "model",
                    "sla_class",
                    "sla_ms",
                    "latency_ms",
                    "status",
                    "backend",
                    "variant",
                    "cost_usd",
                ]
            )
            for i in range(len(self)):
                s = self.streams[int(self.stream[i])]
                r = int(self.route[i])
                backend, _, variant = (self.routes[r] if r >= 0 else "/").partition("/")
                out.writerow(
                    [
                        f"{self.send_s[i]:.6f}",
                        f"{self.scheduled_s[i]:.6f}",
                        s.model,
                        s.sla_class,
                        f"{s.sla_ms:g}",
                        "" if not self.answered[i] else f"{self.latency_ms[i]:.3f}",
                        self.statuses[int(self.status[i])] if self.answered[i] else "",
                        backend,
                        variant,
                        f"{self.cost_usd[i]:.12g}",
                    ]
                )
