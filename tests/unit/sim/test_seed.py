"""`switchyard simulate --seed N` reruns a scenario with other random draws (arrivals and
service times), so results over several seeds can be reproduced."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from gateway.sim import simulate
from gateway.sim.scenario import load_scenario

STEADY = Path(__file__).resolve().parents[3] / "scenarios" / "steady.yaml"


def simulated(capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    simulate.add_arguments(parser)
    simulate.run(parser.parse_args(["--scenario", str(STEADY), "--short", "--json", *extra]))
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    out.pop("wall_s")
    return out


def test_the_seed_reproduces_a_run_and_another_seed_draws_another(
    capsys: pytest.CaptureFixture[str],
) -> None:
    scenario_seed = load_scenario(STEADY).seed
    default = simulated(capsys)
    assert simulated(capsys, "--seed", str(scenario_seed)) == default
    other = simulated(capsys, "--seed", str(scenario_seed + 1))
    assert other != default
    assert other["requests"] != default["requests"]  # the arrivals were drawn again
    assert simulated(capsys, "--seed", str(scenario_seed + 1)) == other
