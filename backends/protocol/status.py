"""The one mapping from domain errors to gRPC status codes (servicers use it)."""

from __future__ import annotations

import grpc

from backends.protocol import errors

_CODES: dict[type[errors.SwitchyardError], grpc.StatusCode] = {
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Exhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Internal: grpc.StatusCode.INTERNAL,
}


def code_for(error: errors.SwitchyardError) -> grpc.StatusCode:
    """The status code a caller receives for `error`."""
    for cls in type(error).__mro__:
        code = _CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.UNKNOWN
