"""The conv net demo models `cnn`, `resnet` and `mobilenet`, and what builds
them: `conv2d` (ONNX Conv in numpy), `ConvNet` (grows the ONNX graph and its
numpy reference together) and `digit_images` (scikit-learn's digits as
3 x 32 x 32 images).

Each net has a seeded conv body and a dense classifier fitted (logistic
regression) to the body's features of 256 training digits; the samples are 32
held-out digits, their reference outputs from the numpy side (float64, written
from the operator definitions, not from ONNX Runtime).

Imports no grpc, no generated protobuf and nothing from the gateway.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from backends.demo.common import F32, F64, OPSET, SAMPLES, save_model, save_samples, softmax


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

    def save(self, model_dir: Path, output: Tensor, batch: int | None = None) -> None:
        """Writes the model, and the sample rows of the batch with their reference outputs.
        `batch`: a fixed batch size (no batch dimension to merge requests on; each sample
        is then one whole input, stacked on a leading axis); None: any."""
        from onnx import TensorProto, helper, numpy_helper

        image_shape = list(self.image[1].shape[1:])
        rows: int | str = "N" if batch is None else batch
        graph = helper.make_graph(
            self.nodes,
            self.name,
            [helper.make_tensor_value_info("image", TensorProto.FLOAT, [rows, *image_shape])],
            [
                helper.make_tensor_value_info(
                    output[0], TensorProto.FLOAT, [rows, output[1].shape[1]]
                )
            ],
            initializer=[numpy_helper.from_array(v, k) for k, v in self.initializers.items()],
        )
        save_model(
            model_dir, helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        )
        samples = self.image[1][self.training :].astype(np.float32)
        reference = output[1][self.training :].astype(np.float32)
        if batch is not None:  # one whole input a sample: (64, batch, ...)
            samples = samples.reshape(-1, batch, *samples.shape[1:])
            reference = reference.reshape(-1, batch, *reference.shape[1:])
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


def build_tinyconv(model_dir: Path) -> None:
    """A tiny conv net of fixed batch 1 (about 6 MFLOP): the gateway can merge nothing, so
    its hop is measured alone. Not in the demo repository: `make bench` builds it."""
    net = _conv_net("tinyconv", 302)
    x = net.relu(net.batch_norm(net.conv(net.image, 16, 3)))
    x = net.max_pool(net.relu(net.batch_norm(net.conv(x, 16, 3))))
    net.save(model_dir, net.classifier(x), batch=1)


def build_midconv(model_dir: Path) -> None:
    """A mid-size conv net (about 0.37 GFLOP a row, any batch) on which int8 and batching
    decide. Not in the demo repository: `make bench` builds it."""
    net = _conv_net("midconv", 402)
    x = net.relu(net.batch_norm(net.conv(net.image, 64, 3)))
    x = net.max_pool(net.relu(net.batch_norm(net.conv(x, 96, 3))))
    x = net.relu(net.batch_norm(net.conv(x, 192, 3)))
    x = net.relu(net.batch_norm(net.conv(x, 192, 3)))
    net.save(model_dir, net.classifier(x))
