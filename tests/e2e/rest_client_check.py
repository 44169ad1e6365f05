"""Drives a server's REST endpoint with the reference client, tritonclient.http, in its
own process (its package must not share a process with tritonclient.grpc or our
protos). Prints one JSON object with what it saw; the e2e tests assert on it.

Usage: python rest_client_check.py HOST:PORT REPOSITORY
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

ECHO_DTYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
"""The echo model's inputs `in_<datatype>` (shape [N, 4]), each returned as `out_<datatype>`."""

ROWS = 3


def echo_values(datatype: str) -> np.ndarray:
    """Values that tell the datatype's edges apart (its extremes where it has them)."""
    dtype = ECHO_DTYPES[datatype]
    count = ROWS * 4
    values: np.ndarray
    if datatype == "BOOL":
        values = np.arange(count) % 3 == 0
    elif datatype == "BYTES":
        values = np.array([f"s{i}-é✓".encode() for i in range(count)], dtype=np.object_)
    elif datatype.startswith("FP"):
        finfo = np.finfo(dtype)
        values = np.linspace(-2.5, 2.5, count).astype(dtype)
        values[0], values[1] = finfo.max, finfo.tiny
    else:
        iinfo = np.iinfo(dtype)
        values = np.arange(count).astype(dtype)
        values[0], values[-1] = iinfo.min, iinfo.max
    return values.reshape(ROWS, 4)


def same(expected: np.ndarray, got: np.ndarray | None) -> bool:
    if got is None or expected.shape != got.shape:
        return False
    if expected.dtype == np.object_:
        as_bytes = [v if isinstance(v, bytes) else str(v).encode() for v in got.ravel()]
        return as_bytes == list(expected.ravel())
    return got.dtype == expected.dtype and bool((got == expected).all())


def echo(client: httpclient.InferenceServerClient, binary: bool) -> dict[str, Any]:
    """Every datatype through the echo model, inputs and outputs as binary data or JSON."""
    inputs, outputs, sent = [], [], {}
    for datatype in ECHO_DTYPES:
        name = datatype.lower()
        values = echo_values(datatype)
        tensor = httpclient.InferInput(f"in_{name}", list(values.shape), datatype)
        tensor.set_data_from_numpy(values, binary_data=binary)
        inputs.append(tensor)
        outputs.append(httpclient.InferRequestedOutput(f"out_{name}", binary_data=binary))
        sent[datatype] = values
    result = client.infer("echo", inputs, outputs=outputs, request_id=f"echo-{binary}")
    response = result.get_response()
    return {
        "id": response.get("id"),
        "matches": {dt: same(v, result.as_numpy(f"out_{dt.lower()}")) for dt, v in sent.items()},
        "binary_outputs": sorted(
            o["name"] for o in response["outputs"] if "binary_data_size" in o.get("parameters", {})
        ),
        "json_outputs": sorted(o["name"] for o in response["outputs"] if "data" in o),
    }


def digits_input(x: np.ndarray, binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def main() -> None:
    url, repository = sys.argv[1], Path(sys.argv[2])
    client = httpclient.InferenceServerClient(url, concurrency=4)
    x = np.load(repository / "digits" / "samples" / "inputs.npz")["input"]
    labels = np.load(repository / "digits" / "samples" / "reference.npz")["label"]
    before = client.get_inference_statistics("digits")
    out: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("digits"),
        "model_ready_v1": client.is_model_ready("digits", "1"),
        "unknown_model_ready": client.is_model_ready("nope"),
        "server_metadata": client.get_server_metadata(),
        "model_metadata": client.get_model_metadata("digits"),
        "model_metadata_v1": client.get_model_metadata("digits", "1"),
        "model_config": client.get_model_config("digits"),
        "index": client.get_model_repository_index(),
        "stats_before": before,
    }

    # digits: input as JSON or binary; the output as binary or JSON; parameters both ways.
    for mode, binary_in, binary_out in (
        ("json", False, False),
        ("binary", True, True),
        ("binary_in_json_out", True, False),
    ):
        result = client.infer(
            "digits",
            [digits_input(x, binary_in)],
            outputs=[httpclient.InferRequestedOutput("label", binary_data=binary_out)],
            request_id=f"req-{mode}",
            parameters={"sla_ms": 50, "sla_class": "gold"},
            priority=1,
        )
        response = result.get_response()
        output = response["outputs"][0]
        out[f"infer_{mode}"] = {
            "id": response.get("id"),
            "model_name": response.get("model_name"),
            "labels_match": bool((result.as_numpy("label") == labels).all()),
            "label_dtype": str(result.as_numpy("label").dtype),
            "binary": "binary_data_size" in output.get("parameters", {}),
            "parameters": response.get("parameters", {}),
        }

    # A variant pinned, a deadline given (Triton's timeout, microseconds).
    result = client.infer(
        "digits",
        [digits_input(x, True)],
        parameters={"switchyard_variant": "ort-cpu-fp32"},
        timeout=30_000_000,
    )
    out["infer_pinned"] = {
        "parameters": result.get_response().get("parameters", {}),
        "labels_match": bool((result.as_numpy("label") == labels).all()),
    }

    # No outputs named: every output, as the request's binary_data_output says.
    result = client.infer("digits", [digits_input(x, True)], model_version="1")
    out["infer_versioned"] = {
        "model_version": result.get_response().get("model_version"),
        "labels_match": bool((result.as_numpy("label") == labels).all()),
    }

    out["echo_json"] = echo(client, binary=False)
    out["echo_binary"] = echo(client, binary=True)

    # Compressed requests and responses, each algorithm both ways.
    compressed = {}
    for algorithm in ("gzip", "deflate"):
        for binary in (False, True):
            result = client.infer(
                "digits",
                [digits_input(x, binary)],
                outputs=[httpclient.InferRequestedOutput("label", binary_data=binary)],
                request_compression_algorithm=algorithm,
                response_compression_algorithm=algorithm,
            )
            compressed[f"{algorithm}-{'binary' if binary else 'json'}"] = bool(
                (result.as_numpy("label") == labels).all()
            )
    out["compressed"] = compressed

    # Several at once on the client's connection pool.
    pending = [
        client.async_infer(
            "digits",
            [digits_input(x[i : i + 1], i % 2 == 0)],
            request_id=f"async-{i}",
            outputs=[httpclient.InferRequestedOutput("label", binary_data=i % 2 == 0)],
        )
        for i in range(8)
    ]
    answers = [p.get_result() for p in pending]
    out["async"] = [
        {
            "id": a.get_response().get("id"),
            "label_match": bool(a.as_numpy("label")[0] == labels[i]),
        }
        for i, a in enumerate(answers)
    ]

    # Failures: the status and the server's message, as the client shows them.
    failures: dict[str, object] = {}
    bad = httpclient.InferInput("input", [1, 63], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 63), np.float32), binary_data=True)
    unknown = httpclient.InferInput("input", list(x.shape), "FP32")
    unknown.set_data_from_numpy(x)
    calls: dict[str, Callable[[], object]] = {
        "bad_shape": lambda: client.infer("digits", [bad]),
        "bad_shape_compressed": lambda: client.infer(
            "digits", [bad], response_compression_algorithm="gzip"
        ),
        "unknown_model": lambda: client.infer("nope", [unknown]),
        "unknown_version": lambda: client.get_model_metadata("digits", "99"),
    }
    for case, call in calls.items():
        try:
            call()
            failures[case] = "accepted"
        except InferenceServerException as exc:
            failures[case] = {"status": exc.status(), "message": exc.message()}
    out["failures"] = failures

    out["stats_after"] = client.get_inference_statistics("digits")
    out["all_stats"] = client.get_inference_statistics()
    client.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
