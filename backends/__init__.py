"""Switchyard backends: the protocol shared with the gateway (protocol/), the model
repository and variant profiles, runtime adapters (runtimes/), the v2 worker (worker/),
the variant compiler (compile/) and the demo models (demo/).

Imports nothing from the gateway (lint-imports checks it); the heavy runtimes (TVM,
ONNX Runtime) only inside their adapters and builders.
"""

__version__ = "0.1.0"
