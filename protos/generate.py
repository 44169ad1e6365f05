"""Generates the protobuf and gRPC Python code for `protos/*.proto`.

`python -m protos.generate --out .` regenerates the committed modules;
`--check` regenerates into a scratch folder and exits 1 when the committed
modules differ (stale code is a build error, not a surprise at run time).
Needs grpcio-tools (a development dependency); nothing else imports this module.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ("protos/inference.proto", "protos/gateway.proto", "protos/admin.proto")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc for every proto; returns the generated files under `out_dir`."""
    import grpc_tools
    from grpc_tools import protoc  # development dependency

    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in PROTOS:
        args = [
            "protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(ROOT / proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {proto}")
    generated = []
    for proto in PROTOS:
        stem = out_dir / proto.removesuffix(".proto")
        generated += [stem.with_name(stem.name + suffix) for suffix in GENERATED_SUFFIXES]
    return generated


def stale_files() -> list[str]:
    """Names of committed generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as scratch:
        fresh = generate(Path(scratch))
        stale = []
        for path in fresh:
            committed = ROOT / path.relative_to(scratch)
            if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                stale.append(str(committed.relative_to(ROOT)))
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=ROOT, help="output root (default: the repository)"
    )
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated code (run `make protos`): " + ", ".join(stale), file=sys.stderr)
            return 1
        print("generated protobuf code is up to date")
        return 0
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
