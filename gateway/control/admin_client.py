"""A client of the admin API, for `switchyard admin` and the load generator: where the
gateway's admin API listens and its token (a fleet file, SWITCHYARD_ADMIN_TOKEN, a token
file), and calls carrying the bearer token and a deadline, over TLS when the admin API
listens with `gateway.tls` (`tls_security`: its CA, and a client certificate for mTLS).

Imports grpc and the generated admin stubs; nothing of the servicer's side but how the
token is found (gateway.control.admin).
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from google.protobuf.message import Message

from gateway.config import ConfigError, load_fleet
from gateway.control.admin_token import NOT_SHARED, TOKEN_ENV, admin_token, read_token_file
from gateway.security import ChannelSecurity, client_security, secure_channel
from protos import admin_pb2_grpc


class AdminCallError(Exception):
    """An admin call ended with an error status: the method, where, and the status."""

    def __init__(self, method: str, target: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"admin {method} at {target}: {code.name}: {details}")
        self.code = code
        self.details = details


def admin_access(
    fleet: Path | None, target: str | None, token_file: Path | None
) -> tuple[str, str | None]:
    """Where the admin API of the gateway running `fleet` (None: the demo fleet) listens,
    unless `target` says, and its token: `token_file`'s, else SWITCHYARD_ADMIN_TOKEN,
    else the fleet's `admin_token_file`; None when there is none."""
    config = load_fleet(fleet)
    token = None
    if token_file is not None:
        token = read_token_file(token_file, create=False)
    if token is None:
        token = admin_token(config, create=False)
    return target or config.gateway.admin, token


def no_token(what: str) -> ConfigError:
    """The error when `what` needs the admin API and no token was found."""
    return ConfigError(
        f"{what}: set {TOKEN_ENV}, or pass --token-file, or name gateway.admin_token_file "
        "in the fleet file"
    )


def tls_security(
    ca_file: Path | None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    server_name: str | None = None,
) -> ChannelSecurity | None:
    """TLS towards an admin API from its CA file (and a client certificate and key for
    mTLS); None, plaintext, when no file is named. ConfigError when a file cannot be
    read or the certificate comes without its key."""
    if ca_file is None and cert_file is None and key_file is None:
        return None
    return client_security(ca_file, cert_file, key_file, server_name)


class AdminClient:
    """One channel to a gateway's admin API (plaintext, or TLS with `security`); every
    call carries the bearer token and a deadline. Use as an async context manager, or
    close()."""

    def __init__(
        self,
        target: str,
        token: str,
        timeout_s: float = 10.0,
        security: ChannelSecurity | None = None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._channel = secure_channel(target, security)
        self._stub = admin_pb2_grpc.AdminStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.not_shared: str | None = None
        """Why the last change applied on this gateway only (its state store out of
        reach: it is written when the store is back); None when it was shared."""

    async def call(self, method: str, request: Message) -> Any:
        """The admin API's `method` (ListRoutes, SetPrice, ...) with `request`;
        AdminCallError when it ends with an error status."""
        try:
            call = getattr(self._stub, method)(
                request, metadata=self._metadata, timeout=self.timeout_s
            )
            reply = await call
            trailing = await call.trailing_metadata()
        except grpc.aio.AioRpcError as exc:
            raise AdminCallError(method, self.target, exc.code(), exc.details() or "") from exc
        self.not_shared = next((str(v) for k, v in trailing or () if k == NOT_SHARED), None)
        return reply

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.close()
