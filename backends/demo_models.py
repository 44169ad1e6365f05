"""Builds the demo model repository from code: nothing is downloaded.

- `digits`: a logistic-regression classifier trained with scikit-learn on its
  bundled 8x8 digits dataset, converted with skl2onnx. Reference outputs come
  from scikit-learn itself.
- `cnn`: a small CIFAR-shaped convolutional network (conv-relu-pool, conv-relu,
  global pool, dense, softmax) built with the onnx helper API and seeded weights.
  Reference outputs come from a plain numpy implementation of the same network.
- `echo`: one input per protocol datatype (BOOL ... FP64, BYTES), each returned
  unchanged, for clients that want to check tensor transport.

Each model gets its source `model.onnx`, sample inputs and reference outputs
under `samples/`, and its ONNX Runtime fp32 variant. Needs the `models` extra
(onnx, scikit-learn, skl2onnx).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt

from backends.repository import ModelRepository
from backends.variants import build_ort_fp32

OPSET = 17
SAMPLES = 32
F32 = npt.NDArray[np.float32]


def save_samples(
    model_dir: Path, inputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]
) -> None:
    samples = model_dir / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    np.savez(samples / "inputs.npz", **inputs)  # type: ignore[arg-type]
    np.savez(samples / "reference.npz", **reference)  # type: ignore[arg-type]


def build_digits(model_dir: Path) -> None:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, _ = train_test_split(x, data.target, test_size=0.25, random_state=0)
    clf = LogisticRegression(max_iter=2000, random_state=0).fit(x_train, y_train)
    onx = to_onnx(
        clf,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": 3},
    )
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.onnx").write_bytes(onx.SerializeToString())
    sample = x_test[:SAMPLES]
    save_samples(
        model_dir,
        {"input": sample},
        {
            "label": clf.predict(sample).astype(np.int64),
            "probabilities": clf.predict_proba(sample).astype(np.float32),
        },
    )


def _cnn_weights() -> dict[str, F32]:
    rng = np.random.default_rng(7)

    def he(*shape: int) -> F32:
        fan_in = int(np.prod(shape[1:]))
        scaled: npt.NDArray[np.float64] = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        return scaled.astype(np.float32)

    return {
        "conv1_w": he(8, 3, 3, 3),
        "conv1_b": (rng.standard_normal(8) * 0.1).astype(np.float32),
        "conv2_w": he(16, 8, 3, 3),
        "conv2_b": (rng.standard_normal(16) * 0.1).astype(np.float32),
        "fc_w": he(10, 16),
        "fc_b": (rng.standard_normal(10) * 0.1).astype(np.float32),
    }


def build_cnn(model_dir: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = _cnn_weights()
    nodes = [
        helper.make_node("Conv", ["image", "conv1_w", "conv1_b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "conv2_w", "conv2_b"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        initializer=[numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.onnx").write_bytes(model.SerializeToString())
    images = np.random.default_rng(11).random((SAMPLES, 3, 32, 32), dtype=np.float32)
    save_samples(model_dir, {"image": images}, {"probabilities": cnn_reference(images, w)})


def _conv3x3(x: F32, weight: F32, bias: F32) -> F32:
    """3x3 convolution, stride 1, zero padding 1, via im2col."""
    n, c, h, wd = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.stack(
        [padded[:, :, i : i + h, j : j + wd] for i in range(3) for j in range(3)], axis=2
    )  # n, c, 9, h, w
    cols = cols.reshape(n, c * 9, h * wd)
    out: F32 = np.einsum("ok,nkp->nop", weight.reshape(weight.shape[0], -1), cols)
    return (out.reshape(n, -1, h, wd) + bias[None, :, None, None]).astype(np.float32)


def cnn_reference(images: F32, w: dict[str, F32]) -> F32:
    """The cnn model in plain numpy: an independent reference for its outputs."""
    r1 = np.maximum(_conv3x3(images, w["conv1_w"], w["conv1_b"]), 0)
    n, c, h, wd = r1.shape
    p1 = r1.reshape(n, c, h // 2, 2, wd // 2, 2).max(axis=(3, 5))
    r2 = np.maximum(_conv3x3(p1, w["conv2_w"], w["conv2_b"]), 0)
    logits = r2.mean(axis=(2, 3)) @ w["fc_w"].T + w["fc_b"]
    e: F32 = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities: F32 = e / e.sum(axis=1, keepdims=True)
    return probabilities.astype(np.float32)


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
    import onnx
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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.onnx").write_bytes(model.SerializeToString())


BUILDERS = {"digits": build_digits, "cnn": build_cnn, "echo": build_echo}


def build(root: Path, models: list[str] | None = None) -> list[str]:
    """Builds the demo models (all by default) with their ONNX Runtime variants."""
    repository = ModelRepository(root)
    built = []
    for name in models or list(BUILDERS):
        BUILDERS[name](root / name)
        build_ort_fp32(repository, name)
        built.append(name)
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("models", nargs="*", choices=[*BUILDERS, []], help="default: all")
    args = parser.parse_args(argv)
    for name in build(args.repository, args.models or None):
        print(f"built {args.repository / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
