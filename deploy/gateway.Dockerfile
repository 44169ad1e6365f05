# The gateway's image: `switchyard serve` and the admin CLI, without TVM (the gateway
# compiles and runs no variant: `.` installs no extra, so no apache-tvm).
#
#   docker build -f deploy/gateway.Dockerfile -t switchyard-gateway:0.1.0 .
#   docker run --rm -p 8001:8001 -v "$PWD/fleet.yaml:/etc/switchyard/fleet.yaml:ro" \
#       switchyard-gateway:0.1.0
#
# The Kubernetes manifests (deploy/kubernetes) run it as user 65534 on a read-only root
# filesystem; what it writes (a state file, temporary files) goes to mounted volumes.
FROM python:3.11.13-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY backends backends
COPY protos protos
RUN python -m venv /opt/switchyard \
 && /opt/switchyard/bin/pip install --no-cache-dir .

FROM python:3.11.13-slim-bookworm
COPY --from=build /opt/switchyard /opt/switchyard
ENV PATH=/opt/switchyard/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# nobody, by number: Kubernetes' runAsNonRoot checks a numeric user.
USER 65534:65534
# REST, gRPC, metrics, probes (gateway.http, listen, metrics, probes).
EXPOSE 8000 8001 8002 8004
ENTRYPOINT ["switchyard", "serve"]
CMD ["--config", "/etc/switchyard/fleet.yaml"]
