"""The backend worker: serves a model repository over the Open Inference Protocol.

`switchyard backend --repository DIR --listen HOST:PORT --threads N
--hardware-class NAME [--models ...]` loads every servable variant of each model
(ONNX Runtime or Apache TVM; the fastest by its profile here is the default, a
request may name another with `switchyard_variant`), verifies each artifact's
sha256 against its manifest, and answers the same gRPC API as the gateway, so the
gateway can route to it or to any other v2 server alike. Inference runs in worker
threads behind a dynamic batcher, never on the event loop. On start it prints one
JSON line,
`{"event": "listening", "address": ..., "pid": ...}`, for supervisors.

A protocol edge: grpc and generated protobuf are imported here and in backends.protocol;
nothing from the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from backends import __version__
from backends.compile.cpu import cpu_flags, missing_flags
from backends.compile.variants import ORT_FP32
from backends.process import PARENT_PID_ENV, die_with_parent, use_uvloop
from backends.profiles import (
    profile_entry,
    profile_row_fraction,
    profiled_p50_ms,
    read_profile,
)
from backends.protocol.codec import (
    Signature,
    add_config_tensors,
    decode_request,
    encode_response,
    metadata_message,
)
from backends.protocol.errors import Internal, InvalidInput, ModelNotFound, SwitchyardError
from backends.protocol.parameters import (
    DUE_PARAMETER,
    PROFILE_PARAMETER,
    VariantProfile,
    checked_due_us,
    checked_priority,
    profile_parameter,
)
from backends.protocol.status import aborts_with_status
from backends.repository import ManifestError, ModelRepository, Variant
from backends.runtimes.base import Array, RuntimeAdapter
from backends.runtimes.loader import load_adapter
from backends.worker.batching import Batcher, RunFn
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc

log = logging.getLogger("switchyard.backend")

MODEL_VERSION = "1"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """How a worker runs."""

    repository: Path
    threads: int = 1
    """Threads for inference: the runtime's intra-op pool, so the worker stands for an
    instance with this many cores."""
    hardware_class: str = "cpu"
    models: tuple[str, ...] = ()
    """Models to serve; empty: every model in the repository."""
    emulate_latency_ms: float = 0.0
    """Added per row of every execution, standing for slower hardware (reported in metadata)."""
    max_queue_delay_us: int = 0
    """How long a batch may wait for more requests; 0 batches only what is already queued."""
    max_batch_rows: int = 0
    """Most rows dynamic batching merges into one execution (1: no merging); 0: the
    variant's max_batch_size."""
    batching: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    """Per model: (max_batch_rows, max_queue_delay_us) in place of the two above."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    precisions: tuple[str, ...] = ()
    """Precisions this worker may serve (fp32, fp16, int8); empty: any whose accuracy
    check passed. Variants that failed their check are never served."""


def model_batching(settings: WorkerSettings, model: str) -> tuple[int, int]:
    """(max_batch_rows, max_queue_delay_us) for `model`: its own, else the worker's."""
    return settings.batching.get(model, (settings.max_batch_rows, settings.max_queue_delay_us))


def parse_batching(items: Sequence[str]) -> dict[str, tuple[int, int]]:
    """`MODEL=ROWS:DELAY_US` items (`--batching resnet=8:2000`); ValueError naming a bad one."""
    out = {}
    for item in items:
        model, _, spec = item.partition("=")
        rows, _, delay = spec.partition(":")
        if not model or not rows.isdigit() or not delay.isdigit():
            raise ValueError(
                f"--batching {item!r}: expected MODEL=ROWS:DELAY_US, e.g. resnet=8:2000"
            )
        out[model] = (int(rows), int(delay))
    return out


@dataclass(frozen=True, slots=True)
class LoadedVariant:
    """One variant loaded in this worker, behind its own batcher."""

    variant: Variant
    adapter: RuntimeAdapter
    batcher: Batcher

    @property
    def name(self) -> str:
        return self.variant.name


class ServedModel:
    """One model as this worker serves it: its servable variants, one the default."""

    def __init__(
        self, loaded: dict[str, LoadedVariant], default: str, settings: WorkerSettings
    ) -> None:
        first = loaded[default]
        self.name = first.variant.model
        self.variants = loaded
        self.default = default
        adapter = first.adapter
        self.signature = Signature(
            adapter.inputs, adapter.outputs, first.variant.manifest.max_batch_size
        )
        self.output_specs = {s.name: s for s in adapter.outputs}
        self.settings = settings
        self.success = [0, 0]  # count, ns
        self.decode_ns = 0
        self.encode_ns = 0
        self.fail = [0, 0]
        self.last_inference_ms = 0

    def check_version(self, version: str) -> None:
        if version not in ("", MODEL_VERSION):
            raise ModelNotFound(
                f"model {self.name!r} has no version {version!r} (versions: {MODEL_VERSION})"
            )

    def choose(self, requested: object) -> LoadedVariant:
        """The variant a request names (`switchyard_variant`), else the default."""
        if requested is None:
            return self.variants[self.default]
        chosen = self.variants.get(str(requested))
        if chosen is None:
            raise ModelNotFound(
                f"model {self.name!r} has no variant {requested!r} on this backend "
                f"(serves: {', '.join(sorted(self.variants))})"
            )
        return chosen

    def metadata(self) -> pb.ModelMetadataResponse:
        return metadata_message(
            self.name,
            [MODEL_VERSION],
            self.platform,
            self.signature.inputs,
            self.signature.outputs,
        )

    @property
    def platform(self) -> str:
        runtime = self.variants[self.default].variant.manifest.runtime
        return "onnxruntime_onnx" if runtime == "onnxruntime" else runtime

    def config(self) -> pb.ModelConfig:
        batch = self.signature.max_batch_size
        manifest = self.variants[self.default].variant.manifest
        cfg = pb.ModelConfig(
            name=self.name, platform=self.platform, backend=manifest.runtime, max_batch_size=batch
        )
        add_config_tensors(cfg, self.signature.inputs, self.signature.outputs)
        cfg.instance_group.add(name=f"{self.name}_0", count=1, kind=pb.ModelInstanceGroup.KIND_CPU)
        if batch > 0:
            _, delay_us = model_batching(self.settings, self.name)
            cfg.dynamic_batching.max_queue_delay_microseconds = delay_us
        params = {
            "switchyard_variant": manifest.variant,
            "switchyard_variants": ",".join(sorted(self.variants)),
            "switchyard_runtime": f"{manifest.runtime} {manifest.runtime_version}",
            "switchyard_target": manifest.target,
            "switchyard_precision": manifest.precision,
            "switchyard_hardware_class": self.settings.hardware_class,
            "switchyard_threads": str(self.settings.threads),
            "switchyard_emulated_latency_ms": str(self.settings.emulate_latency_ms),
            # Its queue takes requests by priority, then earliest deadline first, the
            # deadline given by `switchyard_due_us` (the gateway then sends it).
            "switchyard_queue": "deadline",
        }
        profile = self.profile()
        if profile:
            params[PROFILE_PARAMETER] = profile
        for key, value in params.items():
            cfg.parameters[key].string_value = value
        return cfg

    def profile(self) -> str:
        """The `switchyard_profile` parameter (backends.protocol.parameters): each
        profiled variant's p50 and p99 at batch 1 on this worker's hardware class and
        threads, and its row fraction (what each extra row of a batch adds, as a
        fraction of one row's time): the gateway's latency prior. Figures are adjusted
        for this worker's emulated delay; empty when no variant is profiled here."""
        settings = self.settings
        profiles = []
        for name, loaded in sorted(self.variants.items()):
            profile = read_profile(loaded.variant)
            if profile is None:
                continue
            entry = profile_entry(profile, settings.hardware_class, settings.threads)
            if entry is None:
                continue
            shift = settings.emulate_latency_ms - entry.emulated_latency_ms
            rows = profile_row_fraction(profile, settings.hardware_class, settings.threads, shift)
            profiles.append(VariantProfile(name, entry.p50_ms + shift, entry.p99_ms + shift, rows))
        return profile_parameter(profiles) if profiles else ""

    def statistics(self) -> pb.ModelStatistics:
        executions = inferences = queue_ns = compute_ns = 0
        by_size: dict[int, list[int]] = {}
        for loaded in self.variants.values():
            stats = loaded.batcher.stats
            executions += stats.executions
            inferences += stats.inferences
            queue_ns += stats.queue_ns
            compute_ns += stats.compute_ns
            for size, (count, ns) in stats.by_size.items():
                total = by_size.setdefault(size, [0, 0])
                total[0] += count
                total[1] += ns
        reply = pb.ModelStatistics(
            name=self.name,
            version=MODEL_VERSION,
            last_inference=self.last_inference_ms,
            inference_count=inferences,
            execution_count=executions,
        )
        inf = reply.inference_stats
        inf.success.count, inf.success.ns = self.success
        inf.fail.count, inf.fail.ns = self.fail
        inf.queue.count, inf.queue.ns = self.success[0], queue_ns
        # Equal counts for the three compute phases, as Triton reports (perf_analyzer checks).
        inf.compute_input.count, inf.compute_input.ns = executions, self.decode_ns
        inf.compute_infer.count, inf.compute_infer.ns = executions, compute_ns
        inf.compute_output.count, inf.compute_output.ns = executions, self.encode_ns
        for size, (count, ns) in sorted(by_size.items()):
            batch = reply.batch_stats.add(batch_size=size)
            batch.compute_infer.count, batch.compute_infer.ns = count, ns
        return reply

    def batchers(self) -> list[Batcher]:
        return [loaded.batcher for loaded in self.variants.values()]


def servable(variant: Variant, settings: WorkerSettings, flags: frozenset[str]) -> str | None:
    """Why this worker must not serve `variant`, or None when it may."""
    manifest = variant.manifest
    accuracy = manifest.accuracy
    if accuracy is not None and not accuracy.passed:
        missed = []
        if accuracy.max_abs_diff > accuracy.tolerance_max_abs_diff:
            missed.append(
                f"max |diff| {accuracy.max_abs_diff:.3g} > {accuracy.tolerance_max_abs_diff:g}"
            )
        top1, floor = accuracy.top1_agreement, accuracy.min_top1_agreement
        if top1 is not None and floor is not None and top1 < floor:
            missed.append(f"top-1 agreement {top1:.1%} < {floor:.1%}")
        return f"failed its accuracy check ({'; '.join(missed) or 'marked failed'})"
    if accuracy is None and manifest.precision != "fp32":
        return "was never checked against the fp32 reference"
    if settings.precisions and manifest.precision not in settings.precisions:
        return f"precision {manifest.precision} is not allowed here"
    if manifest.device != "cpu":
        return f"needs a {manifest.device} device"
    missing = missing_flags(manifest.required_cpu_flags, flags)
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    try:
        variant.verify()
    except ManifestError as exc:
        return str(exc)
    return None


def default_variant(loaded: dict[str, LoadedVariant], settings: WorkerSettings) -> str:
    """The fastest variant by its profile on this hardware class and thread count;
    without profiles, ONNX Runtime fp32. Untuned TVM is never the default."""
    candidates = {
        name: lv
        for name, lv in loaded.items()
        if lv.variant.manifest.tuning is None or lv.variant.manifest.tuning.tuned
    } or loaded
    timed = {
        name: p50
        for name, lv in candidates.items()
        if (p50 := profiled_p50_ms(lv.variant, settings.hardware_class, settings.threads))
        is not None
    }
    if timed:
        return min(timed, key=lambda n: (timed[n], n))
    if ORT_FP32 in candidates:
        return ORT_FP32
    return sorted(candidates)[0]


def load_models(settings: WorkerSettings, executor: ThreadPoolExecutor) -> dict[str, ServedModel]:
    """Loads every servable variant of each model; what is refused is logged with why."""
    repository = ModelRepository(settings.repository)
    names = list(settings.models) or repository.models()
    flags = cpu_flags()
    served: dict[str, ServedModel] = {}
    for name in names:
        try:
            variants = repository.variants(name)
        except ManifestError as exc:
            log.error("model %s not served: %s", name, exc)
            continue
        loaded: dict[str, LoadedVariant] = {}
        for variant in variants:
            reason = servable(variant, settings, flags)
            if reason is None:
                try:
                    adapter = load_adapter(variant, settings.threads)
                except Exception as exc:  # a runtime missing here, a broken artifact
                    reason = f"does not load: {exc}"
            if reason is not None:
                log.warning("model %s: variant %s not served: %s", name, variant.name, reason)
                continue
            run: RunFn = adapter.run
            if settings.emulate_latency_ms > 0:
                run = _with_delay(adapter.run, settings.emulate_latency_ms / 1000.0)
            rows, delay_us = model_batching(settings, name)
            batcher = Batcher(
                run,
                executor,
                [s.name for s in adapter.outputs],
                _batch_rows(variant.manifest.max_batch_size, rows),
                delay_us / 1e6,
            )
            loaded[variant.name] = LoadedVariant(variant, adapter, batcher)
        if not loaded:
            log.error("model %s not served: no servable variant in %s", name, settings.repository)
            continue
        default = default_variant(loaded, settings)
        served[name] = ServedModel(loaded, default, settings)
        log.info("serving %s as %s (variants: %s)", name, default, ", ".join(sorted(loaded)))
    return served


def _batch_rows(max_batch_size: int, cap: int) -> int:
    """The rows dynamic batching may merge: the variant's limit, capped by the worker's."""
    if max_batch_size <= 0 or cap <= 0:
        return max_batch_size
    return min(max_batch_size, cap)


def _with_delay(run: RunFn, delay_s: float) -> RunFn:
    """`run`, plus `delay_s` per row of the batch: emulated hardware gains nothing
    from batching, so an emulated backend's capacity is what its delay says."""

    def delayed(inputs: Mapping[str, Array], outputs: Sequence[str]) -> list[Array]:
        first = next(iter(inputs.values()), None)
        rows = first.shape[0] if first is not None and first.ndim else 1
        time.sleep(delay_s * max(1, rows))  # in a worker thread: occupies it as compute would
        return run(inputs, outputs)

    return delayed


@aborts_with_status
class WorkerServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The v2 API over the served models (a SwitchyardError raised by an RPC is the
    caller's status: backends.protocol.status)."""

    def __init__(self, models: dict[str, ServedModel], settings: WorkerSettings) -> None:
        self.models = models
        self.settings = settings

    def _model(self, name: str, version: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(f"unknown model {name!r}")
        model.check_version(version)
        return model

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self.models))

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        model = self.models.get(request.name)
        ready = model is not None and request.version in ("", MODEL_VERSION)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="switchyard-backend",
            version=__version__,
            extensions=["model_configuration", "statistics", "model_repository"],
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return self._model(request.name, request.version).metadata()

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self._model(request.name, request.version).config())

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            chosen = [self._model(request.name, request.version)]
        else:
            chosen = [self.models[name] for name in sorted(self.models)]
        return pb.ModelStatisticsResponse(model_stats=[m.statistics() for m in chosen])

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        reply = pb.RepositoryIndexResponse()
        for name in sorted(self.models):
            reply.models.add(name=name, version=MODEL_VERSION, state="READY")
        return reply

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self._infer(request)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            try:
                response = await self._infer(request)
            except SwitchyardError as exc:
                yield pb.ModelStreamInferResponse(error_message=str(exc))
            else:
                yield pb.ModelStreamInferResponse(infer_response=response)

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """Runs one request; a SwitchyardError is counted as a failure and raised."""
        start_ns = time.perf_counter_ns()
        model: ServedModel | None = None
        try:
            model = self._model(request.model_name, request.model_version)
            decoded = decode_request(request, model.signature)
            model.decode_ns += time.perf_counter_ns() - start_ns
            chosen = model.choose(decoded.parameters.get("switchyard_variant"))
            priority = checked_priority(decoded.parameters.get("priority"))
            due_us = checked_due_us(decoded.parameters.get(DUE_PARAMETER))
            try:
                outputs = await chosen.batcher.infer(
                    decoded.inputs, decoded.batch_size, priority, due_us
                )
            except SwitchyardError:
                raise
            except Exception as exc:  # a runtime rejected what validation let through
                raise _runtime_error(model.name, exc) from exc
            computed_ns = time.perf_counter_ns()
            response = pb.ModelInferResponse(
                model_name=model.name, model_version=MODEL_VERSION, id=decoded.id
            )
            encode_response(
                response,
                model.output_specs,
                decoded.outputs,
                [outputs[name] for name in decoded.outputs],
                decoded.raw_output,
            )
            response.parameters["switchyard_variant"].string_param = chosen.name
            done_ns = time.perf_counter_ns()
            model.encode_ns += done_ns - computed_ns
            elapsed = done_ns - start_ns
            model.success[0] += 1
            model.success[1] += elapsed
            model.last_inference_ms = int(time.time() * 1000)
            return response
        except SwitchyardError:
            if model is not None:
                model.fail[0] += 1
                model.fail[1] += time.perf_counter_ns() - start_ns
            raise


def _runtime_error(model: str, exc: Exception) -> SwitchyardError:
    kind = type(exc).__name__
    if kind in ("InvalidArgument", "InvalidGraph"):
        return InvalidInput(f"model {model!r} rejected the input: {exc}")
    log.exception("model %s failed", model)
    return Internal(f"model {model!r} failed: {kind}: {exc}")


async def start_worker(
    settings: WorkerSettings, listen: str
) -> tuple[grpc.aio.Server, int, dict[str, ServedModel], ThreadPoolExecutor]:
    """Loads the models and starts serving on `listen`; returns the bound port."""
    executor = ThreadPoolExecutor(max_workers=max(2, settings.threads), thread_name_prefix="infer")
    models = await asyncio.get_running_loop().run_in_executor(None, load_models, settings, executor)
    for model in models.values():
        for batcher in model.batchers():
            batcher.start()
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(WorkerServicer(models, settings), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    await health_servicer.set("", serving)
    await health_servicer.set("inference.GRPCInferenceService", serving)
    for name in models:
        await health_servicer.set(name, serving)
    return server, port, models, executor


async def serve(settings: WorkerSettings, listen: str) -> None:
    server, port, models, executor = await start_worker(settings, listen)
    host = listen.rsplit(":", 1)[0]
    print(
        json.dumps(
            {
                "event": "listening",
                "address": f"{host}:{port}",
                "pid": os.getpid(),
                "models": sorted(models),
            }
        ),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=2.0)
    for model in models.values():
        for batcher in model.batchers():
            await batcher.stop()
    executor.shutdown(wait=False, cancel_futures=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", type=Path, required=True, help="model repository directory")
    parser.add_argument("--listen", default="127.0.0.1:9101", help="HOST:PORT (port 0: any free)")
    parser.add_argument(
        "--threads", type=int, default=1, help="inference threads (the instance size)"
    )
    parser.add_argument("--hardware-class", default="cpu", help="what this worker stands for")
    parser.add_argument("--models", nargs="*", default=[], help="models to serve (default: all)")
    parser.add_argument(
        "--emulate-latency-ms",
        type=float,
        default=0.0,
        help="added service time per row, standing for slower hardware",
    )
    parser.add_argument(
        "--max-batch-rows",
        type=int,
        default=0,
        help="dynamic batching: most rows merged into one execution (1: none; "
        "default: the variant's max_batch_size)",
    )
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=0,
        help="dynamic batching: how long a batch may wait for more requests",
    )
    parser.add_argument(
        "--batching",
        nargs="*",
        default=[],
        metavar="MODEL=ROWS:DELAY_US",
        help="dynamic batching for one model: most rows per execution and the longest "
        "wait for more (e.g. resnet=8:2000), in place of the two options above",
    )
    parser.add_argument(
        "--cpus",
        type=int,
        nargs="*",
        default=[],
        help="pin the worker to these CPU numbers (default: no pinning)",
    )
    parser.add_argument(
        "--precisions",
        nargs="*",
        default=[],
        help="precisions allowed (fp32 fp16 int8); default: any that passed its accuracy check",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest request or response accepted",
    )


def run(args: argparse.Namespace) -> int:
    # A worker the gateway launched ends when the gateway does: armed here, first
    # thing, rather than between fork and exec in the threaded gateway.
    parent = os.environ.get(PARENT_PID_ENV, "")
    if parent.isdigit():
        die_with_parent(int(parent))
    if args.threads < 1:
        print("--threads must be at least 1", file=sys.stderr)
        return 2
    try:
        batching = parse_batching(args.batching)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    settings = WorkerSettings(
        repository=args.repository,
        threads=args.threads,
        hardware_class=args.hardware_class,
        models=tuple(args.models),
        emulate_latency_ms=args.emulate_latency_ms,
        max_queue_delay_us=args.max_queue_delay_us,
        max_batch_rows=max(0, args.max_batch_rows),
        batching=batching,
        max_message_bytes=args.max_message_bytes,
        precisions=tuple(args.precisions),
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.cpus:
        try:
            os.sched_setaffinity(0, set(args.cpus))
        except (OSError, ValueError) as exc:
            print(f"cannot pin to CPUs {args.cpus}: {exc}", file=sys.stderr)
            return 2
    prepare_runtimes(settings.threads)
    use_uvloop()
    asyncio.run(serve(settings, args.listen))
    return 0


def prepare_runtimes(threads: int) -> None:
    """Before any runtime loads in this worker process: TVM's runtime library only (not
    its compiler), with exactly `threads` threads."""
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    os.environ["TVM_NUM_THREADS"] = str(threads)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="switchyard backend", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
