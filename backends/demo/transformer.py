"""The `transformer` demo model: one encoder block over 16 tokens of width 64
with seeded weights, and its reference in plain numpy (float64, written from
the operator definitions, not from ONNX Runtime).

Imports no grpc, no generated protobuf and nothing from the gateway.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from backends.demo.common import F32, F64, OPSET, SAMPLES, save_model, save_samples, softmax

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
    save_model(model_dir, helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]))
    tokens = (
        np.random.default_rng(37).standard_normal((SAMPLES, SEQUENCE, WIDTH)).astype(np.float32)
    )
    save_samples(model_dir, {"tokens": tokens}, {"hidden": transformer_reference(tokens, weights)})
