"""`switchyard backend` measures at start unless told not to: a worker process over a
repository with no profile serves the variant it measured fastest (the chain model of
tests/integration/backends/worker/test_measure_at_start.py, thousands of times apart),
saying so in its log; `--no-measure-at-start` serves ONNX Runtime fp32."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import grpc
import pytest

from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.e2e.conftest import ROOT, SWITCHYARD
from tests.integration.backends.worker.test_measure_at_start import (
    FAST,
    MODEL,
    SLOW,
    build_chain_repository,
)


def served_default(repository: Path, log: Path, *flags: str) -> str:
    """Starts a worker process with `flags`, returns its default variant for the chain
    model (its log, stderr, in `log`), and stops it."""
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [
                *SWITCHYARD,
                *("backend", "--repository", str(repository), "--listen", "127.0.0.1:0"),
                *("--threads", "1", "--hardware-class", "test-1c", *flags),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    try:
        assert process.stdout is not None
        address = None
        for line in process.stdout:  # its first line says where it listens
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "listening":
                    address = str(event["address"])
                    break
        assert address is not None, f"worker exited: {log.read_text()}"
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            config: pb.ModelConfig = stub.ModelConfig(
                pb.ModelConfigRequest(name=MODEL), timeout=30
            ).config
        return config.parameters["switchyard_variant"].string_value
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize(
    ("flags", "expected", "said"),
    [
        ((), FAST, "measured at start"),
        (("--no-measure-at-start",), SLOW, "no variant profiled or measured here"),
    ],
)
def test_a_worker_process_measures_at_start_by_default(
    tmp_path: Path, flags: tuple[str, ...], expected: str, said: str
) -> None:
    repository = build_chain_repository(tmp_path / "models")
    log = tmp_path / "worker.log"
    assert served_default(repository, log, *flags) == expected
    (line,) = [x for x in log.read_text().splitlines() if f"serving {MODEL} as" in x]
    assert f"serving {MODEL} as {expected} (" in line and said in line, line
