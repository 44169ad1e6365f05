"""ONNX Runtime adapter: loads an ONNX variant with an exact thread budget.

A variant is loaded from bytes already checked against its manifest
(`backends.runtimes.loader`), its external data files (tensors stored beside the model)
from memory too; ONNX Runtime is pointed at an empty private folder for any other
external file, so external data the manifest does not list fails to load instead of
being read from disk. A path is taken for the compiler's own outputs and sources.

The only module of the worker that imports onnxruntime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from backends.files import empty_private_folder
from backends.protocol.errors import InvalidInput
from backends.protocol.tensors import TensorSpec
from backends.runtimes.base import Array

# onnxruntime's type strings -> protocol datatypes.
_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

RUNTIME_NAME = "onnxruntime"
RUNTIME_VERSION: str = ort.__version__
# Where ONNX Runtime looks for external data files of a model loaded from bytes.
_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Threads stay bound to the budget given; spinning would steal the other
    # worker's core on a small machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _spec(node: ort.NodeArg) -> TensorSpec:
    datatype = _ORT_TYPES.get(node.type)
    if datatype is None:
        raise ValueError(f"tensor {node.name!r} has type {node.type}, which the protocol lacks")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    return TensorSpec(node.name, datatype, shape)


class OrtAdapter:
    """One ONNX model loaded in one InferenceSession.

    `model` is the model's bytes, or a path (the compiler's own files). With bytes,
    `external_data` holds the files the model's external tensors name (by their location,
    relative to the model), and no other file is read."""

    def __init__(
        self,
        model: Path | bytes,
        threads: int = 1,
        external_data: Mapping[str, bytes] | None = None,
    ) -> None:
        options = session_options(threads)
        # ONNX Runtime may point at these buffers rather than copy them: they live as
        # long as the session.
        self._external = dict(external_data or {})
        if isinstance(model, bytes):
            if self._external:
                names = list(self._external)
                buffers = [self._external[name] for name in names]
                options.add_external_initializers_from_files_in_memory(
                    names, buffers, [len(b) for b in buffers]
                )
            with empty_private_folder() as nowhere:
                options.add_session_config_entry(_EXTERNAL_FOLDER_KEY, str(nowhere))
                self._session = _session(model, options)
        else:
            if self._external:
                raise ValueError("external_data is taken with a model given as bytes")
            self._session = _session(str(model), options)
        self._inputs = tuple(_spec(n) for n in self._session.get_inputs())
        self._outputs = tuple(_spec(n) for n in self._session.get_outputs())
        self._bytes_inputs = {s.name for s in self._inputs if s.datatype == "BYTES"}

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def run(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> list[Array]:
        feed = dict(inputs)
        for name in self._bytes_inputs & feed.keys():
            feed[name] = _as_text(name, feed[name])
        return list(self._session.run(list(outputs), feed))


def _session(model: str | bytes, options: ort.SessionOptions) -> ort.InferenceSession:
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def _as_text(name: str, array: Array) -> Array:
    """onnxruntime takes string tensors as str (UTF-8 text); the protocol carries bytes."""
    flat = array.reshape(-1)
    out = np.empty(flat.shape, dtype=np.object_)
    for index, item in enumerate(flat):
        if isinstance(item, bytes):
            try:
                out[index] = item.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInput(
                    f"input {name!r}: element {index} is not valid UTF-8 "
                    "(ONNX string tensors hold text)"
                ) from exc
        else:
            out[index] = str(item)
    return out.reshape(array.shape)


def signature(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs and outputs of an ONNX model, as ONNX Runtime sees them."""
    adapter = OrtAdapter(path, threads=1)
    return adapter.inputs, adapter.outputs
