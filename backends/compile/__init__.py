"""The variant compiler: ONNX rewrites (quantisation, fp16), the variants it builds and
checks, the profiler, CPU flags; tvm/ holds the TVM import, tuning records and build."""
