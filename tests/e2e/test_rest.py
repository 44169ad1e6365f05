"""The REST binding as users drive it: `switchyard serve` with its HTTP listener, the
reference client tritonclient.http in its own process, and `perf_analyzer -i http`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import (
    RunningGateway,
    perf_analyzer_throughput,
    start_serve,
    stop,
    write_fleet,
)

HERE = Path(__file__).resolve().parent
BACKENDS = {"small", "big"}


@pytest.fixture(scope="module")
def rest_served(
    repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    """A gateway on ports 0 (REST included) with two launched workers serving digits and
    echo, and a `gold` SLA class."""
    workdir = tmp_path_factory.mktemp("rest")
    fleet = write_fleet(
        workdir / "fleet.yaml",
        repository,
        [
            {
                "name": name,
                "address": "127.0.0.1:0",
                "hardware_class": f"cpu-{name}",
                "price_usd_per_hour": price,
                "launch": {"threads": 1, "models": ["digits", "echo"]},
            }
            for name, price in (("small", 0.04), ("big", 0.08))
        ],
    )
    settings = yaml.safe_load(fleet.read_text())
    settings["policies"] = {"classes": {"gold": {"latency_ms": 50}}}
    fleet.write_text(yaml.safe_dump(settings))
    gateway = start_serve(fleet, workdir)
    yield gateway
    stop(gateway)


def rest_address(gateway: RunningGateway) -> str:
    return f"127.0.0.1:{gateway.info['http_port']}"


@pytest.fixture(scope="module")
def seen(rest_served: RunningGateway, repository: Path) -> dict[str, Any]:
    """What tritonclient.http saw of the gateway (rest_client_check.py's report)."""
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "rest_client_check.py"),
            rest_address(rest_served),
            str(repository),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=HERE,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def test_health_metadata_config_and_index(seen: dict[str, Any]) -> None:
    assert seen["live"] and seen["ready"]
    assert seen["model_ready"] and seen["model_ready_v1"]
    assert not seen["unknown_model_ready"]
    assert seen["server_metadata"]["name"] == "switchyard"
    assert "statistics" in seen["server_metadata"]["extensions"]
    metadata = seen["model_metadata"]
    assert metadata == seen["model_metadata_v1"]
    assert metadata["name"] == "digits" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert [o["name"] for o in metadata["outputs"]] == ["label", "probabilities"]
    config = seen["model_config"]
    assert config["name"] == "digits" and config["max_batch_size"] == 64
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["input"][0]["dims"] == [64]
    index = {m["name"]: m for m in seen["index"]}
    assert set(index) == {"digits", "echo"}
    assert all(m["state"] == "READY" for m in index.values())


def test_infer_json_and_binary_with_parameters(seen: dict[str, Any]) -> None:
    for mode, binary in (("json", False), ("binary", True), ("binary_in_json_out", False)):
        result = seen[f"infer_{mode}"]
        assert result["id"] == f"req-{mode}", result
        assert result["model_name"] == "digits"
        assert result["labels_match"] and result["label_dtype"] == "int64", result
        assert result["binary"] is binary, result
        params = result["parameters"]
        assert params["switchyard_backend"] in BACKENDS
        assert params["switchyard_variant"] == "ort-cpu-fp32"
        assert (
            isinstance(params["switchyard_cost_usd"], float) and params["switchyard_cost_usd"] > 0
        )
        assert params["switchyard_attempts"] == 1
    assert seen["infer_versioned"] == {"model_version": "1", "labels_match": True}
    pinned = seen["infer_pinned"]
    assert pinned["labels_match"] and pinned["parameters"]["switchyard_variant"] == "ort-cpu-fp32"


def test_every_datatype_round_trips_through_echo(seen: dict[str, Any]) -> None:
    for mode in ("json", "binary"):
        result = seen[f"echo_{mode}"]
        assert result["id"] == f"echo-{mode == 'binary'}"
        assert all(result["matches"].values()), result["matches"]
        assert len(result["matches"]) == 13  # BOOL .. FP64, FP16, BYTES
    assert (
        seen["echo_json"]["binary_outputs"] == [] and len(seen["echo_json"]["json_outputs"]) == 13
    )
    assert (
        seen["echo_binary"]["json_outputs"] == []
        and len(seen["echo_binary"]["binary_outputs"]) == 13
    )


def test_compression_both_ways(seen: dict[str, Any]) -> None:
    assert seen["compressed"] == {
        "gzip-json": True,
        "gzip-binary": True,
        "deflate-json": True,
        "deflate-binary": True,
    }


def test_async_infers_at_once(seen: dict[str, Any]) -> None:
    assert [a["id"] for a in seen["async"]] == [f"async-{i}" for i in range(8)]
    assert all(a["label_match"] for a in seen["async"]), seen["async"]


def test_failures_reach_the_client_as_statuses_naming_the_problem(seen: dict[str, Any]) -> None:
    failures = seen["failures"]
    for case in ("bad_shape", "bad_shape_compressed"):
        # A compressed answer was asked for; the error still reads as JSON.
        assert failures[case]["status"] == "400", failures[case]
        assert "input 'input'" in failures[case]["message"]
        assert "[1, 63]" in failures[case]["message"]
    assert failures["unknown_model"] == {"status": "404", "message": "unknown model 'nope'"}
    assert failures["unknown_version"]["status"] == "404"
    assert "no version '99'" in failures["unknown_version"]["message"]


def test_statistics_count_the_infers(seen: dict[str, Any]) -> None:
    def counts(stats: dict[str, Any]) -> tuple[int, int]:
        (digits,) = (m for m in stats["model_stats"] if m["name"] == "digits")
        inference = digits["inference_stats"]
        return int(inference["success"]["count"]), int(inference["fail"]["count"])

    (ok_before, failed_before), (ok_after, failed_after) = (
        counts(seen["stats_before"]),
        counts(seen["stats_after"]),
    )
    # json, binary, binary in json out, pinned, versioned, four compressed, eight async.
    assert ok_after - ok_before == 17
    assert failed_after - failed_before == 2  # the two bad shapes
    assert {m["name"] for m in seen["all_stats"]["model_stats"]} == {"digits", "echo"}


def test_perf_analyzer_over_http(rest_served: RunningGateway, tmp_path: Path) -> None:
    address = rest_address(rest_served)
    assert perf_analyzer_throughput("http", address, "digits", tmp_path) > 0
