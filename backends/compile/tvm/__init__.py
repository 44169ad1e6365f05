"""Apache TVM (Relax) compilation: `targets` (what TVM compiles for, and which targets a CPU
runs), `toolchain` (TVM's compiler, loaded on first use), `importer` (the ONNX import),
`search` and `records` (MetaSchedule's tuning and the records it keeps), `build`
(`compile_onnx`), run in a fresh process by `child`, and `tuning` (the records committed
with the demo models)."""
