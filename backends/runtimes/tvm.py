"""Apache TVM adapter: runs a library exported by `backends.compile.tvm.build` with TVM's runtime.

Runtime only. TVM's Python package loads its 260 MB compiler library unless the
environment variable `TVM_USE_RUNTIME_LIB=1` is set before `tvm` is first imported; then
it loads `libtvm_runtime.so` (3 MB) alone, which is all a worker needs. The worker calls
`use_runtime_only()` at start-up, before anything imports tvm; a `TvmAdapter` made in a
process that has not imported tvm yet does the same. Where the full compiler is already
loaded (a compile process profiling what it built), the adapter runs on it unchanged.

Threads. TVM's runtime sizes its thread pool from `TVM_NUM_THREADS` when a thread first
runs a parallel kernel, and keeps one pool per calling thread; without the variable it
takes the number of physical cores. The adapter sets the variable from its `threads`
before its first run, so every TVM adapter of a process must use the same thread count
(a second count raises ValueError). Pool threads are not pinned to cores
(`TVM_BIND_THREADS=0`, unless the environment says otherwise): several workers share one
machine. Idle pool threads spin for a while before sleeping (TVM's default); with
`TVM_THREAD_POOL_SPIN_COUNT=0` they sleep at once, which made the demo cnn at 2 threads
four times slower per request (107 us against 27 us), so it is left to the operator.

CUDA. `device="cuda"` runs a CUDA library on device 0; its kernels are compiled with
NVRTC when it loads (see `_cuda_device`), so a GPU worker needs `cuda-bindings` and CUDA
13's libnvrtc besides TVM.

Imports numpy and, inside functions, tvm; not onnx, onnxruntime, or the TVM compiler.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from backends.protocol.errors import InvalidInput
from backends.protocol.tensors import NUMPY_DTYPES, TensorSpec
from backends.runtimes.base import Array

RUNTIME_NAME = "tvm"

# Relax VM device and allocator codes, as `vm_initialization` takes them.
_DEVICE_CODES = {"cpu": 1, "cuda": 2}
_ALLOCATOR_POOLED = 2
# TVM takes tensors it does not own only when their data is aligned to this many bytes.
_ALIGNMENT = 64

_threads_lock = threading.Lock()
_process_threads: int | None = None


def use_runtime_only() -> None:
    """Makes the first `import tvm` of this process load TVM's runtime library only.

    Call before anything imports tvm. Sets `TVM_USE_RUNTIME_LIB=1` (and, when unset,
    `TVM_BIND_THREADS=0`). Does nothing when tvm is already imported runtime-only; raises
    RuntimeError when the full compiler is loaded, because it cannot be unloaded.
    """
    tvm = sys.modules.get("tvm")
    if tvm is not None:
        if _loaded_runtime_only(tvm):
            return
        raise RuntimeError(
            "tvm is already imported with its compiler library in this process; "
            "call use_runtime_only() before anything imports tvm"
        )
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    os.environ.setdefault("TVM_BIND_THREADS", "0")


def _loaded_runtime_only(tvm: Any) -> bool:
    return bool(tvm.base._RUNTIME_ONLY)


def _import_tvm() -> Any:
    if "tvm" not in sys.modules:
        use_runtime_only()
    import tvm  # type: ignore[import-untyped, unused-ignore]

    return tvm


def _claim_threads(threads: int) -> None:
    """Sets TVM's thread-pool size for this process, once."""
    global _process_threads
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    with _threads_lock:
        if _process_threads is not None and _process_threads != threads:
            raise ValueError(
                f"this process already runs TVM with {_process_threads} threads; TVM's "
                f"thread pool is sized once per thread that uses it, so {threads} cannot "
                "be honoured exactly"
            )
        _process_threads = threads
        os.environ["TVM_NUM_THREADS"] = str(threads)


def _static_shape(spec: TensorSpec, batch: int) -> tuple[int, ...]:
    """The compiled shape of a tensor: the batch dimension fixed to `batch` when batched."""
    shape = list(spec.shape)
    if batch > 0:
        if not shape:
            raise ValueError(f"{spec.name!r} has no batch dimension, compiled_batch is {batch}")
        shape[0] = batch
    if any(d < 0 for d in shape):
        raise ValueError(
            f"{spec.name!r} has shape {list(spec.shape)}: a TVM library has static shapes, "
            "only the batch dimension may be -1"
        )
    return tuple(shape)


class TvmAdapter:
    """One exported TVM library loaded in one Relax VM, on the CPU or on CUDA device 0.

    The library has static shapes with a batch of `compiled_batch` rows (0: no batch
    dimension, inputs must have exactly the compiled shapes). `run` takes any batch size:
    it runs the library on chunks of `compiled_batch` rows, zero-pads the last chunk and
    drops the padded rows from the outputs. Outputs are `main`'s results in order, named by
    `outputs`. Safe to call from several threads: the VM runs one call at a time.

    `library` is loaded by path; a variant's library comes through
    `backends.runtimes.loader`, which passes a private copy of the bytes it checked
    against the manifest, never the repository's file.
    """

    def __init__(
        self,
        library: Path,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        compiled_batch: int,
        threads: int,
        *,
        device: str = "cpu",
    ) -> None:
        if device not in _DEVICE_CODES:
            raise ValueError(f"device must be one of {sorted(_DEVICE_CODES)}, got {device!r}")
        if compiled_batch < 0:
            raise ValueError(f"compiled_batch must be >= 0, got {compiled_batch}")
        if not Path(library).is_file():
            raise FileNotFoundError(f"TVM library {library} does not exist")
        for spec in inputs + outputs:
            if spec.datatype == "BYTES":
                raise ValueError(f"{spec.name!r} is BYTES, which TVM libraries cannot take")
        self._inputs = inputs
        self._outputs = outputs
        self._batch = compiled_batch
        self._input_shapes = [_static_shape(s, compiled_batch) for s in inputs]
        self._input_dtypes = [NUMPY_DTYPES[s.datatype] for s in inputs]
        self._output_index = {s.name: index for index, s in enumerate(outputs)}
        self._lock = threading.Lock()

        _claim_threads(threads)
        tvm = _import_tvm()
        self._tvm = tvm
        self._runtime_only = _loaded_runtime_only(tvm)
        if device == "cuda":
            tvm_device = _cuda_device(tvm, self._runtime_only)
        else:
            tvm_device = tvm.cpu(0)
        module = tvm.runtime.load_module(str(library))
        self._vm = module["vm_load_executable"]()
        # (device type, device id, allocator) for the device, then for the host (CPU 0);
        # pooled allocators.
        self._vm["vm_initialization"](
            _DEVICE_CODES[device], 0, _ALLOCATOR_POOLED, _DEVICE_CODES["cpu"], 0, _ALLOCATOR_POOLED
        )
        self._main = self._vm["main"]
        # The compiled-shape inputs live in 64-byte aligned host buffers: a run copies rows
        # into them. On CPU, TVM tensors view them without copying (TVM requires the
        # alignment); on CUDA, they are uploaded to device tensors for each run.
        self._staging = [
            _aligned(shape, dtype)
            for shape, dtype in zip(self._input_shapes, self._input_dtypes, strict=True)
        ]
        self._on_device = device != "cpu"
        if self._on_device:
            self._args = [
                tvm.runtime.empty(b.shape, str(b.dtype), tvm_device) for b in self._staging
            ]
        else:
            self._args = [tvm.runtime.from_dlpack(b) for b in self._staging]
        # One run on zeros: proves the library loads and runs, checks its outputs against
        # the signature, and starts this thread's pool.
        with self._lock:
            results = self._call()
        if len(results) != len(outputs):
            raise ValueError(
                f"{library} returns {len(results)} outputs, the signature names {len(outputs)}"
            )
        for spec, result in zip(outputs, results, strict=True):
            problem = spec.check_shape(result.shape)
            if problem is not None or result.dtype != NUMPY_DTYPES[spec.datatype]:
                raise ValueError(
                    f"{library}: output {spec.name!r} is {result.dtype} {list(result.shape)}, "
                    f"the signature says {spec.datatype} {list(spec.shape)}"
                )

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    @property
    def runtime_only(self) -> bool:
        """True when this process runs TVM without its compiler library."""
        return self._runtime_only

    def run(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> list[Array]:
        positions = []
        for name in outputs:
            if name not in self._output_index:
                raise InvalidInput(
                    f"unknown output {name!r}; the model has {list(self._output_index)}"
                )
            positions.append(self._output_index[name])
        arrays = self._arrays(inputs)
        if self._batch == 0:
            with self._lock:
                for buffer, array in zip(self._staging, arrays, strict=True):
                    np.copyto(buffer, array)
                results = self._call()
            return [results[p] for p in positions]
        rows = arrays[0].shape[0]
        chunks: list[list[Array]] = []
        for start in range(0, max(rows, 1), self._batch):
            count = min(self._batch, rows - start)
            with self._lock:
                for buffer, array in zip(self._staging, arrays, strict=True):
                    buffer[:count] = array[start : start + count]
                    buffer[count:] = 0
                results = self._call()
            chunks.append([results[p][:count] for p in positions])
        if len(chunks) == 1:
            return chunks[0]
        return [np.concatenate([c[i] for c in chunks]) for i in range(len(positions))]

    def _arrays(self, inputs: Mapping[str, Array]) -> list[Array]:
        """The inputs in `main`'s order, checked against the compiled shapes and dtypes."""
        arrays: list[Array] = []
        rows: int | None = None
        for spec, shape, dtype in zip(
            self._inputs, self._input_shapes, self._input_dtypes, strict=True
        ):
            if spec.name not in inputs:
                raise InvalidInput(f"missing input {spec.name!r}")
            array = np.asarray(inputs[spec.name])
            if array.dtype != dtype:
                raise InvalidInput(
                    f"input {spec.name!r} is {array.dtype}, the model takes {spec.datatype}"
                )
            tail = array.shape[1:] if self._batch else array.shape
            want = shape[1:] if self._batch else shape
            if len(array.shape) != len(shape) or tail != want:
                raise InvalidInput(
                    f"input {spec.name!r} has shape {list(array.shape)}, the model takes "
                    f"{list(spec.shape)}"
                )
            if rows is not None and self._batch and array.shape[0] != rows:
                raise InvalidInput(
                    f"inputs have different batch sizes ({rows} and {array.shape[0]} "
                    f"for {spec.name!r})"
                )
            rows = array.shape[0] if self._batch else rows
            arrays.append(array)
        return arrays

    def _call(self) -> list[Array]:
        """One run of `main` on the staging buffers (hold the lock); outputs copied out."""
        if self._on_device:
            for tensor, buffer in zip(self._args, self._staging, strict=True):
                tensor.copyfrom(buffer)
        result = self._main(*self._args)
        if isinstance(result, self._tvm.runtime.Tensor):
            result = [result]
        if self._on_device:
            return [r.numpy() for r in result]
        return [np.from_dlpack(r).copy() for r in result]


def _cuda_device(tvm: Any, runtime_only: bool) -> Any:
    """CUDA device 0, with what runtime-only TVM lacks to run CUDA libraries set up.

    A CUDA library from `backends.compile.tvm.build` carries its kernels as CUDA C, compiled
    with NVRTC when the library is loaded (the `cuda-bindings` package and CUDA 13's
    libnvrtc). Runtime-only TVM (0.27) neither loads its CUDA runtime library nor can run
    the stock compile callback, which asks the compiler for the current target's arch: the
    library is loaded here, and the callback replaced by one that names the device's arch.
    """
    if runtime_only and "tvm_runtime_cuda" not in tvm.base._LOADED_LIBS:
        from tvm_ffi.libinfo import load_lib_ctypes

        runtime_dir = Path(tvm.base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent
        try:
            tvm.base._LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
                package="tvm",
                target_name="tvm_runtime_cuda",
                extra_lib_paths=[runtime_dir],
                mode="RTLD_LOCAL",
            )
        except (OSError, RuntimeError) as exc:
            raise RuntimeError(
                f"TVM's CUDA runtime (libtvm_runtime_cuda) does not load: {exc}"
            ) from exc
    device = tvm.cuda(0)
    if not device.exist:
        raise RuntimeError("no CUDA device 0 here (or no CUDA driver): cannot load a CUDA variant")
    if runtime_only:
        import tvm_ffi
        from tvm.support import nvcc  # type: ignore[import-untyped, unused-ignore]

        arch = "sm_" + str(device.compute_version).replace(".", "")

        def compile_cuda(code: str) -> bytes:
            return bytes(
                nvcc.compile_cuda(code, target_format="cubin", arch=arch, compiler="nvrtc")
            )

        tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)
    return device


def _aligned(shape: tuple[int, ...], dtype: np.dtype[np.generic]) -> Array:
    """A zeroed C-contiguous array whose data starts on a 64-byte boundary."""
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.zeros(size + _ALIGNMENT, dtype=np.uint8)
    offset = -raw.ctypes.data % _ALIGNMENT
    return raw[offset : offset + size].view(dtype).reshape(shape)
