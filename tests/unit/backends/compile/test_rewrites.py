"""Graph rewrites (backends/compile/rewrites.py): the one-hot MatMul becomes a Gather that gives
the same outputs, through ONNX Runtime, for indices in and out of range."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from backends.compile.rewrites import ONE_HOT_MATMUL, one_hot_matmuls_as_gathers, prepared_source

DEPTH, WIDTH, LENGTH = 7, 5, 4


def _one_hot_model(
    *, expand: bool = True, opset: int = 15, iota_first: bool = False
) -> onnx.ModelProto:
    """indices (batch, LENGTH) int32 -> one-hot over DEPTH -> MatMul W (DEPTH, WIDTH), then
    a Relu so the MatMul's output is not the graph's output; as JAX exports an embedding."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(DEPTH, WIDTH)).astype(np.float32)
    initializers = [
        numpy_helper.from_array(table, "W"),
        numpy_helper.from_array(np.arange(DEPTH, dtype=np.int32).reshape(1, 1, DEPTH), "iota"),
        numpy_helper.from_array(np.array([-1, LENGTH, 1], np.int64), "column"),
    ]
    nodes = [helper.make_node("Reshape", ["indices", "column"], ["column_indices"])]
    compared = "column_indices"
    if expand:
        nodes += [
            helper.make_node("Shape", ["indices"], ["shape"]),
            helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
            helper.make_node("Concat", ["batch", "tail"], ["target"], axis=0),
            helper.make_node("Expand", ["column_indices", "target"], ["broadcast"]),
        ]
        initializers += [
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
            numpy_helper.from_array(np.array([LENGTH, DEPTH], np.int64), "tail"),
        ]
        compared = "broadcast"
    pair = ["iota", compared] if iota_first else [compared, "iota"]
    nodes += [
        helper.make_node("Equal", pair, ["hot"]),
        helper.make_node("Cast", ["hot"], ["one_hot"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["one_hot", "W"], ["embedded"]),
        helper.make_node("Relu", ["embedded"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "one_hot",
        [helper.make_tensor_value_info("indices", TensorProto.INT32, ["batch", LENGTH])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", LENGTH, WIDTH])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, indices: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"indices": indices})[0])


INDICES = [
    np.array([[0, 1, 2, 6], [3, 3, 5, 4]], np.int32),
    np.array([[-1, 7, 100, -7], [6, -100, 0, 8]], np.int32),  # out of range: zero rows
]


@pytest.mark.parametrize("expand", [True, False])
@pytest.mark.parametrize("iota_first", [True, False])
def test_one_hot_matmul_becomes_a_gather_with_the_same_outputs(
    expand: bool, iota_first: bool
) -> None:
    model = _one_hot_model(expand=expand, iota_first=iota_first)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert one_hot_matmuls_as_gathers(rewritten) == 1
    onnx.checker.check_model(rewritten)
    ops = [n.op_type for n in rewritten.graph.node]
    assert "MatMul" not in ops and "Equal" not in ops and "Gather" in ops
    assert "W" not in {t.name for t in rewritten.graph.initializer}  # replaced by the padded one
    for indices in INDICES:
        np.testing.assert_array_equal(_run(rewritten, indices), _run(model, indices))
    # Out-of-range indices looked up the zero row: Relu(0) everywhere they were.
    outside = _run(rewritten, INDICES[1])
    assert np.all(outside[0, 0] == 0) and np.all(outside[0, 1] == 0)


def test_models_without_the_pattern_or_with_an_old_opset_are_left_alone() -> None:
    model = _one_hot_model()
    other = onnx.ModelProto()
    other.CopyFrom(model)
    # A MatMul whose left side is not a one-hot: the Cast reads the indices themselves.
    cast = next(n for n in other.graph.node if n.op_type == "Cast")
    cast.input[0] = "hot_is_not_here"
    other.graph.node.insert(
        0, helper.make_node("Cast", ["indices"], ["hot_is_not_here"], to=TensorProto.BOOL)
    )
    before = other.SerializeToString()
    assert one_hot_matmuls_as_gathers(other) == 0
    assert other.SerializeToString() == before

    old = _one_hot_model(opset=12)
    before = old.SerializeToString()
    assert one_hot_matmuls_as_gathers(old) == 0
    assert old.SerializeToString() == before


def test_prepared_source_keeps_the_rewrite_beside_the_source_and_remakes_it(
    tmp_path: Path,
) -> None:
    source = tmp_path / "model.onnx"
    onnx.save(_one_hot_model(), str(source))
    path, applied = prepared_source(source)
    assert applied == [f"{ONE_HOT_MATMUL} x1"]
    assert path == tmp_path / "rewritten.onnx" and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert prepared_source(source) == (path, applied)
    assert path.stat().st_mtime_ns == stamp  # reused, not rewritten

    # A new source with nothing to rewrite: the source itself, the stale copy gone.
    plain = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "plain",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        ),
        opset_imports=[helper.make_opsetid("", 15)],
    )
    onnx.save(plain, str(source))
    assert prepared_source(source) == (source, [])
    assert not path.exists()
