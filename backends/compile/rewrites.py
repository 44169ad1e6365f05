"""Exact graph rewrites applied to a source model before any runtime compiles it.

A rewrite replaces a pattern by a cheaper one that computes the same values for every
input (not approximately: the variant's accuracy check still compares it with the
untouched source). Every variant of a model is built from the rewritten graph, so
ONNX Runtime and TVM gain the same and their figures stay comparable.

`one-hot-matmul-as-gather`: a one-hot encoding built as `Cast(Equal(indices, iota))`
and multiplied by a constant matrix `W` (an embedding written as a dense layer, as
exporters from JAX and TensorFlow emit it) is a row lookup: `Gather(W, indices)`.
The MatMul reads D times more data than the lookup and the one-hot tensor it needs
is D times larger than the indices (magika's: 2048 x 257 floats per sample). Indices
outside [0, D) make a zero one-hot row, so they look up an added row of zeros.

`prepared_source` is what the variant builders read: the rewritten model, kept beside
the source and remade when the source changes, or the source when nothing applies.
Manifests list the rewrites in their variant (`"rewrites": ["one-hot-matmul-as-gather x1"]`).

Imports onnx and numpy; nothing runs at import time.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backends.files import write_atomically

ONE_HOT_MATMUL = "one-hot-matmul-as-gather"
REWRITTEN = "rewritten.onnx"
"""The rewritten source, beside the source model."""
REWRITTEN_RECORD = "rewritten.json"

MIN_OPSET = 13
"""The replacement's Squeeze takes its axes as an input from opset 13; older models keep
their graph (raising a model's opset could change what its other operators mean)."""

_INTEGER = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)


@dataclass(frozen=True, slots=True)
class _OneHot:
    matmul: Any
    table: np.ndarray
    """W: (D, N)."""
    indices: str
    """The integer tensor compared with the iota; its last dimension is 1."""
    expand: Any | None
    """The Expand that broadcast the indices to (..., D), if any."""


def _constants(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1:
            attribute = node.attribute[0]
            if attribute.name == "value":
                values[node.output[0]] = numpy_helper.to_array(attribute.t)
    return values


def _is_iota(value: np.ndarray, depth: int) -> bool:
    """Whether `value` is 0, 1, ..., depth-1 along its last axis, size 1 on every other."""
    if value.ndim == 0 or value.shape[-1] != depth or any(d != 1 for d in value.shape[:-1]):
        return False
    return value.dtype.type in _INTEGER and bool(
        np.array_equal(value.reshape(-1), np.arange(depth))
    )


def _last_dim(shapes: dict[str, Any], name: str) -> int | None:
    shape = shapes.get(name)
    if shape is None or not shape.dim:
        return None
    last = shape.dim[-1]
    return int(last.dim_value) if last.HasField("dim_value") else None


def _find(model: Any) -> list[_OneHot]:
    import onnx

    graph = model.graph
    constants = _constants(graph)
    producer = {out: node for node in graph.node for out in node.output}
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        v.name: v.type.tensor_type.shape
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        if v.type.HasField("tensor_type")
    }
    found = []
    for matmul in graph.node:
        if matmul.op_type != "MatMul" or matmul.input[1] not in constants:
            continue
        table = constants[matmul.input[1]]
        if table.ndim != 2 or table.dtype.kind != "f":
            continue
        cast = producer.get(matmul.input[0])
        if cast is None or cast.op_type != "Cast":
            continue
        to = next((a.i for a in cast.attribute if a.name == "to"), None)
        if to != onnx.helper.np_dtype_to_tensor_dtype(table.dtype):
            continue
        equal = producer.get(cast.input[0])
        if equal is None or equal.op_type != "Equal":
            continue
        depth = table.shape[0]
        sides = [
            (equal.input[1], equal.input[0]),
            (equal.input[0], equal.input[1]),
        ]
        for iota, other in sides:
            if iota not in constants or not _is_iota(constants[iota], depth):
                continue
            expand = producer.get(other)
            indices = other
            if expand is not None and expand.op_type == "Expand":
                indices = expand.input[0]
            else:
                expand = None
            if _last_dim(shapes, indices) != 1:
                continue
            found.append(_OneHot(matmul, table, indices, expand))
            break
    return found


def one_hot_matmuls_as_gathers(model: Any) -> int:
    """Rewrites, in place, every one-hot MatMul of `model` as a Gather (see the module's
    docstring); returns how many. Nodes left without a consumer are removed."""
    from onnx import TensorProto, helper, numpy_helper

    if _opset(model) < MIN_OPSET:
        return 0
    found = _find(model)
    if not found:
        return 0
    graph = model.graph
    nodes = list(graph.node)
    for k, hit in enumerate(found):
        prefix = f"switchyard_one_hot_{k}"
        depth, width = hit.table.shape
        padded = np.concatenate([hit.table, np.zeros((1, width), hit.table.dtype)])
        graph.initializer.append(numpy_helper.from_array(padded, f"{prefix}/table"))
        replacement = []
        indices = hit.indices
        if hit.expand is not None:
            # Keep what the Expand broadcast on the other axes: expand to (..., 1).
            graph.initializer.extend(
                [
                    numpy_helper.from_array(np.array([0], np.int64), f"{prefix}/zero"),
                    numpy_helper.from_array(np.array([-1], np.int64), f"{prefix}/minus_one"),
                    numpy_helper.from_array(np.array([1], np.int64), f"{prefix}/one"),
                ]
            )
            replacement += [
                helper.make_node(
                    "Slice",
                    [hit.expand.input[1], f"{prefix}/zero", f"{prefix}/minus_one"],
                    [f"{prefix}/lead"],
                ),
                helper.make_node(
                    "Concat", [f"{prefix}/lead", f"{prefix}/one"], [f"{prefix}/shape"], axis=0
                ),
                helper.make_node("Expand", [indices, f"{prefix}/shape"], [f"{prefix}/expanded"]),
            ]
            indices = f"{prefix}/expanded"
        graph.initializer.append(
            numpy_helper.from_array(np.array([-1], np.int64), f"{prefix}/axis")
        )
        replacement.append(
            helper.make_node("Squeeze", [indices, f"{prefix}/axis"], [f"{prefix}/indices"])
        )
        # Out of [0, depth): the zero row at `depth` (Gather would read negative
        # indices from the end).
        replacement += [
            helper.make_node(
                "Cast", [f"{prefix}/indices"], [f"{prefix}/i64"], to=TensorProto.INT64
            ),
            helper.make_node(
                "Constant",
                [],
                [f"{prefix}/low"],
                value=numpy_helper.from_array(np.array(0, np.int64)),
            ),
            helper.make_node(
                "Constant",
                [],
                [f"{prefix}/depth"],
                value=numpy_helper.from_array(np.array(depth, np.int64)),
            ),
            helper.make_node("Less", [f"{prefix}/i64", f"{prefix}/low"], [f"{prefix}/below"]),
            helper.make_node(
                "GreaterOrEqual", [f"{prefix}/i64", f"{prefix}/depth"], [f"{prefix}/above"]
            ),
            helper.make_node("Or", [f"{prefix}/below", f"{prefix}/above"], [f"{prefix}/out"]),
            helper.make_node(
                "Where",
                [f"{prefix}/out", f"{prefix}/depth", f"{prefix}/i64"],
                [f"{prefix}/row"],
            ),
            helper.make_node(
                "Gather", [f"{prefix}/table", f"{prefix}/row"], list(hit.matmul.output), axis=0
            ),
        ]
        at = nodes.index(hit.matmul)
        nodes[at : at + 1] = replacement
    del graph.node[:]
    graph.node.extend(_live(nodes, [o.name for o in graph.output]))
    _drop_unused_initializers(graph)
    return len(found)


def _live(nodes: list[Any], outputs: Iterable[str]) -> list[Any]:
    """`nodes` less those whose outputs nothing reads, repeatedly."""
    kept = list(nodes)
    while True:
        read = Counter(name for node in kept for name in node.input)
        read.update(outputs)
        alive = [n for n in kept if any(read[o] for o in n.output if o)]
        if len(alive) == len(kept):
            return alive
        kept = alive


def _drop_unused_initializers(graph: Any) -> None:
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name not in read]
    for tensor in unused:
        graph.initializer.remove(tensor)


def _opset(model: Any) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


REWRITES: dict[str, Callable[[Any], int]] = {ONE_HOT_MATMUL: one_hot_matmuls_as_gathers}
"""Every rewrite, by the name manifests record it under, in the order they run."""


def rewrite(model: Any) -> list[str]:
    """Applies every rewrite to `model` in place; returns the names of those that changed
    it, each with its count (`one-hot-matmul-as-gather x1`)."""
    applied = []
    for name, apply in REWRITES.items():
        count = apply(model)
        if count:
            applied.append(f"{name} x{count}")
    return applied


def prepared_source(source: Path) -> tuple[Path, list[str]]:
    """The model every variant of `source` is built from, and the rewrites in it.

    `source` rewritten, kept beside it as `rewritten.onnx` (with `rewritten.json`
    naming the source's sha256 and the rewrites) and made again when the source
    changes; `source` itself, with no rewrites, when none applies."""
    import onnx

    from backends.repository import sha256_file

    digest = sha256_file(source)
    out = source.with_name(REWRITTEN)
    record = source.with_name(REWRITTEN_RECORD)
    try:
        cached = json.loads(record.read_text())
        if cached["source_sha256"] == digest and (not cached["rewrites"] or out.is_file()):
            applied = [str(r) for r in cached["rewrites"]]
            return (out if applied else source), applied
    except (OSError, ValueError, KeyError, TypeError):
        pass
    model = onnx.load(str(source))
    applied = rewrite(model)
    if applied:
        write_atomically(out, lambda partial: onnx.save(model, str(partial)))
    else:
        out.unlink(missing_ok=True)
    record.write_text(json.dumps({"source_sha256": digest, "rewrites": applied}) + "\n")
    return (out if applied else source), applied
