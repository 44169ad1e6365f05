"""The `echo` demo model: one input per protocol datatype (BOOL ... FP64, BYTES),
each returned unchanged, for clients that want to check tensor transport.

Imports no grpc, no generated protobuf and nothing from the gateway.
"""

from __future__ import annotations

from pathlib import Path

from backends.demo.common import OPSET, save_model

# Protocol datatype -> ONNX element type of the echo model.
ECHO_TYPES = {
    "BOOL": "BOOL",
    "UINT8": "UINT8",
    "UINT16": "UINT16",
    "UINT32": "UINT32",
    "UINT64": "UINT64",
    "INT8": "INT8",
    "INT16": "INT16",
    "INT32": "INT32",
    "INT64": "INT64",
    "FP16": "FLOAT16",
    "FP32": "FLOAT",
    "FP64": "DOUBLE",
    "BYTES": "STRING",
}


def build_echo(model_dir: Path, datatypes: tuple[str, ...] = tuple(ECHO_TYPES)) -> None:
    """An identity model with one input `in_<datatype>` and output `out_<datatype>` each."""
    from onnx import TensorProto, helper

    inputs, outputs, nodes = [], [], []
    for datatype in datatypes:
        onnx_type = ECHO_TYPES[datatype]
        name = datatype.lower()
        elem = getattr(TensorProto, onnx_type)
        inputs.append(helper.make_tensor_value_info(f"in_{name}", elem, ["N", 4]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", elem, ["N", 4]))
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
    graph = helper.make_graph(nodes, "echo", inputs, outputs)
    save_model(model_dir, helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]))
