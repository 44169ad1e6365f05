"""`make demo`: the price-spike scenario played live, with fastest-only beside it.

Starts the gateway on the scenario's live fleet (`scenarios/fleets/three-tier.yaml`:
the same `switchyard serve` as `make serve`, on three local workers standing for
the modelled small CPU, big CPU and GPU), runs `switchyard load` on price-spike
with the fastest-only baseline replayed after it, prints the tables and the path
of the report's PNG, and stops the gateway. Opens nothing.

    python -m gateway.loadtest.demo [--scenario FILE] [--short] [--report DIR]

Imports no grpc and no generated protobuf: it runs the gateway and `switchyard load` as
processes.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gateway.config import load_fleet
from gateway.sim.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0


def _busy(address: str) -> bool:
    host, _, port = address.rpartition(":")
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, int(port))) == 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.loadtest.demo", description=__doc__)
    parser.add_argument("--scenario", type=Path, default=ROOT / "scenarios" / "price-spike.yaml")
    parser.add_argument("--short", action="store_true", help="the scenario's short form")
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "demo")
    parser.add_argument("--baseline", default="fastest-only")
    args = parser.parse_args(argv)
    scenario = load_scenario(args.scenario)
    fleet_path = scenario.live.fleet
    fleet = load_fleet(fleet_path)
    busy = [a for a in (fleet.gateway.listen, fleet.gateway.admin) if _busy(a)]
    if busy:
        print(
            f"demo: {', '.join(busy)} already in use (is `make serve` running? stop it first)",
            file=sys.stderr,
        )
        return 2
    args.report.mkdir(parents=True, exist_ok=True)
    ready = args.report / "ready.json"
    ready.unlink(missing_ok=True)
    env = {**os.environ, "SWITCHYARD_ADMIN_TOKEN": secrets.token_urlsafe(24)}
    log = (args.report / "gateway.log").open("wb")
    switchyard = [sys.executable, "-m", "gateway.cli"]
    command = [*switchyard, "serve", "--ready-file", str(ready)]
    if fleet_path is not None:
        command += ["--config", str(fleet_path)]
    print(f"starting the gateway: {' '.join(command[2:])}", flush=True)
    gateway = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.exists():
            if gateway.poll() is not None or time.monotonic() > deadline:
                print(f"demo: the gateway did not start; see {log.name}", file=sys.stderr)
                return 1
            time.sleep(0.2)
        info = json.loads(ready.read_text())
        load = [
            *switchyard,
            "load",
            "--target",
            str(info["address"]),
            "--admin",
            str(info["admin"]),
            "--scenario",
            str(args.scenario),
            "--report",
            str(args.report),
            "--baseline",
            args.baseline,
        ]
        if args.short:
            load.append("--short")
        print(f"running: switchyard {' '.join(load[3:])}", flush=True)
        code = subprocess.run(load, cwd=ROOT, env=env, check=False).returncode
        print(f"chart: {args.report / 'report.png'}")
        return code
    finally:
        gateway.send_signal(signal.SIGTERM)
        try:
            gateway.wait(timeout=20)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
