"""Drives a server with the reference client, tritonclient.grpc, in its own process
(its protobuf package `inference` clashes with ours in one process). Prints one
JSON object with what it saw; the e2e tests assert on it.

Usage: python triton_client_check.py HOST:PORT REPOSITORY
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from google.protobuf.json_format import MessageToDict
from tritonclient.utils import InferenceServerException


def main() -> None:
    url, repository = sys.argv[1], Path(sys.argv[2])
    client = grpcclient.InferenceServerClient(url)
    out: dict[str, object] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("digits"),
        "unknown_model_ready": client.is_model_ready("nope"),
        "server_metadata": MessageToDict(client.get_server_metadata()),
        "model_metadata": MessageToDict(client.get_model_metadata("digits")),
        "model_config": MessageToDict(client.get_model_config("digits")),
        "index": MessageToDict(client.get_model_repository_index()),
    }
    x = np.load(repository / "digits" / "samples" / "inputs.npz")["input"]
    reference = np.load(repository / "digits" / "samples" / "reference.npz")
    for mode in ("raw", "typed"):
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        if mode == "raw":
            tensor.set_data_from_numpy(x)
        else:  # typed contents (InferTensorContents.fp32_contents)
            tensor._get_tensor().contents.fp32_contents.extend(x.ravel().tolist())
        result = client.infer(
            "digits",
            [tensor],
            outputs=[grpcclient.InferRequestedOutput("label")],
            request_id=f"req-{mode}",
            parameters={"sla_ms": 50},
        )
        response = result.get_response()
        out[f"infer_{mode}"] = {
            "id": response.id,
            "labels_match": bool((result.as_numpy("label") == reference["label"]).all()),
            "outputs": [o.name for o in response.outputs],
            "raw_outputs": len(response.raw_output_contents),
            "parameters": {k: v.string_param for k, v in response.parameters.items()},
        }
    try:
        bad = grpcclient.InferInput("input", [1, 63], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 63), np.float32))
        client.infer("digits", [bad])
        out["bad"] = "accepted"
    except InferenceServerException as exc:
        out["bad"] = {"status": exc.status(), "message": exc.message()}
    out["statistics"] = MessageToDict(client.get_inference_statistics("digits"))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
