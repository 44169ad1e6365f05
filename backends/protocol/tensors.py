"""Tensor datatypes and signatures of the Open Inference Protocol, as domain types.

Maps protocol datatypes (`FP32`, `BYTES`, ...) to numpy dtypes and to the
typed-contents fields of the protocol, encodes and decodes the length-prefixed
BYTES layout, and validates shapes against a model's signature. Imports numpy
only: no protobuf, no runtime.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

# Protocol datatype -> numpy dtype. BYTES tensors are object arrays of `bytes`.
NUMPY_DTYPES: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

# Protocol datatype -> the InferTensorContents field that carries it typed.
# FP16 has no typed field: it travels only as raw contents.
CONTENTS_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

# Bytes per element of each datatype of fixed size. BF16 has no numpy dtype: it travels
# raw only, and only what needs no decoding (zeros to send) can make it.
ELEMENT_BYTES: dict[str, int] = {
    **{dt: dtype.itemsize for dt, dtype in NUMPY_DTYPES.items() if dt != "BYTES"},
    "BF16": 2,
}

# Triton model-config enum names (ModelConfig's DataType) per protocol datatype.
CONFIG_TYPES: dict[str, str] = {
    dt: ("TYPE_STRING" if dt == "BYTES" else f"TYPE_{dt}") for dt in NUMPY_DTYPES
}

MAX_ELEMENTS = 1 << 31
"""The most elements one tensor may declare; larger shapes are rejected before any
allocation (a shape is caller input, and so is its product)."""

MAX_RANK = 32
"""The most dimensions one tensor may declare."""

MAX_TENSORS = 256
"""The most inputs, and the most outputs, one request may name."""

BYTES_LENGTH_PREFIX = 4
"""Each element of raw BYTES contents starts with its length, a uint32: no element
takes fewer bytes than this."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output of a model: name, protocol datatype, shape (-1 = any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def check_shape(self, shape: Sequence[int]) -> str | None:
        """Why `shape` does not fit this spec, or None when it does."""
        if len(shape) != len(self.shape):
            return (
                f"shape {list(shape)} has rank {len(shape)}, "
                f"the model takes rank {len(self.shape)} {list(self.shape)}"
            )
        for axis, (got, want) in enumerate(zip(shape, self.shape, strict=True)):
            if want >= 0 and got != want:
                return (
                    f"shape {list(shape)} does not match the model's {list(self.shape)} "
                    f"at dimension {axis}"
                )
        return None


def element_count(shape: Sequence[int]) -> int:
    """Number of elements of `shape` (Python ints: no overflow)."""
    count = 1
    for dim in shape:
        count *= dim
    return count


def shown_shape(shape: Sequence[int]) -> str:
    """`shape` as an error message shows it: its first 8 dimensions, then how many more."""
    if len(shape) <= 8:
        return str(list(shape))
    return str(list(shape[:8]))[:-1] + f", ... ({len(shape)} dimensions)]"


def shape_problem(shape: Sequence[int]) -> str | None:
    """Why a caller-given shape is malformed, or None: more than MAX_RANK dimensions, a
    negative one, or more than MAX_ELEMENTS elements (the product taken with an early
    stop, each dimension bounded first). Cheap, and before any allocation: one pass
    over at most MAX_RANK dimensions, no message made unless one is wrong."""
    if len(shape) > MAX_RANK:
        return f"shape {shown_shape(shape)} has rank {len(shape)}; at most {MAX_RANK} is allowed"
    count = 1
    too_many = False
    for dim in shape:
        if dim < 0:
            return f"shape {shown_shape(shape)} has a negative dimension {dim}"
        if dim > MAX_ELEMENTS:
            too_many = True
        elif count <= MAX_ELEMENTS or dim == 0:  # at most MAX_ELEMENTS squared
            count *= dim
    if too_many or count > MAX_ELEMENTS:
        return f"shape {shown_shape(shape)} has more than {MAX_ELEMENTS} elements"
    return None


def decode_bytes_tensor(raw: bytes, count: int) -> npt.NDArray[np.object_] | str:
    """Decodes BYTES raw contents (each element: uint32 little-endian length, then
    the bytes) into an object array of `count` elements; a string says what is wrong.
    The length of `raw` is checked against `count` (each element takes its 4-byte
    length at least) before the array is allocated."""
    if count * BYTES_LENGTH_PREFIX > len(raw):
        return (
            f"raw BYTES contents hold {len(raw)} bytes, too few for {count} elements "
            f"({BYTES_LENGTH_PREFIX} bytes of length each at least)"
        )
    out = np.empty(count, dtype=np.object_)
    view = memoryview(raw)
    offset = 0
    for index in range(count):
        if offset + 4 > len(view):
            return f"raw BYTES contents end after {index} of {count} elements"
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            return f"raw BYTES element {index} declares {length} bytes past the end"
        out[index] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(view):
        return f"raw BYTES contents hold {len(view) - offset} bytes after {count} elements"
    return out


def encode_bytes_tensor(array: npt.NDArray[np.generic]) -> bytes:
    """Encodes an object/str array in the length-prefixed BYTES layout."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = _item_bytes(item)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def as_bytes_items(array: npt.NDArray[np.generic]) -> list[bytes]:
    """Elements of a BYTES tensor as `bytes` (str elements encoded as UTF-8)."""
    return [_item_bytes(item) for item in array.reshape(-1)]


def _item_bytes(item: object) -> bytes:
    """One BYTES element as `bytes`: str encoded as UTF-8, else a bytes-like object."""
    if isinstance(item, str):
        return item.encode("utf-8")
    return bytes(cast("ReadableBuffer", item))
