"""Loads a variant with the runtime adapter its manifest names: the one way a variant
of the repository is loaded (the worker, `switchyard profile`, the compiler's check and
the benches all come here).

The artifacts are read once, from inside the variant's folder, and checked against the
manifest's sha256 (`Variant.read_artifacts`); the runtime is then given those bytes,
never the path, so a file swapped after the check is not what runs. ONNX Runtime takes
the model and its external data files from memory. TVM loads a shared library from a
path: the verified bytes are copied into a private file (`backends.files.private_copy`)
and that copy is loaded.

The runtimes' heavy imports happen here, lazily, so a worker without TVM still serves
ONNX Runtime variants.
"""

from __future__ import annotations

from backends.files import private_copy
from backends.repository import Variant
from backends.runtimes.base import RuntimeAdapter


class RuntimeUnavailable(Exception):
    """The variant's runtime is not installed here, or cannot run it."""


def load_adapter(variant: Variant, threads: int) -> RuntimeAdapter:
    """`variant` loaded from its verified bytes; ManifestError when an artifact is
    missing, outside the variant's folder or not what the manifest hashed,
    RuntimeUnavailable when its runtime is not here."""
    manifest = variant.manifest
    if manifest.runtime == "onnxruntime":
        from backends.runtimes.ort import OrtAdapter

        model, *external = variant.read_artifacts()
        return OrtAdapter(
            model.data,
            threads=threads,
            external_data={artifact.path: artifact.data for artifact in external},
        )
    if manifest.runtime == "tvm":
        try:
            from backends.runtimes.tvm import TvmAdapter
        except ImportError as exc:
            raise RuntimeUnavailable(f"TVM runtime is not installed: {exc}") from exc
        library = variant.read_artifacts()[0]
        with private_copy(library.data, suffix=".so") as path:
            return TvmAdapter(
                path,
                variant.inputs,
                variant.outputs,
                compiled_batch=manifest.compiled_batch or 1,
                threads=threads,
            )
    raise RuntimeUnavailable(f"no adapter for runtime {manifest.runtime!r}")
