# A backend worker image: ONNX Runtime, and TVM's runtime without its compiler.
#
#   docker build -f deploy/backend.Dockerfile -t switchyard-backend:0.1.0 .
#   docker run --rm -p 9101:9101 -v "$PWD/models:/models:ro" --cpus 1 switchyard-backend:0.1.0 \
#       --repository /models --listen 0.0.0.0:9101 --threads 1
#
# The install is the one `python -m backends.runtimes.install runtime-only` documents (and
# tests/integration/test_tvm.py checks on a copy of the TVM package): `.[backend]`,
# then TVM's 260 MB compiler library removed. Workers load TVM libraries with the
# runtime only (TVM_USE_RUNTIME_LIB=1); `switchyard compile` belongs on a build host.
FROM python:3.11.13-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY backends backends
COPY gateway gateway
COPY protos protos
RUN python -m venv /opt/switchyard \
 && /opt/switchyard/bin/pip install --no-cache-dir '.[backend]' \
 && /opt/switchyard/bin/python -m backends.runtimes.install runtime-only

FROM python:3.11.13-slim-bookworm
COPY --from=build /opt/switchyard /opt/switchyard
ENV PATH=/opt/switchyard/bin:$PATH \
    TVM_USE_RUNTIME_LIB=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# nobody, by number: Kubernetes' runAsNonRoot checks a numeric user.
USER 65534:65534
EXPOSE 9101
ENTRYPOINT ["switchyard", "backend"]
