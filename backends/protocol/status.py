"""The one mapping from domain errors to gRPC status codes, and the one place it is
applied to a server: `aborts_with_status` on a servicer class. The worker's and the
admin API's servicers take it; the gateway's data plane reads `code_for` too.

Imports grpc and the domain errors only: nothing from the gateway, no generated code.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from backends.protocol import errors

log = logging.getLogger("switchyard.status")

_CODES: dict[type[errors.SwitchyardError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Exhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Internal: grpc.StatusCode.INTERNAL,
}

ServicerClass = TypeVar("ServicerClass", bound=type)
Response = TypeVar("Response")


class StatusError(errors.SwitchyardError):
    """An error whose status was decided elsewhere (a backend's answer, which the
    gateway passes on unchanged): it carries its own code."""

    def __init__(
        self, code: grpc.StatusCode, details: str, retry_after_ms: int | None = None
    ) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.retry_after_ms = retry_after_ms


def code_for(error: errors.SwitchyardError) -> grpc.StatusCode:
    """The status code a caller receives for `error`."""
    if isinstance(error, StatusError):
        return error.code
    for cls in type(error).__mro__:
        code = _CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.UNKNOWN


PUSHBACK_TRAILER = "grpc-retry-pushback-ms"
"""The trailer by which a shed call says when to retry (gRPC's retry design, A6)."""


def trailers_for(error: errors.SwitchyardError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that goes with `error`: its retry hint, if it has one."""
    if error.retry_after_ms is None:
        return ()
    return ((PUSHBACK_TRAILER, str(max(1, error.retry_after_ms))),)


def retry_after_ms(trailers: object) -> int | None:
    """The retry hint among a call's trailing metadata (pairs of key and value), if any."""
    if not trailers:
        return None
    for key, value in trailers:  # type: ignore[attr-defined]
        if key == PUSHBACK_TRAILER:
            try:
                return max(0, int(value))
            except (TypeError, ValueError):
                return None
    return None


def internal_message(exc: BaseException) -> str:
    """What a caller is told of an unexpected exception: that it is ours, and its kind
    and message (cut short: it travels in a trailer)."""
    text = str(exc)
    if len(text) > errors.SHOWN_CHARS * 4:
        text = text[: errors.SHOWN_CHARS * 4] + "..."
    return f"internal error: {type(exc).__name__}: {text}"


def aborts_with_status(servicer: ServicerClass) -> ServicerClass:
    """Class decorator for a grpc.aio servicer: each unary RPC method it defines (a
    public coroutine method taking `(request, context)`) that raises a SwitchyardError
    ends the call with `code_for` that error and its message; any other exception (a
    fault of ours) with INTERNAL and a message naming it, logged once with its
    traceback: never gRPC's UNKNOWN. Streaming methods (async generators) report their
    errors in their own messages and are left as they are."""
    for name, method in list(vars(servicer).items()):
        if (
            not name.startswith("_")
            and inspect.iscoroutinefunction(method)
            and list(inspect.signature(method).parameters)[-1:] == ["context"]
        ):
            setattr(servicer, name, _aborting(method))
    return servicer


def _aborting(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Response]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Response]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await method(self, request, context)
        except errors.SwitchyardError as exc:
            await context.abort(code_for(exc), str(exc), trailing_metadata=trailers_for(exc))
            raise  # abort raised already: not reached
        except grpc.aio.AbortError:
            raise  # the method ended the call itself
        except Exception as exc:
            log.exception("%s failed", method.__qualname__)
            await context.abort(grpc.StatusCode.INTERNAL, internal_message(exc))
            raise  # abort raised already: not reached

    return wrapper
