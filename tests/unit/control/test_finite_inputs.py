"""NaN and infinity never become a price, a carbon or power figure, a latency target or
a percentile: the fleet file, the policies and the price schedule refuse them, naming
the field or the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.protocol.errors import InvalidInput
from gateway.config import ConfigError, load_fleet, parse_fleet
from gateway.control.admin import parse_policies
from gateway.control.plane import read_price_schedule
from gateway.sim.scenario import ScenarioError, parse_scenario

ROOT = Path(__file__).resolve().parents[3]
BACKEND = "backends:\n  - {{name: a, address: 127.0.0.1:9101, {field}: {value}}}\n"


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", ".NaN", ".Inf"])
@pytest.mark.parametrize("field", ["price_usd_per_hour", "carbon_g_per_kwh", "power_w"])
def test_fleet_file_backend_figures_must_be_finite(tmp_path: Path, field: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"(?s){field}.*finite number"):
        parse_fleet(BACKEND.format(field=field, value=value), tmp_path)


@pytest.mark.parametrize(
    "policy",
    [
        "{latency_ms: .inf}",
        "{latency_ms: .nan}",
        "{percentile: .nan}",
        "{max_cost_usd_per_1m: .inf}",
    ],
)
def test_policies_must_be_finite(tmp_path: Path, policy: str) -> None:
    field = policy[1:].split(":")[0]
    text = BACKEND.format(field="price_usd_per_hour", value=1) + f"policies:\n  default: {policy}\n"
    with pytest.raises(ConfigError, match=rf"(?s){field}.*finite number"):
        parse_fleet(text, tmp_path)
    with pytest.raises(InvalidInput, match=rf"(?s){field}.*finite number"):
        parse_policies(f"models:\n  digits: {policy}\n")


def test_gateway_times_must_be_finite(tmp_path: Path) -> None:
    text = "gateway: {probe_interval_s: .inf}\n" + BACKEND.format(field="power_w", value=1)
    with pytest.raises(ConfigError, match=r"(?s)probe_interval_s.*finite number"):
        parse_fleet(text, tmp_path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("5,a,nan", "usd_per_hour must be a finite number, not nan"),
        ("5,a,inf", "usd_per_hour must be a finite number, not inf"),
        ("5,a,-Infinity", "usd_per_hour must be a finite number, not -inf"),
        ("NaN,a,0.5", "offset_s must be a finite number, not nan"),
        ("inf,a,0.5", "offset_s must be a finite number, not inf"),
        ("5,a,cheap", "could not convert string to float: 'cheap'"),
    ],
)
def test_price_schedule_rows_must_be_finite_naming_the_line(
    tmp_path: Path, row: str, message: str
) -> None:
    path = tmp_path / "prices.csv"
    path.write_text(f"offset_s,backend,usd_per_hour\n0,a,0.1\n{row}\n")
    with pytest.raises(ConfigError) as caught:
        read_price_schedule(path)
    assert str(caught.value) == f"{path}:3: {message}"


def test_a_fleet_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_bytes(b"\xff\xfe\x00\x01backends: []")
    with pytest.raises(ConfigError, match=r"cannot read fleet file .*fleet\.yaml: .*utf-8"):
        load_fleet(path)


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("usd_per_hour: 0.80", "usd_per_hour: .nan", "usd_per_hour"),
        ("price_usd_per_hour: 0.04", "price_usd_per_hour: .inf", "price_usd_per_hour"),
    ],
)
def test_scenario_prices_must_be_finite(tmp_path: Path, old: str, new: str, field: str) -> None:
    """A scenario's prices reach the live gateway through the admin API (`switchyard
    load`) and the simulator's router: NaN and infinity stop at the file."""
    text = (ROOT / "scenarios" / "price-spike.yaml").read_text()
    assert old in text
    with pytest.raises(ScenarioError, match=rf"(?s){field}.*finite number"):
        parse_scenario(text.replace(old, new), ROOT / "scenarios")
