"""Two workers over the demo repository serving digits, for gateways that the
control-plane tests start (and restart) in process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.conftest import Worker, launch_worker


@pytest.fixture
async def pair(repository: Path) -> AsyncIterator[tuple[Worker, Worker]]:
    a = await launch_worker(repository, threads=1, hardware_class="test-1c", models=("digits",))
    b = await launch_worker(repository, threads=1, hardware_class="test-1c", models=("digits",))
    yield a, b
    await a.stop()
    await b.stop()
