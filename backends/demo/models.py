"""Builds the demo model repository from code: nothing is downloaded.

- `digits`: a logistic-regression classifier trained with scikit-learn on its
  bundled 8x8 digits dataset, converted with skl2onnx. Reference outputs come
  from scikit-learn itself.
- `cnn`, `resnet`, `mobilenet`: conv nets that classify scikit-learn's bundled
  8x8 digits, scaled up to 3 x 32 x 32 images. Each has a seeded conv body and
  a dense classifier fitted (logistic regression) to the body's features of 256
  training digits; the samples are 64 held-out digits. The classifier pools the
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
  are magika's byte features of 64 files: modules and scripts of the Python
  standard library, the Python executable, a numpy extension module, magika's
  own files, and files written by standard-library encoders (gzip, zip, sqlite,
  PNG, WAV, ...). Reference outputs come from ONNX Runtime fp32 on the model.
- `tinyconv` (fixed batch 1, about 6 MFLOP) and `midconv` (about 0.37 GFLOP a row),
  conv nets of the same kind, are built only when named: `make bench` measures the
  gateway's hop on them in a repository of its own.
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
import hashlib
import importlib.metadata
import json
import sys
from collections.abc import Callable
from pathlib import Path

from backends.compile.variants import build_ort_fp32
from backends.demo.convnets import (
    build_cnn,
    build_midconv,
    build_mobilenet,
    build_resnet,
    build_tinyconv,
)
from backends.demo.digits import build_digits
from backends.demo.echo import build_echo
from backends.demo.magika import build_magika
from backends.demo.transformer import build_transformer
from backends.repository import ModelRepository

BUILDERS: dict[str, Callable[[Path], None]] = {
    "digits": build_digits,
    "cnn": build_cnn,
    "resnet": build_resnet,
    "mobilenet": build_mobilenet,
    "transformer": build_transformer,
    "magika": build_magika,
    "echo": build_echo,
}


# Built only when named (`make bench` builds them in its own repository): the gateway's
# hop targets' models, a tiny conv net of fixed batch 1 and a mid-size one.
BENCH_BUILDERS: dict[str, Callable[[Path], None]] = {
    "tinyconv": build_tinyconv,
    "midconv": build_midconv,
}

# Models whose point is transport, not compute: the fp32 variant is all they need.
FP32_ONLY = frozenset({"echo"})

BUILD_RECORD = ".demo-build.json"
"""Written at a repository's root by `python -m backends.demo` into an empty folder
(or none): what built it (the
digest of `source_digest`), the models built, and a digest of each file it wrote, so
that a copy can stand in for a fresh build of the same code (`is_fresh_build`)."""

_BUILD_LIBRARIES = ("numpy", "onnx", "onnxruntime", "scikit-learn", "skl2onnx", "torch", "magika")
"""The libraries whose versions a build's outputs depend on (training, export,
quantisation, magika's shipped model)."""
NOT_BUILT = frozenset({BUILD_RECORD, ".built"})
"""Files at a repository's root that the build did not write: its record, make's stamp."""


def build(root: Path, models: list[str] | None = None) -> list[str]:
    """Builds the demo models (all by default) and compiles their ONNX Runtime
    variants, each checked against the fp32 source (`switchyard compile`)."""
    from backends.compile.compiler import compile_model

    repository = ModelRepository(root)
    built = []
    for name in models or list(BUILDERS):
        {**BUILDERS, **BENCH_BUILDERS}[name](root / name)
        if name in FP32_ONLY:
            build_ort_fp32(repository, name)
        else:
            for outcome in compile_model(repository.source(name), name, repository):
                if outcome.status == "failed":
                    raise RuntimeError(f"{name}: {outcome.variant} failed: {outcome.detail}")
        built.append(name)
    return built


def source_digest() -> str:
    """A digest of what a demo build depends on: every file of the backends package
    (the builders, the compiler and its checks, the runtimes) and the versions of the
    libraries in _BUILD_LIBRARIES."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(json.dumps(_file_digests(package), sort_keys=True).encode())
    for library in _BUILD_LIBRARIES:
        try:
            version = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            version = "-"
        digest.update(f"{library}={version}\0".encode())
    return digest.hexdigest()


def _file_digests(root: Path) -> dict[str, str]:
    """Each file under `root` -> its SHA-256, but for NOT_BUILT and Python's caches."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name not in NOT_BUILT and "__pycache__" not in path.parts
    }


def record_build(root: Path, models: list[str]) -> None:
    """Writes BUILD_RECORD for the models just built at `root`."""
    record = {"source": source_digest(), "models": sorted(models), "files": _file_digests(root)}
    (root / BUILD_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def is_fresh_build(root: Path, models: list[str]) -> bool:
    """Whether `root` holds exactly what `build(root, models)` would make now: built by
    this code and these libraries, of these models, and changed since in no file (a
    TVM variant added, a profile written, a file edited: not fresh)."""
    try:
        record = json.loads((root / BUILD_RECORD).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(record, dict)
        and record.get("models") == sorted(models)
        and record.get("source") == source_digest()
        and record.get("files") == _file_digests(root)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument(
        "models",
        nargs="*",
        choices=[*BUILDERS, *BENCH_BUILDERS, []],
        help=f"default: all but {', '.join(BENCH_BUILDERS)}",
    )
    args = parser.parse_args(argv)
    # Only a build into an empty folder is recorded: one over an earlier repository
    # leaves whatever else was there (TVM variants, profiles) among the files.
    (args.repository / BUILD_RECORD).unlink(missing_ok=True)
    empty = not args.repository.exists() or not any(args.repository.iterdir())
    built = build(args.repository, args.models or None)
    for name in built:
        print(f"built {args.repository / name}")
    if empty:
        record_build(args.repository, built)
    return 0


if __name__ == "__main__":
    sys.exit(main())
