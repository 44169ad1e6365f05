"""Builds the demo model repository from code: nothing is downloaded.

- `digits`: a logistic-regression classifier trained with scikit-learn on its
  bundled 8x8 digits dataset, converted with skl2onnx. Reference outputs come
  from scikit-learn itself.
- `cnn`, `resnet`, `mobilenet`: conv nets that classify scikit-learn's bundled
  8x8 digits, scaled up to 3 x 32 x 32 images. Each has a seeded conv body and
  a dense classifier fitted (logistic regression) to the body's features of 256
  training digits; the samples are 32 held-out digits. The classifier pools the
  last feature map to a 4 x 4 grid, flattens it, and ends in dense 10, softmax.
- `cnn`: conv-BN-ReLU (32), conv-BN-ReLU (64), 2x2 max pool, conv-BN-ReLU (128).
- `resnet`: a CIFAR-style ResNet-8 (conv-BN-ReLU stem, three stages of one basic
  residual block each with 32/64/128 channels, strided downsampling with 1x1
  projection shortcuts).
- `mobilenet`: a MobileNet-style network (conv-BN-ReLU6 stem, five depthwise
  separable blocks: 3x3 depthwise Conv with group=channels and 1x1 pointwise
  Conv (64/256/256/512/512), each followed by BN and ReLU6 as Clip(0, 6)).
- `transformer`: one transformer encoder block over 16 tokens of width 64:
  4-head self-attention (MatMul/Reshape/Transpose/Softmax), residual and
  LayerNormalization, feed-forward 64->256->64 with exact (erf) GELU, residual
  and LayerNormalization.
- `magika`: Google's file-type detector, the ONNX model shipped inside the
  `magika` wheel (found in the installed package, never downloaded). Its samples
  are magika's byte features of 32 files: modules and scripts of the Python
  standard library, the Python executable, a numpy extension module, magika's
  own files, and files written by standard-library encoders (gzip, zip, sqlite,
  PNG, WAV, ...). Reference outputs come from ONNX Runtime fp32 on the model.
- `echo`: one input per protocol datatype (BOOL ... FP64, BYTES), each returned
  unchanged, for clients that want to check tensor transport.

The conv nets and `transformer` have reference outputs from a plain numpy
implementation (float64, written from the operator definitions, not from ONNX
Runtime). The conv nets' batch-norm running statistics are measured on their
training digits, as training would leave them; `transformer` has seeded weights.
The conv nets are wide enough that convolution, not per-call overhead, sets
their latency, which is what int8 speeds up.

Each model gets its source `model.onnx`, sample inputs and reference outputs
under `samples/`, and its ONNX Runtime fp32 variant. Needs the `models` extra
(onnx, scikit-learn, skl2onnx, magika).

Imports no grpc, no generated protobuf and nothing from the gateway.
"""

from __future__ import annotations

import argparse
import bz2
import configparser
import csv
import difflib
import email.message
import gzip
import io
import json
import lzma
import math
import pickle
import sqlite3
import struct
import sys
import tarfile
import wave
import zipfile
import zlib
from collections.abc import Callable
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import numpy.typing as npt

from backends.compile.variants import build_ort_fp32
from backends.repository import ModelRepository
from backends.runtimes.ort import OrtAdapter

OPSET = 17
SAMPLES = 32
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


def save_samples(
    model_dir: Path, inputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]
) -> None:
    samples = model_dir / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    np.savez(samples / "inputs.npz", **inputs)  # type: ignore[arg-type]
    np.savez(samples / "reference.npz", **reference)  # type: ignore[arg-type]


def _save_model(model_dir: Path, model: Any) -> None:
    """Checks an onnx ModelProto and writes it as the model's source."""
    import onnx

    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.onnx").write_bytes(model.SerializeToString())


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


def conv2d(x: F64, weight: F64, stride: int = 1, groups: int = 1) -> F64:
    """ONNX Conv without bias, square kernel, zero padding kernel // 2 on every side.

    x is [N, C, H, W], weight is [O, C / groups, K, K]; the result is
    [N, O, H', W']. Each group is one matrix product of its kernels with the
    image's columns (every kernel offset of every output position, im2col),
    taken over a few images at a time to bound memory.
    """
    n, channels, height, width = x.shape
    out_channels, group_channels, kernel, _ = weight.shape
    pad = kernel // 2
    out_h = (height + 2 * pad - kernel) // stride + 1
    out_w = (width + 2 * pad - kernel) // stride + 1
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kernels = weight.reshape(groups, out_channels // groups, group_channels * kernel * kernel)
    out: F64 = np.empty((n, out_channels, out_h, out_w))
    step = max(1, (1 << 22) // (channels * kernel * kernel * out_h * out_w))
    for start in range(0, n, step):
        part = padded[start : start + step]
        rows = len(part)
        columns = np.empty((groups, group_channels, kernel, kernel, rows, out_h, out_w))
        for i in range(kernel):
            for j in range(kernel):
                window = part[
                    :, :, i : i + stride * out_h : stride, j : j + stride * out_w : stride
                ]
                grouped = window.reshape(rows, groups, group_channels, out_h, out_w)
                columns[:, :, i, j] = grouped.transpose(1, 2, 0, 3, 4)
        product = np.matmul(kernels, columns.reshape(groups, -1, rows * out_h * out_w))
        out[start : start + rows] = product.reshape(out_channels, rows, out_h, out_w).transpose(
            1, 0, 2, 3
        )
    return out


def softmax(x: F64, axis: int = -1) -> F64:
    e: F64 = np.exp(x - x.max(axis=axis, keepdims=True))
    out: F64 = e / e.sum(axis=axis, keepdims=True)
    return out


# A tensor while a conv net grows: its ONNX name and its numpy value on the batch.
Tensor = tuple[str, F64]


class ConvNet:
    """Grows an ONNX conv net and evaluates each layer in numpy on one batch as it goes.

    The batch is labelled training images followed by the sample images. The
    numpy side is the reference. The conv weights and batch-norm scale and bias
    are seeded; batch-norm running statistics are measured on the training rows,
    and the dense classifier is fitted to them (logistic regression on the pooled
    features), as training would leave them. Parameters are rounded to float32
    before numpy uses them, so the reference sees the stored weights exactly.
    """

    def __init__(self, name: str, seed: int, image: F32, labels: npt.NDArray[np.int64]) -> None:
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.labels = labels
        self.training = len(labels)
        self.image: Tensor = ("image", image.astype(np.float64))
        self.nodes: list[Any] = []
        self.initializers: dict[str, F32] = {}

    def _node(self, op: str, inputs: list[str], value: F64, **attributes: Any) -> Tensor:
        from onnx import helper

        output = f"{op.lower()}{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [output], **attributes))
        return output, value

    def _param(self, prefix: str, value: F64) -> tuple[str, F64]:
        name = f"{prefix}{len(self.initializers)}"
        self.initializers[name] = value.astype(np.float32)
        return name, self.initializers[name].astype(np.float64)

    def conv(
        self, x: Tensor, out_channels: int, kernel: int, stride: int = 1, groups: int = 1
    ) -> Tensor:
        """Conv without bias (a batch norm follows), He-initialised."""
        channels = x[1].shape[1]
        fan_in = channels // groups * kernel * kernel
        shape = (out_channels, channels // groups, kernel, kernel)
        weight, w = self._param("conv_w", self.rng.standard_normal(shape) * math.sqrt(2.0 / fan_in))
        pad = kernel // 2
        return self._node(
            "Conv",
            [x[0], weight],
            conv2d(x[1], w, stride, groups),
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=[pad] * 4,
            group=groups,
        )

    def batch_norm(self, x: Tensor, epsilon: float = 1e-5) -> Tensor:
        training = x[1][: self.training]
        channels = int(x[1].shape[1])
        scale, s = self._param("bn_scale", self.rng.uniform(0.5, 1.5, channels))
        bias, b = self._param("bn_bias", self.rng.normal(0.0, 0.25, channels))
        mean, m = self._param("bn_mean", training.mean(axis=(0, 2, 3)))
        var, v = self._param("bn_var", training.var(axis=(0, 2, 3)))
        shape = (1, channels, 1, 1)
        y = (x[1] - m.reshape(shape)) / np.sqrt(v.reshape(shape) + epsilon)
        value = y * s.reshape(shape) + b.reshape(shape)
        return self._node(
            "BatchNormalization", [x[0], scale, bias, mean, var], value, epsilon=epsilon
        )

    def relu(self, x: Tensor) -> Tensor:
        return self._node("Relu", [x[0]], np.maximum(x[1], 0.0))

    def relu6(self, x: Tensor) -> Tensor:
        if "relu6_min" not in self.initializers:
            self.initializers["relu6_min"] = np.array(0.0, np.float32)
            self.initializers["relu6_max"] = np.array(6.0, np.float32)
        return self._node("Clip", [x[0], "relu6_min", "relu6_max"], np.clip(x[1], 0.0, 6.0))

    def max_pool(self, x: Tensor) -> Tensor:
        """2x2 max pool, stride 2."""
        n, c, h, w = x[1].shape
        value = x[1].reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
        return self._node("MaxPool", [x[0]], value, kernel_shape=[2, 2], strides=[2, 2])

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        return self._node("Add", [a[0], b[0]], a[1] + b[1])

    def classifier(self, x: Tensor, grid: int = 4) -> Tensor:
        """Average pool to a grid x grid map, flatten, dense, softmax. The dense
        layer is a logistic regression fitted to the training rows' features
        (standardised, the standardisation folded into its weights). The grid
        keeps where in the image each feature fired, which a global pool loses."""
        from onnx import helper
        from sklearn.linear_model import LogisticRegression

        n, channels, height, _ = x[1].shape
        kernel = height // grid
        value = x[1].reshape(n, channels, grid, kernel, grid, kernel).mean(axis=(3, 5))
        pooled = self._node(
            "AveragePool", [x[0]], value, kernel_shape=[kernel, kernel], strides=[kernel, kernel]
        )
        flat = self._node("Flatten", [pooled[0]], pooled[1].reshape(n, -1), axis=1)
        features = flat[1][: self.training]
        centre, spread = features.mean(axis=0), features.std(axis=0) + 1e-2
        fitted = LogisticRegression(max_iter=2000).fit((features - centre) / spread, self.labels)
        weight, w = self._param("fc_w", fitted.coef_ / spread)
        bias, b = self._param("fc_b", fitted.intercept_ - w @ centre)
        logits = self._node("Gemm", [flat[0], weight, bias], flat[1] @ w.T + b, transB=1)
        probabilities = softmax(logits[1], axis=1)
        self.nodes.append(helper.make_node("Softmax", [logits[0]], ["probabilities"], axis=1))
        return "probabilities", probabilities

    def save(self, model_dir: Path, output: Tensor) -> None:
        """Writes the model, and the sample rows of the batch with their reference outputs."""
        from onnx import TensorProto, helper, numpy_helper

        image_shape = list(self.image[1].shape[1:])
        graph = helper.make_graph(
            self.nodes,
            self.name,
            [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", *image_shape])],
            [
                helper.make_tensor_value_info(
                    output[0], TensorProto.FLOAT, ["N", output[1].shape[1]]
                )
            ],
            initializer=[numpy_helper.from_array(v, k) for k, v in self.initializers.items()],
        )
        _save_model(
            model_dir, helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        )
        samples = self.image[1][self.training :].astype(np.float32)
        reference = output[1][self.training :].astype(np.float32)
        save_samples(model_dir, {"image": samples}, {output[0]: reference})


IMAGE_SIZE = 32
# Training images per conv net: they set batch-norm statistics and fit the dense layer.
TRAINING = 256


def digit_images() -> tuple[F32, npt.NDArray[np.int64]]:
    """scikit-learn's bundled 8x8 digits as 3 x 32 x 32 images, with their labels:
    each pixel repeated over a 4 x 4 block, the grey level copied to the three
    channels, normalised to zero mean and unit variance over the dataset."""
    from sklearn.datasets import load_digits

    data = load_digits()
    scale = IMAGE_SIZE // 8
    grey = np.kron(data.images, np.ones((1, scale, scale)))
    grey = (grey - grey.mean()) / grey.std()
    images: F32 = np.repeat(grey[:, None], 3, axis=1).astype(np.float32)
    return images, data.target.astype(np.int64)


def _conv_net(name: str, seed: int) -> ConvNet:
    """A net over `TRAINING` training digits followed by `SAMPLES` held-out ones
    (the same seeded split for every conv net)."""
    images, labels = digit_images()
    order = np.random.default_rng(0).permutation(len(images))[: TRAINING + SAMPLES]
    return ConvNet(name, seed, images[order], labels[order[:TRAINING]])


def build_cnn(model_dir: Path) -> None:
    net = _conv_net("cnn", 2)
    x = net.relu(net.batch_norm(net.conv(net.image, 32, 3)))
    x = net.max_pool(net.relu(net.batch_norm(net.conv(x, 64, 3))))
    x = net.relu(net.batch_norm(net.conv(x, 128, 3)))
    net.save(model_dir, net.classifier(x))


def build_resnet(model_dir: Path) -> None:
    net = _conv_net("resnet", 102)
    x = net.relu(net.batch_norm(net.conv(net.image, 32, 3)))
    for channels, stride in ((32, 1), (64, 2), (128, 2)):
        y = net.relu(net.batch_norm(net.conv(x, channels, 3, stride)))
        y = net.batch_norm(net.conv(y, channels, 3))
        shortcut = x
        if stride != 1 or x[1].shape[1] != channels:
            shortcut = net.batch_norm(net.conv(x, channels, 1, stride))
        x = net.relu(net.add(y, shortcut))
    net.save(model_dir, net.classifier(x))


def build_mobilenet(model_dir: Path) -> None:
    net = _conv_net("mobilenet", 202)
    x = net.relu6(net.batch_norm(net.conv(net.image, 32, 3)))
    for channels, stride in ((64, 1), (256, 2), (256, 1), (512, 2), (512, 1)):
        depth = x[1].shape[1]
        x = net.relu6(net.batch_norm(net.conv(x, depth, 3, stride, groups=depth)))
        x = net.relu6(net.batch_norm(net.conv(x, channels, 1)))
    net.save(model_dir, net.classifier(x))


SEQUENCE = 16
WIDTH = 64
HEADS = 4
HEAD_WIDTH = WIDTH // HEADS
FFN_WIDTH = 256
LN_EPSILON = 1e-5


def transformer_weights() -> dict[str, F32]:
    rng = np.random.default_rng(31)

    def dense(fan_in: int, fan_out: int, gain: float) -> F32:
        scaled: F64 = rng.standard_normal((fan_in, fan_out)) * math.sqrt(gain / fan_in)
        return scaled.astype(np.float32)

    def vector(size: int, mean: float, std: float) -> F32:
        return rng.normal(mean, std, size).astype(np.float32)

    weights = {}
    for name in ("q", "k", "v", "o"):
        weights[f"w{name}"] = dense(WIDTH, WIDTH, 1.0)
        weights[f"b{name}"] = vector(WIDTH, 0.0, 0.05)
    weights["ln1_scale"] = vector(WIDTH, 1.0, 0.1)
    weights["ln1_bias"] = vector(WIDTH, 0.0, 0.1)
    weights["w1"] = dense(WIDTH, FFN_WIDTH, 2.0)
    weights["b1"] = vector(FFN_WIDTH, 0.0, 0.05)
    weights["w2"] = dense(FFN_WIDTH, WIDTH, 1.0)
    weights["b2"] = vector(WIDTH, 0.0, 0.05)
    weights["ln2_scale"] = vector(WIDTH, 1.0, 0.1)
    weights["ln2_bias"] = vector(WIDTH, 0.0, 0.1)
    return weights


def _layer_norm(x: F64, scale: F64, bias: F64) -> F64:
    centred = x - x.mean(axis=-1, keepdims=True)
    variance = (centred**2).mean(axis=-1, keepdims=True)
    out: F64 = centred / np.sqrt(variance + LN_EPSILON) * scale + bias
    return out


_erf: Callable[[F64], F64] = np.vectorize(math.erf, otypes=[np.float64])


def transformer_reference(tokens: F32, weights: dict[str, F32]) -> F32:
    """The transformer block in plain numpy (float64): the reference for its outputs."""
    p = {k: v.astype(np.float64) for k, v in weights.items()}
    x = tokens.astype(np.float64)
    n = len(x)

    def heads(t: F64) -> F64:  # n, seq, width -> n, heads, seq, head width
        return t.reshape(n, SEQUENCE, HEADS, HEAD_WIDTH).transpose(0, 2, 1, 3)

    q, k, v = (heads(x @ p[f"w{m}"] + p[f"b{m}"]) for m in "qkv")
    attention = softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(HEAD_WIDTH))
    context = (attention @ v).transpose(0, 2, 1, 3).reshape(n, SEQUENCE, WIDTH)
    h = _layer_norm(x + context @ p["wo"] + p["bo"], p["ln1_scale"], p["ln1_bias"])
    u = h @ p["w1"] + p["b1"]
    gelu = 0.5 * u * (1.0 + _erf(u / math.sqrt(2.0)))
    out = _layer_norm(h + gelu @ p["w2"] + p["b2"], p["ln2_scale"], p["ln2_bias"])
    return out.astype(np.float32)


def build_transformer(model_dir: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    weights = transformer_weights()
    constants = {
        "split_heads": np.array([-1, SEQUENCE, HEADS, HEAD_WIDTH], np.int64),
        "merge_heads": np.array([-1, SEQUENCE, WIDTH], np.int64),
        "sqrt_head_width": np.array(math.sqrt(HEAD_WIDTH), np.float32),
        "sqrt_2": np.array(math.sqrt(2.0), np.float32),
        "one": np.array(1.0, np.float32),
        "half": np.array(0.5, np.float32),
    }
    node = helper.make_node
    nodes = []
    for m in "qkv":
        nodes += [
            node("MatMul", ["tokens", f"w{m}"], [f"{m}_proj"]),
            node("Add", [f"{m}_proj", f"b{m}"], [f"{m}_flat"]),
            node("Reshape", [f"{m}_flat", "split_heads"], [f"{m}_split"]),
        ]
    nodes += [
        node("Transpose", ["q_split"], ["q_heads"], perm=[0, 2, 1, 3]),
        node("Transpose", ["k_split"], ["k_heads_t"], perm=[0, 2, 3, 1]),
        node("Transpose", ["v_split"], ["v_heads"], perm=[0, 2, 1, 3]),
        node("MatMul", ["q_heads", "k_heads_t"], ["scores_raw"]),
        node("Div", ["scores_raw", "sqrt_head_width"], ["scores"]),
        node("Softmax", ["scores"], ["attention"], axis=-1),
        node("MatMul", ["attention", "v_heads"], ["context_heads"]),
        node("Transpose", ["context_heads"], ["context_split"], perm=[0, 2, 1, 3]),
        node("Reshape", ["context_split", "merge_heads"], ["context"]),
        node("MatMul", ["context", "wo"], ["attn_proj"]),
        node("Add", ["attn_proj", "bo"], ["attn_out"]),
        node("Add", ["tokens", "attn_out"], ["residual1"]),
        node(
            "LayerNormalization",
            ["residual1", "ln1_scale", "ln1_bias"],
            ["h"],
            axis=-1,
            epsilon=LN_EPSILON,
        ),
        node("MatMul", ["h", "w1"], ["ffn_proj"]),
        node("Add", ["ffn_proj", "b1"], ["u"]),
        # GELU, exact: 0.5 * u * (1 + erf(u / sqrt(2))); opset 17 has no Gelu op.
        node("Div", ["u", "sqrt_2"], ["u_scaled"]),
        node("Erf", ["u_scaled"], ["erf"]),
        node("Add", ["erf", "one"], ["erf_plus_one"]),
        node("Mul", ["u", "erf_plus_one"], ["gelu_double"]),
        node("Mul", ["gelu_double", "half"], ["gelu"]),
        node("MatMul", ["gelu", "w2"], ["ffn_out_proj"]),
        node("Add", ["ffn_out_proj", "b2"], ["ffn_out"]),
        node("Add", ["h", "ffn_out"], ["residual2"]),
        node(
            "LayerNormalization",
            ["residual2", "ln2_scale", "ln2_bias"],
            ["hidden"],
            axis=-1,
            epsilon=LN_EPSILON,
        ),
    ]
    shape = ["N", SEQUENCE, WIDTH]
    graph = helper.make_graph(
        nodes,
        "transformer",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, shape)],
        initializer=[numpy_helper.from_array(v, k) for k, v in {**weights, **constants}.items()],
    )
    _save_model(model_dir, helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]))
    tokens = (
        np.random.default_rng(37).standard_normal((SAMPLES, SEQUENCE, WIDTH)).astype(np.float32)
    )
    save_samples(model_dir, {"tokens": tokens}, {"hidden": transformer_reference(tokens, weights)})


# The model that magika==1.0.3 ships (and uses by default) inside its package.
MAGIKA_MODEL = "standard_v3_3"


def magika_folder() -> Traversable:
    """The folder of magika's model inside the installed `magika` package."""
    folder = files("magika") / "models" / MAGIKA_MODEL
    if not (folder / "model.onnx").is_file():
        raise FileNotFoundError(
            f"the installed magika package has no models/{MAGIKA_MODEL}/model.onnx"
        )
    return folder


def magika_config() -> dict[str, Any]:
    """magika's model configuration: feature sizes, padding token, labels by output index."""
    config: dict[str, Any] = json.loads((magika_folder() / "config.min.json").read_text())
    return config


def magika_features(content: bytes, config: dict[str, Any]) -> list[int]:
    """magika's input features of one file (its extraction v2, as `Magika` does it):
    the first `beg_size` bytes after leading whitespace and the last `end_size`
    bytes before trailing whitespace, within one block at each end, padded."""
    if config["mid_size"] or config["use_inputs_at_offsets"]:
        raise ValueError("this magika model wants features this extraction does not make")
    block, padding = config["block_size"], config["padding_token"]
    beg_size, end_size = config["beg_size"], config["end_size"]
    beg = list(content[:block].lstrip()[:beg_size])
    end = list(content[-block:].rstrip()[-end_size:])
    return beg + [padding] * (beg_size - len(beg)) + [padding] * (end_size - len(end)) + end


def _png(image: npt.NDArray[np.uint8]) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    height, width, _ = image.shape
    rows = b"".join(b"\x00" + row.tobytes() for row in image)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _bmp(image: npt.NDArray[np.uint8]) -> bytes:
    height, width, _ = image.shape
    stride = (width * 3 + 3) // 4 * 4
    rows = b"".join(row[:, ::-1].tobytes().ljust(stride, b"\x00") for row in image[::-1])
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(rows), 2835, 2835, 0, 0)
    return (
        b"BM" + struct.pack("<IHHI", 14 + len(info) + len(rows), 0, 0, 14 + len(info)) + info + rows
    )


def _wav(rng: np.random.Generator) -> bytes:
    t = np.arange(8000) / 8000
    signal = np.sin(2 * np.pi * 440 * t) * 0.5 + rng.normal(0, 0.05, t.shape)
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes((signal * 32767).astype("<i2").tobytes())
    return out.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0)), data)
    return out.getvalue()


def _tar(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _sqlite(rows: list[tuple[int, str]]) -> bytes:
    connection = sqlite3.connect(":memory:")
    try:
        connection.execute("CREATE TABLE modules (id INTEGER PRIMARY KEY, name TEXT)")
        connection.executemany("INSERT INTO modules VALUES (?, ?)", rows)
        connection.commit()
        return connection.serialize()
    finally:
        connection.close()


def _pyc(source: bytes) -> bytes:
    import importlib.util
    import marshal

    code = compile(source, "module.py", "exec")
    return importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps(code)


def _module_file(module: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"module {module} has no file")
    return Path(spec.origin)


def magika_corpus() -> dict[str, bytes]:
    """32 files for magika: real files of the Python installation and magika's
    package, and files written by standard-library encoders, all deterministic."""
    import pydoc

    stdlib = Path(argparse.__file__).parent
    venv_scripts = stdlib / "venv" / "scripts"
    real = {
        "argparse.py": Path(argparse.__file__),
        "json/__init__.py": Path(json.__file__),
        "csv.py": Path(csv.__file__),
        "venv/activate": venv_scripts / "common" / "activate",
        "venv/Activate.ps1": venv_scripts / "common" / "Activate.ps1",
        "venv/activate.fish": venv_scripts / "posix" / "activate.fish",
        "venv/activate.csh": venv_scripts / "posix" / "activate.csh",
        "python": Path(sys.executable).resolve(),
        "numpy/_multiarray_umath": _module_file("numpy._core._multiarray_umath"),
    }
    corpus = {name: path.read_bytes() for name, path in real.items()}
    magika = magika_folder()
    for name in ("model.onnx", "README.md", "config.min.json"):
        corpus[f"magika/{name}"] = (magika / name).read_bytes()

    rng = np.random.default_rng(53)
    source = corpus["argparse.py"]
    gradient = np.linspace(0, 255, 48, dtype=np.uint8)
    image = np.stack(
        np.broadcast_arrays(gradient[:, None], gradient[None, :], np.uint8(128)), axis=-1
    )
    rows = [(i, name) for i, name in enumerate(sorted(sys.stdlib_module_names)[:200])]
    table = io.StringIO()
    csv.writer(table).writerows([("id", "name", "length"), *((i, n, len(n)) for i, n in rows)])
    ini = configparser.ConfigParser()
    ini["server"] = {"listen": "127.0.0.1:8001", "threads": "2", "model": "resnet"}
    ini["metrics"] = {"listen": "127.0.0.1:8002", "path": "/metrics"}
    ini_text = io.StringIO()
    ini.write(ini_text)
    message = email.message.EmailMessage()
    message["Received"] = (
        "from gateway.example.org (gateway.example.org [192.0.2.1]) by mx.example.org"
        " with ESMTPS id 4F2A; Mon, 1 Jan 2024 00:00:00 +0000"
    )
    message["Date"] = "Mon, 01 Jan 2024 00:00:00 +0000"
    message["Message-ID"] = "<drain-1@switchyard.example.org>"
    message["From"] = "Switchyard Router <router@example.org>"
    message["To"] = "SRE <sre@example.org>"
    message["Subject"] = "Backend big-cpu drained"
    message.set_content("The router moved traffic for resnet to small-cpu.\n" * 20)
    tree = ElementTree.Element("modules")
    for i, name in rows:
        ElementTree.SubElement(tree, "module", id=str(i)).text = name
    array = rng.standard_normal((64, 64)).astype(np.float32)
    npy, npz = io.BytesIO(), io.BytesIO()
    np.save(npy, array)
    np.savez_compressed(npz, weights=array, bias=array[0])
    old_lines = source.decode().splitlines(keepends=True)[:400]
    new_lines = [line.replace("parser", "reader") for line in old_lines]
    generated = {
        "argparse.py.gz": gzip.compress(source, mtime=0),
        "argparse.py.bz2": bz2.compress(source),
        "argparse.py.xz": lzma.compress(source),
        "stdlib.zip": _zip({"argparse.py": source, "csv.py": corpus["csv.py"]}),
        "stdlib.tar": _tar({"argparse.py": source, "csv.py": corpus["csv.py"]}),
        "modules.json": json.dumps({"modules": dict(rows)}, indent=2).encode(),
        "modules.csv": table.getvalue().encode(),
        "modules.xml": ElementTree.tostring(tree, xml_declaration=True, encoding="utf-8"),
        "json.html": pydoc.html.page("json", pydoc.html.document(json)).encode(),
        "modules.pickle": pickle.dumps({"modules": rows}, protocol=4),
        "argparse.pyc": _pyc(source),
        "modules.sqlite": _sqlite(rows),
        "weights.npy": npy.getvalue(),
        "weights.npz": npz.getvalue(),
        "gradient.png": _png(image),
        "gradient.bmp": _bmp(image),
        "tone.wav": _wav(rng),
        "message.eml": message.as_bytes(),
        "fleet.ini": ini_text.getvalue().encode(),
        "argparse.diff": "".join(
            difflib.unified_diff(old_lines, new_lines, "a/argparse.py", "b/argparse.py")
        ).encode(),
    }
    corpus.update(generated)
    assert len(corpus) == SAMPLES, len(corpus)
    return corpus


def build_magika(model_dir: Path) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    source = model_dir / "model.onnx"
    source.write_bytes((magika_folder() / "model.onnx").read_bytes())
    config = magika_config()
    features = np.array([magika_features(c, config) for c in magika_corpus().values()], np.int32)
    (scores,) = OrtAdapter(source).run({"bytes": features}, ["target_label"])
    save_samples(model_dir, {"bytes": features}, {"target_label": scores})


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
    _save_model(model_dir, helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]))


BUILDERS: dict[str, Callable[[Path], None]] = {
    "digits": build_digits,
    "cnn": build_cnn,
    "resnet": build_resnet,
    "mobilenet": build_mobilenet,
    "transformer": build_transformer,
    "magika": build_magika,
    "echo": build_echo,
}


# Models whose point is transport, not compute: the fp32 variant is all they need.
FP32_ONLY = frozenset({"echo"})


def build(root: Path, models: list[str] | None = None) -> list[str]:
    """Builds the demo models (all by default) and compiles their ONNX Runtime
    variants, each checked against the fp32 source (`switchyard compile`)."""
    from backends.compile.compiler import compile_model

    repository = ModelRepository(root)
    built = []
    for name in models or list(BUILDERS):
        BUILDERS[name](root / name)
        if name in FP32_ONLY:
            build_ort_fp32(repository, name)
        else:
            for outcome in compile_model(repository.source(name), name, repository):
                if outcome.status == "failed":
                    raise RuntimeError(f"{name}: {outcome.variant} failed: {outcome.detail}")
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
