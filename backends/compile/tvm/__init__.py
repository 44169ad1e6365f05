"""Apache TVM (Relax) compilation: targets, the ONNX import, MetaSchedule tuning records
and the build, run in a child process."""
