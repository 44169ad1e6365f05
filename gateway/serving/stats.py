"""Per-model request statistics of the gateway, for the ModelStatistics API.

Plain counters: imports no grpc and no protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ModelCounters:
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    inference_count: int = 0
    """Inferences, counting each row of a batch."""
    last_inference_ms: int = 0
    queue_ns: int = 0
    """Time in the gateway before the request left for a backend (parse, route)."""
    backend_ns: int = 0
    """Time spent waiting on backends, the gateway's view of compute."""

    def record(
        self, ok: bool, elapsed_ns: int, batch_size: int, now_ms: int, backend_ns: int = 0
    ) -> None:
        if ok:
            self.success_count += 1
            self.success_ns += elapsed_ns
            self.backend_ns += backend_ns
            self.queue_ns += max(0, elapsed_ns - backend_ns)
            self.inference_count += batch_size
            self.last_inference_ms = now_ms
        else:
            self.fail_count += 1
            self.fail_ns += elapsed_ns
