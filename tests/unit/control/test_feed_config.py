"""The fleet file's `feeds:`: strict per kind, selectors that must cover backends, one
feed per backend's price (or carbon), paths relative to the fleet file."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from gateway.config import ConfigError, parse_fleet

BACKENDS = [
    {
        "name": "gpu",
        "address": "127.0.0.1:9101",
        "hardware_class": "gpu-a10g",
        "price_usd_per_hour": 1.0,
    },
    {"name": "c1", "address": "127.0.0.1:9102", "hardware_class": "cpu-4c"},
    {"name": "c2", "address": "127.0.0.1:9103", "hardware_class": "cpu-4c"},
]


def fleet(*feeds: Mapping[str, object]) -> str:
    return yaml.safe_dump({"backends": BACKENDS, "feeds": list(feeds)})


SPOT = {
    "name": "spot",
    "kind": "aws-spot",
    "file": "feeds/spot.json",
    "selectors": [{"backends": ["gpu"], "instance_type": "g5.xlarge"}],
}


def test_a_feed_with_defaults_and_paths_from_the_fleet_files_folder(tmp_path: Path) -> None:
    config = parse_fleet(
        fleet(
            SPOT,
            {
                "name": "grid",
                "kind": "electricity-maps",
                "url": "https://api.electricitymap.org/v3/carbon-intensity/latest?zone=DE",
                "auth_token_file": "secrets/em-token",
                "auth_header": "auth-token",
                "selectors": [{"hardware_class": "cpu-4c", "zone": "DE"}],
            },
        ),
        tmp_path,
    )
    spot, grid = config.feeds
    assert spot.file == tmp_path / "feeds/spot.json"
    assert (spot.interval_s, spot.stale_after_s, spot.timeout_s) == (60.0, 900.0, 10.0)
    assert spot.sets_prices and not grid.sets_prices
    assert grid.auth_token_file == tmp_path / "secrets/em-token"


@pytest.mark.parametrize(
    ("feed", "message"),
    [
        ({**SPOT, "url": "https://x/y"}, "set exactly one of `url` and `file`"),
        ({**SPOT, "file": None, "url": "ftp://x/y"}, "String should match pattern"),
        (
            {**SPOT, "interval_s": 60, "stale_after_s": 30},
            "stale_after_s (30) must be at least interval_s (60)",
        ),
        ({**SPOT, "kind": "azure"}, "Input should be 'aws-spot'"),
        ({**SPOT, "selectors": [{"backends": ["gpu"]}]}, "selector 0: needs instance_type"),
        (
            {**SPOT, "selectors": [{"backends": ["gpu"], "instance_type": "g5", "zone": "DE"}]},
            "zone is not for aws-spot feeds",
        ),
        (
            {**SPOT, "selectors": [{"instance_type": "g5"}]},
            "names `backends` or a `hardware_class`",
        ),
        (
            {**SPOT, "selectors": [{"backends": ["gpu"], "instance_type": "g5", "multiplier": 0}]},
            "greater than 0",
        ),
        (
            {**SPOT, "selectors": [{"backends": ["nope"], "instance_type": "g5"}]},
            "selector 0: unknown backends nope",
        ),
        (
            {**SPOT, "selectors": [{"hardware_class": "tpu", "instance_type": "g5"}]},
            "no backend has hardware_class 'tpu'",
        ),
        (
            {
                **SPOT,
                "selectors": [
                    {"backends": ["c1"], "instance_type": "a"},
                    {"hardware_class": "cpu-4c", "instance_type": "b"},
                ],
            },
            "backends c1 are covered by two of its selectors",
        ),
        (
            {
                **SPOT,
                "kind": "electricity-maps",
                "selectors": [{"backends": ["gpu"], "zone": "DE", "multiplier": 2}],
            },
            "multiplier is not for electricity-maps feeds",
        ),
        ({**SPOT, "token": "inline-secret"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_feeds_are_errors_naming_what_is_wrong(
    tmp_path: Path, feed: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_fleet(fleet(feed), tmp_path)
    assert message in str(caught.value)


def test_a_backend_priced_by_two_feeds_is_an_error_but_price_and_carbon_may_mix(
    tmp_path: Path,
) -> None:
    schedule = {
        "name": "sched",
        "kind": "schedule",
        "file": "s.csv",
        "selectors": [{"backends": ["gpu"]}],
    }
    with pytest.raises(
        ConfigError, match="backend 'gpu' gets its price from two feeds: spot and sched"
    ):
        parse_fleet(fleet(SPOT, schedule), tmp_path)
    with pytest.raises(ConfigError, match="feed names must be unique: spot"):
        parse_fleet(
            fleet(SPOT, {**schedule, "name": "spot", "selectors": [{"backends": ["c1"]}]}), tmp_path
        )
    carbon = {
        "name": "grid",
        "kind": "electricity-maps",
        "file": "g.json",
        "selectors": [{"backends": ["gpu"], "zone": "DE"}],
    }
    assert len(parse_fleet(fleet(SPOT, carbon), tmp_path).feeds) == 2
    # gcp-billing selectors on one backend add up (a machine's vCPU and memory SKUs).
    gcp = {
        "name": "gcp",
        "kind": "gcp-billing",
        "file": "skus.json",
        "selectors": [
            {"backends": ["c1"], "sku_id": "A", "multiplier": 4},
            {"backends": ["c1"], "sku_id": "B", "multiplier": 16},
        ],
    }
    assert len(parse_fleet(fleet(gcp), tmp_path).feeds[0].selectors) == 2
