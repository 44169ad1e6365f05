"""The runtimes a variant runs on: the adapter interface, ONNX Runtime, Apache TVM,
the loader that picks one per variant, and the runtime-only TVM install. Heavy imports
(onnxruntime, tvm) stay inside their adapters."""
