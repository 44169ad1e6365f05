"""The admin API's token and the names its clients share with it, apart from the API
itself: the admin CLI reads them without importing the control plane.

The token comes from the environment variable SWITCHYARD_ADMIN_TOKEN, else from the file
the fleet names (`gateway.admin_token_file`, created with a random token when missing,
readable by its owner only).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import FleetConfig

TOKEN_ENV = "SWITCHYARD_ADMIN_TOKEN"
NOT_SHARED = "switchyard-not-shared"
"""Trailing metadata of a change applied on this gateway that its shared state store
did not take in time (unreachable): why. The change is written when the store is back."""


def admin_token(config: FleetConfig, create: bool = True) -> str | None:
    """The admin token: the environment's, else the fleet's token file (created when
    missing and `create`), else None."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    path = config.gateway.admin_token_file
    if path is None:
        return None
    return read_token_file(path, create)


def read_token_file(path: Path, create: bool) -> str | None:
    try:
        token = path.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token
