"""The probe port: liveness and readiness answered by threads of their own, so a
Kubernetes probe is answered at once however busy the data plane's event loop is.

A flood of inference requests keeps the gateway's event loop busy (each request is
parsed, routed and forwarded there); a readiness check on the inference port waits
its turn behind them, and a probe that times out takes a healthy gateway out of
service just when it is loaded. This port is a separate gRPC server run by a small
thread pool (not the event loop), serving `grpc.health.v1` and the Open Inference
Protocol's ServerLive and ServerReady, from a readiness flag the event loop sets
whenever the fleet's health changes (health's `liveness` service is SERVING throughout).
Its answers take a thread and the interpreter lock for a moment, never a turn of the
event loop.

The gRPC edge: imports grpc, the health service and generated stubs; it reads no
fleet state of its own (the flag is set from the event loop).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc

SERVICE = "inference.GRPCInferenceService"
LIVENESS_SERVICE = "liveness"
"""A grpc.health.v1 service name answered SERVING for as long as the port serves, whatever
the readiness: the name for a Kubernetes liveness probe (`grpc: {port: ..., service:
liveness}`). A gateway whose backends are all down is not ready, but restarting it would
not bring them back."""


class _Readiness(pb_grpc.GRPCInferenceServiceServicer):
    """ServerLive and ServerReady only; every other method is UNIMPLEMENTED here."""

    def __init__(self, ready: threading.Event) -> None:
        self._ready = ready

    def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready.is_set())


class ProbePort:
    """Health and readiness on `address`, served by two threads."""

    def __init__(
        self,
        address: str,
        credentials: grpc.ServerCredentials | None = None,
        reuse_port: bool = False,
    ) -> None:
        """`reuse_port`: SO_REUSEPORT, shared with the other processes of a
        `--processes` group."""
        self._ready = threading.Event()
        self._health = health.HealthServicer()
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="probes"),
            options=[("grpc.so_reuseport", 1 if reuse_port else 0)],
            maximum_concurrent_rpcs=64,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Readiness(self._ready), self._server)
        if credentials is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, credentials)
        self._health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self.set_ready(False)

    def start(self) -> None:
        self._server.start()

    def set_ready(self, ready: bool) -> None:
        """What the probes answer from now on (the gateway's readiness)."""
        if ready:
            self._ready.set()
        else:
            self._ready.clear()
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE):
            self._health.set(service, status)

    def stop(self) -> None:
        self._server.stop(grace=0.5).wait()
