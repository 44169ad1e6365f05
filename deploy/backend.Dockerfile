# A backend worker image: ONNX Runtime, and TVM's runtime without its compiler.
#
#   docker build -f deploy/backend.Dockerfile -t switchyard-backend:0.1.0 .
#   docker run --rm -p 9101:9101 -v "$PWD/models:/models:ro" --cpus 1 switchyard-backend:0.1.0 \
#       --repository /models --listen 0.0.0.0:9101 --threads 1
#
# With `--build-arg RUNTIME=cuda`, the GPU worker image (switchyard-backend-gpu), which also
# runs TVM's CUDA variants (`tvm-cuda-*`): the `cuda` extra adds cuda-bindings and CUDA
# 13's NVRTC, runtime library, headers and CCCL as NVIDIA's wheels carry them, under
# site-packages/nvidia/cu13. No CUDA base image: the driver (libcuda.so.1) comes from the
# node, put in the container by NVIDIA's container toolkit.
#
#   docker build -f deploy/backend.Dockerfile --build-arg RUNTIME=cuda \
#       -t switchyard-backend-gpu:0.1.0 .
#   docker run --rm --gpus 1 -p 9101:9101 -v "$PWD/models:/models:ro" switchyard-backend-gpu:0.1.0 \
#       --repository /models --listen 0.0.0.0:9101 --threads 4 --hardware-class gpu-cuda-h100
#
# The install is the one `python -m backends.runtimes.install runtime-only` documents (and
# tests/integration/test_tvm.py checks on a copy of the TVM package): `.[backend]`,
# then TVM's 260 MB compiler library removed. Workers load TVM libraries with the
# runtime only (TVM_USE_RUNTIME_LIB=1); `switchyard compile` belongs on a build host.
# ONNX Runtime's CUDA provider (onnxruntime-gpu) is not in either image: the worker does
# not run `ort-cuda-*` variants yet.
ARG RUNTIME=cpu

FROM python:3.11.13-slim-bookworm AS build-cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY backends backends
COPY gateway gateway
COPY protos protos
RUN python -m venv /opt/switchyard \
 && /opt/switchyard/bin/pip install --no-cache-dir '.[backend]' \
 && /opt/switchyard/bin/python -m backends.runtimes.install runtime-only

FROM build-cpu AS build-cuda
RUN /opt/switchyard/bin/pip install --no-cache-dir '.[backend,cuda]' \
 && /opt/switchyard/bin/python -m backends.runtimes.install runtime-only

FROM build-${RUNTIME} AS build

FROM python:3.11.13-slim-bookworm AS runtime-cpu
COPY --from=build /opt/switchyard /opt/switchyard
ENV PATH=/opt/switchyard/bin:$PATH \
    TVM_USE_RUNTIME_LIB=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# TVM finds CUDA's headers under CUDA_PATH (NVRTC compiles a CUDA variant's kernels as
# it loads), CCCL's (<cuda/std/...>) through the extra NVRTC option, and its CUDA
# runtime library (libtvm_runtime_cuda) finds libcudart.so.13 on LD_LIBRARY_PATH;
# cuda-bindings finds libnvrtc in the wheel by itself.
FROM runtime-cpu AS runtime-cuda
ENV CUDA_PATH=/opt/switchyard/lib/python3.11/site-packages/nvidia/cu13 \
    LD_LIBRARY_PATH=/opt/switchyard/lib/python3.11/site-packages/nvidia/cu13/lib \
    TVM_CUDA_NVRTC_EXTRA_OPTS=-I/opt/switchyard/lib/python3.11/site-packages/nvidia/cu13/include/cccl \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM runtime-${RUNTIME}
# nobody, by number: Kubernetes' runAsNonRoot checks a numeric user.
USER 65534:65534
EXPOSE 9101
ENTRYPOINT ["switchyard", "backend"]
