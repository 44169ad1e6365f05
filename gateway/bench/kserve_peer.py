"""The KServe peer for `make bench`: KServe 0.21's ModelServer serving ONNX models
with ONNX Runtime over the Open Inference Protocol gRPC API (or, with `--rest`, its
REST API), bound to 127.0.0.1.

Runs in its own virtualenv and process (`.bench/peers-venv`, made by
`gateway.bench`): it imports only kserve, onnxruntime and numpy, never this
project's `protos` package (two protobuf packages named `inference` clash in one
process) nor anything else from Switchyard. Run it by path:

    .bench/peers-venv/bin/python -I gateway/bench/kserve_peer.py \
        --model digits=models/digits/variants/ort-cpu-fp32/model.onnx [--rest]

Prints one JSON line `{"event": "listening", "address": "127.0.0.1:PORT", ...}` on
stdout once it serves, like `backends.worker.server`.

What differs from `ModelServer.start()`, and why:
- the gRPC server listens on 127.0.0.1 port 0 (read back) instead of `[::]:8081`:
  KServe 0.21 hard-codes `[::]` and takes only a port, so the start-up is
  `GRPCServer.start()` with that one line changed (same servicer, interceptors,
  thread pool, options and data plane);
- the REST (uvicorn) server is not started: it would bind 0.0.0.0:8080 and the
  gRPC benchmark only speaks gRPC;
- with `--rest`, the REST server is started instead of the gRPC one: KServe's own
  `RESTServer` (its FastAPI app, middleware, endpoints and uvicorn settings, one
  process), served on a socket bound to 127.0.0.1 port 0 (read back) where KServe
  would bind 0.0.0.0:8080; it runs, as KServe's single-process server does, on the
  loop `asyncio.run` makes (uvicorn's `--event_loop` choice applies only when
  uvicorn makes the loop itself);
- KServe parses `sys.argv` when `kserve` is imported, so argv is cleared first;
- SIGTERM ends the process at once (KServe's own handler did not stop it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from concurrent import futures
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=MODEL.onnx",
        help="a model to serve (repeat for more)",
    )
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument(
        "--kserve-logging",
        choices=("default", "quiet"),
        default="quiet",
        help="default: KServe's INFO log line per gRPC call and latency log; quiet: warnings only",
    )
    parser.add_argument(
        "--rest",
        action="store_true",
        help="serve KServe's REST (FastAPI/uvicorn) endpoint instead of its gRPC one",
    )
    return parser.parse_args(argv)


def main() -> int:
    options = parse_args()
    sys.argv = sys.argv[:1]  # kserve.model_server parses argv on import

    import numpy as np
    import onnxruntime as ort
    from grpc import aio
    from kserve import (  # type: ignore[import-not-found]
        InferOutput,
        InferRequest,
        InferResponse,
        Model,
        ModelServer,
    )
    from kserve.logging import (  # type: ignore[import-not-found]
        logger as kserve_logger,
    )
    from kserve.logging import trace_logger
    from kserve.protocol.grpc import (  # type: ignore[import-not-found]
        grpc_predict_v2_pb2_grpc,
    )
    from kserve.protocol.grpc.interceptors import (  # type: ignore[import-not-found]
        ExceptionToStatusInterceptor,
        LoggingInterceptor,
    )
    from kserve.protocol.grpc.server import GRPCServer  # type: ignore[import-not-found]
    from kserve.protocol.grpc.servicer import (  # type: ignore[import-not-found]
        InferenceServicer,
    )
    from kserve.protocol.rest.server import RESTServer  # type: ignore[import-not-found]
    from kserve.utils.numpy_codec import from_np_dtype  # type: ignore[import-not-found]

    ort_types = {
        "tensor(float)": "FP32",
        "tensor(double)": "FP64",
        "tensor(int64)": "INT64",
        "tensor(int32)": "INT32",
        "tensor(float16)": "FP16",
        "tensor(bool)": "BOOL",
        "tensor(uint8)": "UINT8",
        "tensor(int8)": "INT8",
        "tensor(string)": "BYTES",
    }

    def _describe(node: Any) -> dict[str, Any]:
        """ModelMetadata's tensor entry for an ONNX Runtime input or output."""
        shape = [d if isinstance(d, int) and d >= 0 else -1 for d in node.shape]
        return {"name": node.name, "datatype": ort_types.get(node.type, node.type), "shape": shape}

    class OnnxModel(Model):  # type: ignore[misc]
        """A custom KServe model: ONNX Runtime on the v2 InferRequest's tensors."""

        def __init__(self, name: str, path: str, threads: int) -> None:
            super().__init__(name)
            self.path = path
            self.threads = threads
            self.session: Any = None
            self.load()

        def load(self) -> bool:
            session_options = ort.SessionOptions()
            session_options.intra_op_num_threads = self.threads
            session_options.inter_op_num_threads = 1
            self.session = ort.InferenceSession(
                self.path, session_options, providers=["CPUExecutionProvider"]
            )
            self.output_names = [o.name for o in self.session.get_outputs()]
            self.ready = True
            return self.ready

        def get_input_types(self) -> list[dict[str, Any]]:
            return [_describe(node) for node in self.session.get_inputs()]

        def get_output_types(self) -> list[dict[str, Any]]:
            return [_describe(node) for node in self.session.get_outputs()]

        def predict(
            self,
            payload: InferRequest,
            headers: dict[str, str] | None = None,
            response_headers: dict[str, str] | None = None,
        ) -> InferResponse:
            feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
            results = self.session.run(self.output_names, feeds)
            outputs = []
            for name, value in zip(self.output_names, results, strict=True):
                value = np.ascontiguousarray(value)
                output = InferOutput(
                    name=name, shape=list(value.shape), datatype=from_np_dtype(value.dtype)
                )
                output.set_data_from_numpy(value, binary_data=True)
                outputs.append(output)
            return InferResponse(
                model_name=self.name,
                infer_outputs=outputs,
                response_id=payload.id,
                use_binary_outputs=True,
            )

    def _listening(address: str, protocol: str, http: object = None) -> None:
        event: dict[str, Any] = {
            "event": "listening",
            "address": address,
            "protocol": protocol,
            "pid": os.getpid(),
            "models": sorted(served),
            "loop": type(asyncio.get_running_loop()).__module__,
        }
        if http is not None:  # uvicorn's HTTP protocol class: httptools or h11
            event["http"] = getattr(http, "__name__", str(http))
        print(json.dumps(event), flush=True)

    class LoopbackGRPCServer(GRPCServer):  # type: ignore[misc]
        """KServe's GRPCServer.start(), listening on 127.0.0.1:0 instead of [::]:PORT."""

        async def start(self, max_workers: int) -> None:
            servicer = InferenceServicer(self._data_plane, self._model_repository_extension)
            self._server = aio.server(
                futures.ThreadPoolExecutor(max_workers=max_workers),
                interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
                options=[
                    (
                        "grpc.max_send_message_length",
                        self._kwargs.get("grpc_max_send_message_length"),
                    ),
                    (
                        "grpc.max_receive_message_length",
                        self._kwargs.get("grpc_max_receive_message_length"),
                    ),
                ],
            )
            grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
                servicer, self._server
            )
            port = self._server.add_insecure_port("127.0.0.1:0")
            if port == 0:
                raise OSError("cannot listen on 127.0.0.1:0")
            await self._server.start()
            _listening(f"127.0.0.1:{port}", "grpc")
            await self._server.wait_for_termination()

    class LoopbackRESTServer(RESTServer):  # type: ignore[misc]
        """KServe's RESTServer.start(), serving on 127.0.0.1:0 instead of 0.0.0.0:PORT."""

        async def start(self) -> None:
            self.create_application()
            # IPPROTO_TCP named: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose
            # proto says TCP, as the ones uvicorn binds itself do; with proto 0 each answer's
            # second write waited for the client's delayed ACK (about 40 ms).
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            listener.listen(2048)
            port = listener.getsockname()[1]
            self._server.config.load()
            _listening(f"127.0.0.1:{port}", "rest", self._server.config.http_protocol_class)
            await self._server.serve(sockets=[listener])

    class LoopbackModelServer(ModelServer):  # type: ignore[misc]
        """ModelServer.start() with one server (gRPC, or REST with `--rest`), on the
        loopback interface."""

        def start(self, models: list[Model]) -> None:
            from kserve.model_server import (  # type: ignore[import-not-found]
                FASTAPI_APP_IMPORT_STRING,
            )
            from kserve.model_server import args as kserve_args

            self._register_and_check_atleast_one_model_is_ready(models)
            if options.rest:
                self._rest_server = LoopbackRESTServer(
                    FASTAPI_APP_IMPORT_STRING,
                    self.dataplane,
                    self.model_repository_extension,
                    0,
                    access_log_format=self.access_log_format,
                    workers=1,
                    grace_period=self.grace_period,
                    event_loop=self.event_loop,
                    timeout_keep_alive=self.timeout_keep_alive,
                )
                self.servers.append(self._rest_server.start())
            else:
                self._grpc_server = LoopbackGRPCServer(
                    0,
                    self.dataplane,
                    self.model_repository_extension,
                    kwargs=vars(kserve_args),
                    grace_period=self.grace_period,
                )
                self.servers.append(self._grpc_server.start(self.max_threads))
            self.setup_event_loop()
            self.register_signal_handler()
            asyncio.run(self._serve())

        def register_signal_handler(self) -> None:
            # KServe's handler (signal.signal + asyncio.create_task) did not stop the server
            # on SIGTERM here: the benchmark ends the peer with SIGTERM's default action.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    served = dict(spec.split("=", 1) for spec in options.model)
    quiet = options.kserve_logging == "quiet"
    server = LoopbackModelServer(
        enable_grpc=not options.rest, enable_latency_logging=not quiet, grace_period=1
    )
    if quiet:
        kserve_logger.setLevel(logging.WARNING)
        trace_logger.setLevel(logging.WARNING)
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    server.start([OnnxModel(name, path, options.threads) for name, path in served.items()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
