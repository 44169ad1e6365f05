"""A latency probe through a real gateway's prober to a real worker: its sample is
the probed inference less the round trip of the connection it just woke, not less a
round trip measured before (the gateway's first health probe holds the connection's
set-up, and the first latency probes go with it)."""

from __future__ import annotations

import time
from pathlib import Path

from gateway.routing.estimates import LatencyEstimate, NetworkEstimate
from gateway.server import start_gateway
from tests.integration.conftest import fleet_config, launch_worker
from tests.waiting import wait_until

EMULATED_MS = 40.0
"""The worker's emulated service time: well above any round trip here."""
SET_UP_RTT_MS = 50.0
"""A first round trip that held a connection's set-up on a busy host."""


async def test_a_latency_probe_takes_the_round_trip_of_its_own_connection(
    repository: Path,
) -> None:
    worker = await launch_worker(
        repository,
        threads=1,
        hardware_class="test-1c",
        models=("digits",),
        emulate_latency_ms=EMULATED_MS,
    )
    gw = await start_gateway(
        fleet_config({"one": (worker.address, 0.04)}, latency_probe_interval_s=0)
    )
    try:
        await wait_until(lambda: bool(gw.fleet.available_routes("digits")), what="digits routed")
        # No health probe from here on: the only round trips are the latency probe's.
        await gw.prober.stop()
        state = gw.fleet.backends["one"]
        state.network = NetworkEstimate()
        state.network.observe(SET_UP_RTT_MS)
        (route,) = [r for r in gw.fleet.routes("digits") if r.default]
        route.estimate = LatencyEstimate()  # its first sample sets its mean
        assert await gw.prober.probe_latency(time.monotonic(), 0.0) == 1
        assert state.network.rtt_ms < SET_UP_RTT_MS
        # Less the stale 50 ms, the 40 ms inference would have been floored at a quarter
        # of its latency (about 10 ms).
        assert route.estimate.samples == 1
        assert route.estimate.mean_ms >= EMULATED_MS / 2, route.estimate.mean_ms
    finally:
        await gw.stop()
        await worker.stop()
