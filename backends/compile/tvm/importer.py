"""The ONNX import into Relax with static input shapes: the shape of each input (given, or
the model's own when fully static), the raw model's import, else that of ONNX Runtime's
basic optimisation of it, and the check that every shape in `main` is static.

onnx, onnxruntime and TVM are imported inside the functions that use them, never at import
time. Must not import them at module level, nor anything from gateway/.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from backends.compile.tvm.toolchain import error_summary, load_tvm


class TvmImportError(Exception):
    """TVM cannot import the model (operators it lacks, shapes it cannot make static)."""


def _onnx_inputs(model: Any) -> list[Any]:
    """Graph inputs that are fed at run time (not initializers)."""
    initializers = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _static_shapes(model: Any, given: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Each input's static shape: the one given, else the model's own when fully static."""
    inputs = _onnx_inputs(model)
    names = [i.name for i in inputs]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise TvmImportError(f"input_shapes names {unknown}, the model's inputs are {names}")
    shapes: dict[str, list[int]] = {}
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        if value.name in given:
            shape = [int(d) for d in given[value.name]]
            if len(shape) != len(dims):
                raise TvmImportError(
                    f"input {value.name!r} has rank {len(dims)}, input_shapes gives {shape}"
                )
            for axis, (dim, size) in enumerate(zip(dims, shape, strict=True)):
                if size <= 0 or (dim.HasField("dim_value") and dim.dim_value != size):
                    raise TvmImportError(
                        f"input {value.name!r}: input_shapes gives {shape}, "
                        f"which does not fit the model at dimension {axis}"
                    )
        elif all(d.HasField("dim_value") for d in dims):
            shape = [d.dim_value for d in dims]
        else:
            raise TvmImportError(
                f"input {value.name!r} has dynamic dimensions "
                f"{[d.dim_param or d.dim_value for d in dims]}: TVM variants have static "
                "shapes, so input_shapes must give its shape"
            )
        shapes[value.name] = shape
    return shapes


def _input_dtypes(model: Any) -> dict[str, str]:
    from onnx import helper

    return {
        i.name: str(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
        for i in _onnx_inputs(model)
    }


def _with_static_inputs(model: Any, shapes: Mapping[str, Sequence[int]]) -> Any:
    """A copy of the model whose inputs have the given static shapes."""
    import onnx

    static = onnx.ModelProto()
    static.CopyFrom(model)
    for value in static.graph.input:
        if value.name in shapes:
            for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name], strict=True):
                dim.Clear()
                dim.dim_value = size
    return static


def _ort_basic(model: Any, shapes: Mapping[str, Sequence[int]], scratch: Path) -> Any:
    """ONNX Runtime's basic graph optimisation (constant folding, redundant nodes) of the
    model with its inputs made static."""
    import onnx
    import onnxruntime as ort

    static = _with_static_inputs(model, shapes)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(scratch / "ort_basic.onnx")
    ort.InferenceSession(
        static.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
    )
    return onnx.load(str(scratch / "ort_basic.onnx"))


def _foreign_ops(model: Any) -> dict[str, list[str]]:
    """Operators outside the default ONNX domain, by domain."""
    found: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            ops = found.setdefault(node.domain, [])
            if node.op_type not in ops:
                ops.append(node.op_type)
    return found


def _check_static(tvm: Any, mod: Any) -> list[list[int]]:
    """The static output shapes of `main`; raises TvmImportError on any dynamic shape.

    (TVM 0.27 names Relax struct info `ty`: `Var.ty`, `Function.ret_ty`, `relax.TensorType`.)
    """
    relax = tvm.relax
    main = mod["main"]

    def static_shape(ty: Any, what: str) -> list[int]:
        shape = ty.shape if isinstance(ty, relax.TensorType) else None
        values = getattr(shape, "values", None)
        if values is None or not all(isinstance(v, tvm.tirx.IntImm) for v in values):
            raise TvmImportError(
                f"{what} has a dynamic shape ({ty}) after import with static input shapes; "
                "TVM variants need static shapes"
            )
        return [int(v) for v in values]

    for param in main.params:
        static_shape(param.ty, f"input {param.name!r}")
    ret = main.ret_ty
    fields = ret.fields if isinstance(ret, relax.TupleType) else [ret]
    return [static_shape(f, f"output {index}") for index, f in enumerate(fields)]


def import_onnx(
    source: Path, input_shapes: Mapping[str, Sequence[int]], scratch: Path
) -> tuple[Any, dict[str, list[int]], dict[str, list[int]], bool]:
    """Imports an ONNX model into a Relax IRModule with static shapes.

    Returns (module, input shapes, output shapes, imported via ONNX Runtime). Tries the raw
    model first, then ONNX Runtime's basic optimisation of it; raises TvmImportError
    naming the reason when neither imports.
    """
    import onnx

    tvm = load_tvm()
    from tvm.relax.frontend.onnx import (  # type: ignore[import-untyped, unused-ignore]
        from_onnx,
    )

    model = onnx.load(str(source))
    shapes = _static_shapes(model, input_shapes)
    dtypes = _input_dtypes(model)
    output_names = [o.name for o in model.graph.output]

    def attempt(candidate: Any) -> tuple[Any, list[list[int]]]:
        mod = from_onnx(candidate, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=False)
        return mod, _check_static(tvm, mod)

    via_ort = False
    try:
        mod, outputs = attempt(model)
    except Exception as raw_error:  # TVM raises many types (OpNotImplemented, TVMError, ...)
        foreign = _foreign_ops(model)
        if "ai.onnx.ml" in foreign:
            raise TvmImportError(
                f"{source}: TVM cannot import this model: it uses ai.onnx.ml operators "
                f"({', '.join(foreign['ai.onnx.ml'])}), which TVM's ONNX importer lacks "
                "(classical-ML models run on ONNX Runtime)"
            ) from raw_error
        # Constant folding with static inputs removes shape arithmetic and constant-only
        # operators, which covers much of what the importer rejects or leaves dynamic.
        try:
            mod, outputs = attempt(_ort_basic(model, shapes, scratch))
        except Exception as ort_error:
            raise TvmImportError(
                f"{source}: TVM cannot import this model ({error_summary(raw_error)}), "
                f"nor ONNX Runtime's basic optimisation of it ({error_summary(ort_error)})"
            ) from ort_error
        via_ort = True
    if len(outputs) != len(output_names):
        raise TvmImportError(
            f"{source}: the model has outputs {output_names}, TVM's import returns {len(outputs)}"
        )
    return mod, shapes, dict(zip(output_names, outputs, strict=True)), via_ort
