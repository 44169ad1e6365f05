"""The fleet file: validated, strict, documented defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import (
    BackendSettings,
    ConfigError,
    LaunchSettings,
    TracingSettings,
    load_fleet,
    parse_fleet,
)
from gateway.control.supervisor import worker_command

MINIMAL = """
backends:
  - name: a
    address: 127.0.0.1:9101
"""


def test_embedded_demo_fleet_launches_two_workers() -> None:
    config = load_fleet(None)
    assert [b.name for b in config.backends] == ["small-cpu", "big-cpu"]
    assert all(b.launch is not None for b in config.backends)
    assert config.gateway.listen == "127.0.0.1:8001"
    assert config.gateway.metrics == "127.0.0.1:8002"
    assert config.repository == Path.cwd() / "models"
    assert config.policies.classes["gold"].latency_ms == 10


def test_minimal_file_gets_documented_defaults(tmp_path: Path) -> None:
    config = parse_fleet(MINIMAL, tmp_path)
    assert config.repository == tmp_path / "models"
    assert config.backends[0].price_usd_per_hour == 0.0
    assert config.backends[0].launch is None
    assert config.policies.default.latency_ms == 100
    assert config.policies.default.on_infeasible == "fastest"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINIMAL + "    pricee: 3\n", "pricee"),
        (MINIMAL.replace("127.0.0.1:9101", "localhost"), "address"),
        (MINIMAL + "    price_usd_per_hour: -1\n", "price_usd_per_hour"),
        (MINIMAL + "    launch: {threads: 0}\n", "threads"),
        (MINIMAL + "    launch: {batching: {cnn: {max_rows: 4}}}\n", "max_rows"),
        (MINIMAL + "    launch: {batching: {cnn: {max_batch_rows: -1}}}\n", "max_batch_rows"),
        (MINIMAL + "  - name: a\n    address: 127.0.0.1:9102\n", "backend names must be unique: a"),
        (MINIMAL + "  - name: b\n    address: 127.0.0.1:9101\n", "addresses must be unique"),
        ("backends: []\n", "backends"),
        (MINIMAL + "policies:\n  default: {objective: cheapest}\n", "objective"),
        (MINIMAL + "policies:\n  classes:\n    gold: {latency: 10}\n", "latency"),
        ("- just a list\n", "mapping"),
        ("backends: [\n", "not valid YAML"),
    ],
)
def test_mistakes_are_errors_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_fleet(text, tmp_path)
    assert message in str(info.value)


def test_port_zero_may_repeat_for_launched_workers(tmp_path: Path) -> None:
    text = """
backends:
  - {name: a, address: "127.0.0.1:0", launch: {threads: 1}}
  - {name: b, address: "127.0.0.1:0", launch: {threads: 2}}
"""
    assert len(parse_fleet(text, tmp_path).backends) == 2


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read fleet file"):
        load_fleet(tmp_path / "nope.yaml")


def test_per_model_batching_reaches_the_worker_command(tmp_path: Path) -> None:
    text = MINIMAL + (
        "    launch:\n"
        "      max_queue_delay_us: 50\n"
        "      batching: {resnet: {max_batch_rows: 8, max_queue_delay_us: 2000}, cnn: {}}\n"
    )
    backend = parse_fleet(text, tmp_path).backends[0]
    command = worker_command(backend, tmp_path, "127.0.0.1:0")
    at = command.index("--batching")
    assert command[at + 1 : at + 3] == ["cnn=0:0", "resnet=8:2000"]
    assert command[command.index("--max-queue-delay-us") + 1] == "50"


def test_the_gateways_tracing_reaches_the_worker_command(tmp_path: Path) -> None:
    backend = BackendSettings(name="w", address="127.0.0.1:0", launch=LaunchSettings())
    plain = worker_command(backend, tmp_path, "127.0.0.1:0")
    assert not [a for a in plain if a.startswith("--trace")]
    tracing = TracingSettings(exporter="file", file=tmp_path / "spans.jsonl", sample_ratio=0.25)
    command = worker_command(backend, tmp_path, "127.0.0.1:0", tracing=tracing)
    assert command[len(plain) :] == [
        *("--trace-exporter", "file"),
        *("--trace-file", str(tmp_path / "spans.jsonl")),
        *("--trace-sample-ratio", "0.25"),
    ]
    # Unset settings stay unset: the worker reads OTEL_* for them, as the gateway does.
    assert worker_command(backend, tmp_path, "127.0.0.1:0", tracing=TracingSettings()) == plain
