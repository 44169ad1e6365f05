"""A backend worker's install, runtime-only: `python -m backends.runtimes.install runtime-only`.

The apache-tvm wheel carries TVM's compiler (`lib/libtvm_compiler.so`, about 260 MB
with LLVM inside) beside its runtime (`lib/libtvm_runtime.so`, 3 MB). A worker runs
compiled TVM libraries with the runtime alone (`TVM_USE_RUNTIME_LIB=1`, see
`backends.runtimes.tvm`), so a backend host or container image can drop the compiler:

    pip install '.[backend]'                 # ONNX Runtime, TVM (runtime used)
    python -m backends.runtimes.install runtime-only  # removes TVM's compiler library

This removes the compiler library from the installed tvm package and leaves a marker
file naming what went, so `switchyard compile` in that install says TVM is runtime-only
rather than failing to load a library. `deploy/backend.Dockerfile` builds such an image.

Finds the tvm package without importing it; nothing runs at import time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

COMPILER_LIBRARIES = ("libtvm_compiler.so",)
"""What of the tvm package only compiling needs (under its `lib/`)."""
MARKER = "SWITCHYARD_RUNTIME_ONLY.json"
"""Left in the tvm package of a runtime-only install: what was removed, and how large."""


def tvm_package(search: Sequence[str] | None = None) -> Path | None:
    """The installed tvm package's folder (where `import tvm` would find it, or on
    `search` paths), without importing it; None when tvm is not installed."""
    if search is not None:
        for entry in search:
            candidate = Path(entry) / "tvm"
            if (candidate / "__init__.py").is_file():
                return candidate
        return None
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def runtime_only(package: Path) -> bool:
    """Whether the tvm package at `package` was made runtime-only."""
    return (package / MARKER).is_file()


def make_runtime_only(package: Path) -> int:
    """Removes TVM's compiler library from the tvm package at `package`; returns the
    bytes freed (0 when it was already runtime-only). Raises FileNotFoundError when the
    package has no runtime library to keep."""
    lib = package / "lib"
    if not (lib / "libtvm_runtime.so").is_file():
        raise FileNotFoundError(f"{lib}/libtvm_runtime.so: not a TVM install with a runtime")
    removed = {}
    for name in COMPILER_LIBRARIES:
        path = lib / name
        if path.is_file():
            removed[name] = path.stat().st_size
            path.unlink()
    marker = package / MARKER
    before = json.loads(marker.read_text()) if marker.is_file() else {}
    marker.write_text(json.dumps({**before, **removed}, indent=1, sort_keys=True) + "\n")
    return sum(removed.values())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backends.runtimes.install", description=__doc__
    )
    sub = parser.add_subparsers(dest="command", required=True)
    prune = sub.add_parser(
        "runtime-only", help="remove TVM's compiler library from this install (workers only)"
    )
    prune.add_argument(
        "--site-packages",
        type=Path,
        default=None,
        help="the site-packages holding tvm (default: where `import tvm` would find it)",
    )
    args = parser.parse_args(argv)
    package = tvm_package([str(args.site_packages)] if args.site_packages else None)
    if package is None:
        print("TVM is not installed here: nothing to remove")
        return 0
    freed = make_runtime_only(package)
    if freed:
        print(f"{package}: TVM's compiler removed ({freed / 1e6:.0f} MB); its runtime stays")
    else:
        print(f"{package}: already runtime-only")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
