"""Loads a variant with the runtime adapter its manifest names. The runtimes'
heavy imports happen here, lazily, so a worker without TVM still serves ONNX
Runtime variants."""

from __future__ import annotations

from backends.repository import Variant
from backends.runtimes.base import RuntimeAdapter


class RuntimeUnavailable(Exception):
    """The variant's runtime is not installed here, or cannot run it."""


def load_adapter(variant: Variant, threads: int) -> RuntimeAdapter:
    manifest = variant.manifest
    if manifest.runtime == "onnxruntime":
        from backends.runtimes.ort import OrtAdapter

        return OrtAdapter(variant.artifact_path, threads=threads)
    if manifest.runtime == "tvm":
        try:
            from backends.runtimes.tvm import TvmAdapter
        except ImportError as exc:
            raise RuntimeUnavailable(f"TVM runtime is not installed: {exc}") from exc
        return TvmAdapter(
            variant.artifact_path,
            variant.inputs,
            variant.outputs,
            compiled_batch=manifest.compiled_batch or 1,
            threads=threads,
        )
    raise RuntimeUnavailable(f"no adapter for runtime {manifest.runtime!r}")
