"""Protocol messages to and from the gateway's domain types: model metadata and
configuration, the request parameters routing reads, the response parameters the
gateway appends (as serialized bytes, never re-encoding a reply).

Generated protobuf stays at the edges: in the gateway, serving (this module, the
servicer, coalescer, pool, prober, transport), control (the admin API and its client),
loadtest and bench import it; routing and sim never do (import-linter checks it).
"""

from __future__ import annotations

import logging

from backends.protocol import codec
from backends.protocol.errors import InvalidInput, shown
from backends.protocol.parameters import (
    AFTER_WAITING_PARAMETER,
    DUE_PARAMETER,
    PROFILE_PARAMETER,
    REFUSE_LATE_PARAMETER,
    VariantProfile,
    checked_priority,
    checked_sla_ms,
    checked_timeout_us,
    parameter_number,
    read_profile_parameter,
)
from backends.protocol.tensors import TensorSpec, shape_problem
from gateway.routing.fleet import ModelInfo
from gateway.routing.router import RouteRequest
from protos import gateway_pb2
from protos import inference_pb2 as pb

log = logging.getLogger("switchyard.converters")

REMOTE_VARIANT = "remote"
MAX_CLASS_CHARS = 128
"""The longest `sla_class` a request may name (longer is INVALID_ARGUMENT before the
policies are looked at)."""
DEFAULT_VERSION = "1"


def model_info(metadata: pb.ModelMetadataResponse, config: pb.ModelConfig | None) -> ModelInfo:
    """A backend's model metadata (and configuration, when it has the extension)."""
    inputs = tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in metadata.inputs)
    outputs = tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in metadata.outputs)
    variant = REMOTE_VARIANT
    max_batch_size = 0
    variants: tuple[str, ...] = ()
    profile: tuple[VariantProfile, ...] = ()
    deadlines = False
    if config is not None:
        max_batch_size = config.max_batch_size
        params = config.parameters
        if "switchyard_variant" in params:
            variant = params["switchyard_variant"].string_value
        if "switchyard_variants" in params:
            variants = tuple(v for v in params["switchyard_variants"].string_value.split(",") if v)
        if PROFILE_PARAMETER in params:
            profile = parse_profile(params[PROFILE_PARAMETER].string_value)
        if "switchyard_queue" in params:
            deadlines = params["switchyard_queue"].string_value == "deadline"
    return ModelInfo(
        name=metadata.name,
        # Servers that list no versions (KServe) serve one; clients such as
        # perf_analyzer need a numeric version to match statistics to.
        versions=tuple(metadata.versions) or (DEFAULT_VERSION,),
        platform=metadata.platform,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch_size,
        variant=variant,
        variants=variants if variant in variants else (),
        profile=profile,
        deadlines=deadlines,
    )


def parse_profile(text: str) -> tuple[VariantProfile, ...]:
    """A worker's `switchyard_profile` (backends.protocol.parameters): what is wrong
    with it is logged and left out; text that is not a JSON list is no profile."""
    profiles, problems = read_profile_parameter(text)
    if problems:
        log.warning("backend profile %s: %s", PROFILE_PARAMETER, "; ".join(problems))
    return profiles


def metadata_message(info: ModelInfo) -> pb.ModelMetadataResponse:
    return codec.metadata_message(
        info.name, info.versions, info.platform, info.inputs, info.outputs
    )


def config_message(info: ModelInfo, variants: list[str]) -> pb.ModelConfig:
    """The model's configuration as the gateway serves it, in Triton's layout."""
    cfg = pb.ModelConfig(
        name=info.name,
        platform=info.platform,
        backend="switchyard",
        max_batch_size=info.max_batch_size,
    )
    codec.add_config_tensors(cfg, info.inputs, info.outputs)
    if info.max_batch_size > 0:
        cfg.dynamic_batching.SetInParent()
    cfg.parameters["switchyard_variants"].string_value = ",".join(variants)
    return cfg


def check_header(header: gateway_pb2.InferRequestHeader) -> None:
    """What the gateway checks of every request before routing it (the backend checks
    the rest against the model): at most MAX_TENSORS inputs and outputs, parameters maps
    within their bounds, and every input's shape well formed (no negative dimension,
    not too many elements). InvalidInput naming what was wrong. The names a problem
    would be reported under are made only for a map that has entries or a shape that
    is wrong: most requests have neither, and this runs on every one."""
    codec.check_request_size(len(header.inputs), len(header.outputs))
    if header.parameters:
        codec.parameter_values("request", header.parameters)
    for tensor in header.inputs:
        if tensor.parameters:
            codec.parameter_values(f"input {shown(tensor.name)}", tensor.parameters)
        problem = shape_problem(tensor.shape)
        if problem:
            raise InvalidInput(f"input {shown(tensor.name)}: {problem}")
    for out in header.outputs:
        if out.parameters:
            codec.parameter_values(f"output {shown(out.name)}", out.parameters)


def _value(param: pb.InferParameter) -> object:
    return codec.parameter_value(param)


def request_rows(header: gateway_pb2.InferRequestHeader, max_batch_size: int) -> int:
    """The batch a request carries (1 where the model has no batch dimension)."""
    if max_batch_size <= 0 or not header.inputs or not header.inputs[0].shape:
        return 1
    return max(1, header.inputs[0].shape[0])


def priority_param(header: gateway_pb2.InferRequestHeader) -> int:
    """Triton's `priority` request parameter: an integer in 0..MAX_PRIORITY, 0 (or
    absent) for the default level; anything else raises InvalidInput."""
    if "priority" not in header.parameters:
        return 0
    return checked_priority(parameter_number("priority", _value(header.parameters["priority"])))


def route_request(header: gateway_pb2.InferRequestHeader, max_batch_size: int) -> RouteRequest:
    """What routing needs from a request header; bad parameters raise InvalidInput
    naming the parameter and the value (backends.protocol.parameters: kind, finite,
    in range)."""
    params = header.parameters
    sla_ms = None
    if "sla_ms" in params:
        sla_ms = checked_sla_ms(_value(params["sla_ms"]))
    sla_class = None
    if "sla_class" in params:
        value = _value(params["sla_class"])
        if not isinstance(value, str):
            raise InvalidInput(
                f"request parameter 'sla_class' must be a string, got {shown(value)}"
            )
        if len(value) > MAX_CLASS_CHARS:
            raise InvalidInput(
                f"request parameter 'sla_class' is {len(value)} characters long, "
                f"no class is named with more than {MAX_CLASS_CHARS}: {shown(value)}"
            )
        sla_class = value
    priority = priority_param(header)
    return RouteRequest(
        model=header.model_name,
        batch_size=request_rows(header, max_batch_size),
        sla_ms=sla_ms,
        sla_class=sla_class,
        priority=priority,
    )


def timeout_param_s(header: gateway_pb2.InferRequestHeader) -> float | None:
    """Triton's `timeout` request parameter (microseconds, in (0, MAX_TIMEOUT_US]), in
    seconds."""
    if "timeout" not in header.parameters:
        return None
    return checked_timeout_us(_value(header.parameters["timeout"])) / 1e6


def response_parameters(params: dict[str, str]) -> bytes:
    """Serialized ModelInferResponse holding only `parameters`: appended to a backend's
    response bytes, protobuf merges it in (map entries later on the wire win)."""
    message = pb.ModelInferResponse()
    for key, value in params.items():
        message.parameters[key].string_param = value
    return message.SerializeToString()


def request_parameters(params: dict[str, str]) -> bytes:
    """Serialized ModelInferRequest holding only `parameters`, to append to a request."""
    message = pb.ModelInferRequest()
    for key, value in params.items():
        message.parameters[key].string_param = value
    return message.SerializeToString()


def due_parameter(due_us: int) -> bytes:
    """Serialized ModelInferRequest holding only `switchyard_due_us`, to append to a
    request for a backend that queues by deadline."""
    message = pb.ModelInferRequest()
    message.parameters[DUE_PARAMETER].int64_param = due_us
    return message.SerializeToString()


def after_waiting_parameter() -> bytes:
    """Serialized ModelInferRequest holding `switchyard_due_us` (0) and
    `switchyard_after_waiting` (true), to append to a latency probe of a busy Switchyard
    worker: it goes after every request waiting there (an older worker, which knows only
    the due time, runs it next)."""
    message = pb.ModelInferRequest()
    message.parameters[DUE_PARAMETER].int64_param = 0
    message.parameters[AFTER_WAITING_PARAMETER].bool_param = True
    return message.SerializeToString()


def refuse_late_parameter() -> bytes:
    """Serialized ModelInferRequest holding only `switchyard_refuse_late` (true), to
    append to a request for a worker that is to refuse it rather than answer it late."""
    message = pb.ModelInferRequest()
    message.parameters[REFUSE_LATE_PARAMETER].bool_param = True
    return message.SerializeToString()


def cost_parameter(cost_usd: float) -> bytes:
    """The `switchyard_cost_usd` response parameter, to append to a response."""
    return response_parameters({"switchyard_cost_usd": f"{cost_usd:.6g}"})


def stream_response(infer_response: bytes) -> bytes:
    """Wraps serialized ModelInferResponse bytes as a ModelStreamInferResponse."""
    return _field_bytes(2, infer_response)


def stream_error(message: str) -> bytes:
    return pb.ModelStreamInferResponse(error_message=message).SerializeToString()


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
