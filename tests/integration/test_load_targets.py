"""`switchyard load` with several `--target`s: the requests go to each in turn, as a
load balancer in front of several gateways would deal them (two real workers stand for
the gateways; a plain v2 server names no backend, so each answer is counted under the
address that answered it)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from tests import ROOT
from tests.integration.conftest import Worker

SCENARIO = """
scenario: two-targets
duration_s: 1
seed: 1
backends:
  - {name: w, price_usd_per_hour: 0.04, models: {digits: {p50_ms: 1, p99_ms: 2}}}
traffic:
  - {model: digits, rate_per_s: 40, arrivals: constant}
"""


async def test_requests_go_to_each_target_in_turn(
    two_workers: tuple[Worker, Worker], tmp_path: Path
) -> None:
    a, b = two_workers
    scenario = tmp_path / "two-targets.yaml"
    scenario.write_text(SCENARIO)
    env = {k: v for k, v in os.environ.items() if k != "SWITCHYARD_ADMIN_TOKEN"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "load",
        "--target",
        a.address,
        "--target",
        b.address,
        "--admin",
        a.address,
        "--token-file",
        str(tmp_path / "no-token"),
        "--scenario",
        str(scenario),
        "--json",
        "--quiet",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert out, err.decode(errors="replace")
    summary = json.loads(out.decode().splitlines()[-1])["summary"]
    assert summary["requests"] == summary["ok"] == 40
    by_target: dict[str, float] = {}
    for route, share in summary["shares"].items():
        target = route.split("/", 1)[0]
        by_target[target] = by_target.get(target, 0.0) + share
    assert by_target == {a.address: 0.5, b.address: 0.5}
