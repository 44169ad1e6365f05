"""Triton's example models `simple`, `simple_int8`, `simple_string` and
`simple_identity`, built from code as ONNX (never downloaded), for
`switchyard compile` and clients written against Triton's examples.

- `simple`: INPUT0 and INPUT1, INT32 [1, 16]; OUTPUT0 = INPUT0 + INPUT1 and
  OUTPUT1 = INPUT0 - INPUT1.
- `simple_int8`: the same in INT8 (wrapping as int8 arithmetic does).
- `simple_string`: the same over BYTES [1, 16] tensors holding decimal numbers as
  strings (Cast string -> int32, Add and Sub, Cast back to string).
- `simple_identity`: OUTPUT0 is its BYTES input INPUT0, [batch, any length].

They are not part of the demo repository (`make models`): compile them with
`python -m backends.demo.triton DIR` and `switchyard compile DIR/<name>/model.onnx`.

Imports no grpc, no generated protobuf and nothing from the gateway.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from backends.demo.common import OPSET, save_model

WIDTH = 16


def _add_sub(model_dir: Path, name: str, element: str, via: str | None) -> None:
    """INPUT0 + INPUT1 and INPUT0 - INPUT1 of `element` tensors [1, WIDTH]; `via`: the
    element type they are cast to (and back from) for the arithmetic."""
    from onnx import TensorProto, helper

    elem = getattr(TensorProto, element)
    shape = [1, WIDTH]
    inputs = [helper.make_tensor_value_info(f"INPUT{i}", elem, shape) for i in (0, 1)]
    outputs = [helper.make_tensor_value_info(f"OUTPUT{i}", elem, shape) for i in (0, 1)]
    nodes = []
    a, b = "INPUT0", "INPUT1"
    if via is not None:
        to = getattr(TensorProto, via)
        nodes += [
            helper.make_node("Cast", ["INPUT0"], ["a"], to=to),
            helper.make_node("Cast", ["INPUT1"], ["b"], to=to),
        ]
        a, b = "a", "b"
    sums = ("sum", "difference") if via is not None else ("OUTPUT0", "OUTPUT1")
    nodes += [
        helper.make_node("Add", [a, b], [sums[0]]),
        helper.make_node("Sub", [a, b], [sums[1]]),
    ]
    if via is not None:
        nodes += [
            helper.make_node("Cast", [sums[0]], ["OUTPUT0"], to=elem),
            helper.make_node("Cast", [sums[1]], ["OUTPUT1"], to=elem),
        ]
    graph = helper.make_graph(nodes, name, inputs, outputs)
    save_model(model_dir, helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]))


def build_simple(model_dir: Path) -> None:
    _add_sub(model_dir, "simple", "INT32", None)


def build_simple_int8(model_dir: Path) -> None:
    _add_sub(model_dir, "simple_int8", "INT8", None)


def build_simple_string(model_dir: Path) -> None:
    _add_sub(model_dir, "simple_string", "STRING", "INT32")


def build_simple_identity(model_dir: Path) -> None:
    from onnx import TensorProto, helper

    shape = ["batch", "length"]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "simple_identity",
        [helper.make_tensor_value_info("INPUT0", TensorProto.STRING, shape)],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.STRING, shape)],
    )
    save_model(model_dir, helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]))


BUILDERS: dict[str, Callable[[Path], None]] = {
    "simple": build_simple,
    "simple_int8": build_simple_int8,
    "simple_string": build_simple_string,
    "simple_identity": build_simple_identity,
}


def string_samples(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`rows` sample inputs of `simple_string` (decimal numbers in [-1000, 1000) as
    strings), one per row on a leading axis: its calibration data."""
    rng = np.random.default_rng(seed)
    return {
        f"INPUT{i}": rng.integers(-1000, 1000, (rows, 1, WIDTH)).astype(str).astype(np.bytes_)
        for i in (0, 1)
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("directory", type=Path, help="writes DIRECTORY/<name>/model.onnx")
    args = parser.parse_args(argv)
    for name, build in BUILDERS.items():
        build(args.directory / name)
        print(f"built {args.directory / name / 'model.onnx'}")
    samples = args.directory / "simple_string" / "samples.npz"
    np.savez(samples, **string_samples(64))  # type: ignore[arg-type]
    print(f"wrote {samples} (sample strings: switchyard compile --calibration)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
