"""The parent of `switchyard serve --processes N`: the fleet its processes serve, and
the ports it holds for them."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from gateway.config import BackendTLS, FleetConfig
from gateway.control.processes import process_config, reserve_port, with_port

FLEET: dict[str, Any] = {
    "repository": "/models",
    "gateway": {
        "listen": "0.0.0.0:0",
        "metrics": "0.0.0.0:9102",
        "http": "127.0.0.1:8000",
        "admin": "127.0.0.1:0",
        "state": "memory",
        "watch_config_s": 2,
    },
    "backends": [
        {
            "name": "local",
            "address": "127.0.0.1:0",
            "price_usd_per_hour": 0.04,
            "launch": {"threads": 2, "models": ["digits"]},
        },
        {"name": "remote", "address": "10.0.0.7:8001", "slots": 4},
    ],
}
TLS = BackendTLS(ca_file=Path("/p/ca.crt"), cert_file=Path("/p/c.crt"), key_file=Path("/p/c.key"))


def test_each_process_serves_the_held_ports_and_reaches_the_workers_as_remote_backends() -> None:
    config = FleetConfig.model_validate(FLEET)
    served = process_config(
        config,
        {"listen": 41001, "http": 8000, "admin": 41003},
        {"local": "127.0.0.1:39001"},
        TLS,
        "unix:///run/redis.sock?db=0",
    )
    gateway = served.gateway
    assert (gateway.listen, gateway.http, gateway.admin) == (
        "0.0.0.0:41001",
        "127.0.0.1:8000",
        "127.0.0.1:41003",
    )
    assert gateway.metrics == "127.0.0.1:0"  # its own, beside the parent's merged one
    assert gateway.state == "unix:///run/redis.sock?db=0"
    assert gateway.watch_config_s == 0
    local, remote = served.backends
    assert local.launch is None
    assert (local.address, local.slots, local.tls) == ("127.0.0.1:39001", 2, TLS)
    assert local.price_usd_per_hour == 0.04
    assert remote == config.backends[1]
    # What the processes read back is what was meant (the parent writes it as JSON).
    assert FleetConfig.model_validate_json(served.model_dump_json()) == served


def test_a_worker_not_listening_yet_keeps_its_configured_address() -> None:
    fleet = {**FLEET, "backends": [{**FLEET["backends"][0], "address": "127.0.0.1:9101"}]}
    served = process_config(FleetConfig.model_validate(fleet), {}, {}, TLS, "redis://r:6379/0")
    assert served.backends[0].address == "127.0.0.1:9101"


@pytest.mark.parametrize(
    ("listen", "port", "expected"),
    [("127.0.0.1:0", 5, "127.0.0.1:5"), ("[::1]:8001", 9, "[::1]:9"), ("h:1", 2, "h:2")],
)
def test_with_port(listen: str, port: int, expected: str) -> None:
    assert with_port(listen, port) == expected


def test_a_held_port_takes_the_processes_listeners_and_no_other_program() -> None:
    held = reserve_port("127.0.0.1:0")
    try:
        port = held.getsockname()[1]
        assert port != 0
        with socket.socket() as process:  # a process of the group joins it
            process.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            process.bind(("127.0.0.1", port))
            process.listen()
            with socket.socket() as other, pytest.raises(OSError):
                other.bind(("127.0.0.1", port))
    finally:
        held.close()


@pytest.mark.parametrize("reuse_port", [False, True])
def test_a_port_another_program_listens_on_is_refused(reuse_port: bool) -> None:
    with socket.socket() as other:
        if reuse_port:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(OSError):
            reserve_port(f"127.0.0.1:{other.getsockname()[1]}")
