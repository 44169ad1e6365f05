"""What the demo model families share: the opset, the sample count, the array
types, softmax, and writing a model's `model.onnx` and its `samples/`.

Builds no model itself. Imports nothing from the other demo modules, no grpc, no
generated protobuf and nothing from the gateway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

OPSET = 17
SAMPLES = 64
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


def save_samples(
    model_dir: Path, inputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]
) -> None:
    samples = model_dir / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    np.savez(samples / "inputs.npz", **inputs)  # type: ignore[arg-type]
    np.savez(samples / "reference.npz", **reference)  # type: ignore[arg-type]


def save_model(model_dir: Path, model: Any) -> None:
    """Checks an onnx ModelProto and writes it as the model's source."""
    import onnx

    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.onnx").write_bytes(model.SerializeToString())


def softmax(x: F64, axis: int = -1) -> F64:
    e: F64 = np.exp(x - x.max(axis=axis, keepdims=True))
    out: F64 = e / e.sum(axis=axis, keepdims=True)
    return out
