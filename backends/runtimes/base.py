"""The interface every runtime adapter implements (ONNX Runtime and Apache TVM).

An adapter owns one loaded variant and runs it on numpy arrays. It is called
from worker threads, never on the event loop, and must be safe to call from
several threads at once.

Imports numpy only: no runtime (each adapter imports its own), no grpc, no protobuf,
nothing from the gateway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from backends.protocol.tensors import TensorSpec

Array = npt.NDArray[np.generic]


class RuntimeAdapter(Protocol):
    """A loaded variant."""

    @property
    def inputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    def run(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> list[Array]:
        """Runs the variant; returns the named outputs in the order asked."""
        ...
