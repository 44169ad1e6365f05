"""Domain errors shared by the workers and the gateway (its data plane and its admin API).

Each error carries a message meant for the caller (it names what was wrong).
`backends.protocol.status` is the one place that maps them to gRPC status codes: this
module imports no grpc and no protobuf, and nothing from the gateway.
"""

from __future__ import annotations


class SwitchyardError(Exception):
    """Base of every error a caller may see."""

    retry_after_ms: int | None = None
    """When a retry may succeed, where known (sent as gRPC's `grpc-retry-pushback-ms`
    trailer, so clients that follow gRPC's retry design wait that long)."""


class NotFound(SwitchyardError):
    """What the request names is not here (a model, a version, a backend)."""


class ModelNotFound(NotFound):
    """The model, or the model version, is not served here."""


class InvalidInput(SwitchyardError):
    """The request does not fit the model's signature, the protocol or the API."""


class Unauthenticated(SwitchyardError):
    """The caller did not prove who it is (a missing or wrong admin token)."""


class FailedPrecondition(SwitchyardError):
    """The request is well formed, but what it asks cannot be done in the present state."""


class Unavailable(SwitchyardError):
    """Nothing can serve the request right now; the caller may retry."""


class Exhausted(SwitchyardError):
    """A limit was reached (size, queue, SLA infeasible under a reject policy)."""

    def __init__(self, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class DeadlineExceeded(SwitchyardError):
    """The caller's deadline passed before an answer was ready."""


class Internal(SwitchyardError):
    """A fault on our side: a runtime failed on input it had accepted."""


SHOWN_CHARS = 64
"""The most characters of a caller's value an error message repeats: a message travels
in a gRPC trailer, whose size is limited, and a caller may send a name of megabytes."""


def shown(value: object) -> str:
    """`value` as an error message shows it: its repr, cut to SHOWN_CHARS characters."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 4] + "..."
