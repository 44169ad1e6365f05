"""The fleet file's `discovery` block: a backend entry has `address` or `discovery`,
never both or neither, and a discovery group is never launched."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, parse_fleet

GROUP = """
backends:
  - name: workers
    hardware_class: cpu-x86-64-v4-2c
    price_usd_per_hour: 0.08
    discovery: {dns: workers.switchyard.svc.cluster.local, port: 9000}
"""


def test_a_discovery_group_gets_documented_defaults(tmp_path: Path) -> None:
    config = parse_fleet(GROUP, tmp_path)
    (group,) = config.backends
    assert group.address is None
    assert group.discovery is not None
    assert group.discovery.dns == "workers.switchyard.svc.cluster.local"
    assert group.discovery.port == 9000
    assert group.discovery.interval_s == 5.0
    assert group.discovery.timeout_s == 2.0
    assert group.discovery.nameserver is None
    assert group.discovery.empty_after_s == 30.0
    with pytest.raises(ValueError, match="discovery group"):
        group.fixed_address  # noqa: B018


def test_a_group_sits_beside_static_backends_and_names_its_nameserver(tmp_path: Path) -> None:
    text = (
        GROUP.replace("port: 9000}", "port: 9000, nameserver: '127.0.0.1:5353', interval_s: 1}")
        + "  - name: static\n    address: 127.0.0.1:9101\n"
    )
    config = parse_fleet(text, tmp_path)
    group, static = config.backends
    assert group.discovery is not None and group.discovery.nameserver == "127.0.0.1:5353"
    assert group.discovery.interval_s == 1
    assert static.fixed_address == "127.0.0.1:9101"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            GROUP + "    address: 127.0.0.1:9101\n",
            "exactly one of `address` (one backend) and `discovery`",
        ),
        ("backends:\n  - name: a\n    price_usd_per_hour: 1\n", "exactly one of `address`"),
        (GROUP + "    launch: {threads: 1}\n", "not launched"),
        (GROUP.replace("port: 9000", "port: 0"), "port"),
        (GROUP.replace("port: 9000", "port: 70000"), "port"),
        (GROUP.replace(", port: 9000", ""), "port"),
        (GROUP.replace("workers.switchyard", "workers..switchyard"), "dns"),
        (GROUP.replace("workers.switchyard", "work ers.switchyard"), "dns"),
        (GROUP.replace("port: 9000", "port: 9000, interval_s: 0"), "interval_s"),
        (GROUP.replace("port: 9000", "port: 9000, nameserver: dns"), "nameserver"),
        (GROUP.replace("port: 9000", "port: 9000, ttl: 3"), "ttl"),
        (GROUP + GROUP.removeprefix("\nbackends:\n"), "backend names must be unique: workers"),
    ],
)
def test_discovery_mistakes_are_errors_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_fleet(text, tmp_path)
    assert message in str(info.value)
