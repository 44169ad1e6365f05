"""Domain errors shared by the workers and the gateway.

Each error carries a message meant for the caller (it names what was wrong).
`backends.protocol.status` is the one place that maps them to gRPC status codes; nothing
here imports grpc or protobuf.
"""

from __future__ import annotations


class SwitchyardError(Exception):
    """Base of every error a caller may see."""


class ModelNotFound(SwitchyardError):
    """The model, or the model version, is not served here."""


class InvalidInput(SwitchyardError):
    """The request does not fit the model's signature or the protocol."""


class Unavailable(SwitchyardError):
    """Nothing can serve the request right now; the caller may retry."""


class Exhausted(SwitchyardError):
    """A limit was reached (size, queue, SLA infeasible under a reject policy)."""


class DeadlineExceeded(SwitchyardError):
    """The caller's deadline passed before an answer was ready."""


class Internal(SwitchyardError):
    """A fault on our side: a runtime failed on input it had accepted."""
