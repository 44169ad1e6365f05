"""The data-plane fuzzer: malformed ModelInferRequests, generated with hypothesis,
interleaved with good ones and sent through a live gateway in front of a real worker.

Every answer to a malformed request must be a clean status (CLEAN: OK,
INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, OUT_OF_RANGE, FAILED_PRECONDITION,
UNAVAILABLE; DEADLINE_EXCEEDED only for a request that gives a `timeout` of its own),
never INTERNAL or UNKNOWN; every good request must be served OK; the processes must
stay up. What is generated: wrong and garbage datatypes, shapes against their data,
negative, huge and overflowing dimensions, absurd ranks, raw_input_contents of the
wrong count or size, typed contents in the wrong field, BYTES length prefixes past the
end, routing and Triton parameters of every kind (NaN, infinities, huge integers,
strings that are not numbers), unknown models, versions, variants, inputs and
outputs, missing and duplicate inputs, duplicate and numerous outputs, parameter maps
past their bounds, names of kilobytes, bodies that are not protobuf at all.

    python -m gateway.bench.fuzz --requests N [--out BENCHMARKS.md] [--target HOST:PORT]

starts `switchyard serve` with one launched worker (digits and echo from the
repository) unless given a target, sends N requests (in concurrent batches, each a
hypothesis example), prints the table (requests, crashes, unclean statuses by code,
good requests served) and writes its section of BENCHMARKS.md. The integration test
(tests/integration/serving/test_fuzz.py) runs `fuzz` against an in-process gateway.

Imports hypothesis (a development dependency: the fuzzer is a test tool), grpc and the
generated protobuf of the protocol; nothing of the gateway's internals.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from backends.protocol.tensors import ELEMENT_BYTES, TensorSpec
from gateway.bench.harness import BenchError, Child, serve_command
from gateway.bench.report import publish
from gateway.report.markdown import markdown_table
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
BEGIN = "<!-- fuzz: written by `python -m gateway.bench.fuzz` -->"
END = "<!-- /fuzz -->"
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
MODELS = ("digits", "echo")
"""The models the launched worker serves: one of every datatype (echo), one real (digits)."""
CALL_TIMEOUT_S = 30.0
"""The client's deadline for each call: a call that runs past it is counted as hung."""
STARTUP_TIMEOUT_S = 90.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

CLEAN = frozenset(
    {
        "OK",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "RESOURCE_EXHAUSTED",
        "OUT_OF_RANGE",
        "FAILED_PRECONDITION",
        "UNAVAILABLE",
    }
)
"""The statuses a malformed request may get."""

DATATYPES = (*ELEMENT_BYTES, "BYTES")

_BAD_TENSOR = b"\x0a\x05input\x12\x04FP32\x1a\x02\x01\x40\x2a\x05\x32\x03abc"
BAD_CONTENTS_INPUT = b"\x2a" + bytes([len(_BAD_TENSOR)]) + _BAD_TENSOR
"""ModelInferRequest field 5 (an input): name, datatype and shape that parse, and
contents whose fp32_contents hold 3 bytes (packed floats come in 4s): a header parse,
which skips contents, takes it; a full parse does not."""


@dataclass(frozen=True, slots=True)
class Model:
    """A model as the target describes it."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int


@dataclass(frozen=True, slots=True)
class Case:
    """One request to send: what was done to it, its bytes, whether it is a good one."""

    what: str
    payload: bytes
    good: bool = False
    timed: bool = False
    """It gives a `timeout` or a due time of its own: DEADLINE_EXCEEDED is clean."""


@dataclass
class Tally:
    """What came back."""

    requests: int = 0
    good: int = 0
    good_ok: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    unclean: Counter[str] = field(default_factory=Counter)
    """Malformed requests answered with a status outside CLEAN, by status."""
    good_failed: Counter[str] = field(default_factory=Counter)
    """Good requests answered with anything but OK, by status."""
    examples: list[str] = field(default_factory=list)
    """The first few unclean answers: what was sent, what came back."""
    crashes: int = 0
    """Server processes found gone after the run (set by the caller that knows them)."""
    wall_s: float = 0.0

    @property
    def clean(self) -> bool:
        return not self.unclean and not self.good_failed and self.good_ok == self.good

    def record(self, case: Case, code: str, details: str) -> None:
        self.requests += 1
        self.codes[code] += 1
        if case.good:
            self.good += 1
            if code == "OK":
                self.good_ok += 1
                return
            self.good_failed[code] += 1
        elif code in CLEAN or (code == "DEADLINE_EXCEEDED" and case.timed):
            return
        else:
            self.unclean[code] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{case.what}: {code}: {details[:300]}")


# ---- what the target serves -------------------------------------------------------


def describe_target(stub: pb_grpc.GRPCInferenceServiceStub, names: Sequence[str]) -> list[Model]:
    """Each named model's signature, as the target's ModelMetadata and ModelConfig say."""
    models = []
    for name in names:
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=CALL_TIMEOUT_S)
        config = stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=CALL_TIMEOUT_S)
        models.append(
            Model(
                name,
                tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in meta.inputs),
                tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in meta.outputs),
                config.config.max_batch_size,
            )
        )
    return models


def good_request(model: Model, rows: int = 1) -> pb.ModelInferRequest:
    """A well-formed request of `rows` rows: zeros (BYTES: empty elements), raw."""
    request = pb.ModelInferRequest(model_name=model.name)
    for spec in model.inputs:
        shape = [rows if d == -1 else d for d in spec.shape]
        count = math.prod(shape)
        request.inputs.add(name=spec.name, datatype=spec.datatype, shape=shape)
        size = ELEMENT_BYTES.get(spec.datatype)
        data = bytes(count * size) if size is not None else struct.pack("<I", 0) * count
        request.raw_input_contents.append(data)
    return request


# ---- hypothesis strategies --------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
NUMBER_STRINGS = st.sampled_from(
    ["nan", "NaN", "inf", "-inf", "Infinity", "1e30", "-1", "0", "5", " 7 ", "1.5", "²",
     "١٢", "9" * 30, "9" * 5000, "0x10", "", "fast", "1e-320"]
)  # fmt: skip
PARAM_VALUES = st.one_of(
    st.booleans().map(lambda v: ("bool_param", v)),
    st.integers(-(2**63), 2**63 - 1).map(lambda v: ("int64_param", v)),
    st.sampled_from([0, 1, 2**63, 2**64 - 1]).map(lambda v: ("uint64_param", v)),
    st.integers(0, 2**64 - 1).map(lambda v: ("uint64_param", v)),
    st.floats().map(lambda v: ("double_param", v)),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -0.0, 5e-324, 1e308]).map(
        lambda v: ("double_param", v)
    ),
    st.one_of(TEXT, NUMBER_STRINGS).map(lambda v: ("string_param", v)),
    st.just(("", None)),  # an InferParameter with nothing set
)
PARAM_KEYS = st.one_of(
    st.sampled_from(
        ["sla_ms", "sla_class", "priority", "timeout", "switchyard_variant",
         "switchyard_due_us", "binary_data_output", "switchyard_profile"]
    ),
    TEXT,
)  # fmt: skip
DIMS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([-1, 0, 1, 2, 3, 4, 64, 65, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1]),
)


def _set_param(params: object, key: str, value: tuple[str, object]) -> None:
    kind, given_value = value
    entry = params[key]  # type: ignore[index]
    if kind:
        setattr(entry, kind, given_value)
    else:
        entry.SetInParent()


Mutation = Callable[[pb.ModelInferRequest, st.DrawFn, Model], str]


def _param(r: pb.ModelInferRequest, draw: st.DrawFn, model: Model) -> str:
    key, value = draw(PARAM_KEYS), draw(PARAM_VALUES)
    _set_param(r.parameters, key, value)
    return f"parameter {key!r}={value[0]}:{value[1]!r:.40}"


def _many_params(r: pb.ModelInferRequest, draw: st.DrawFn, model: Model) -> str:
    count = draw(st.integers(65, 400))
    where = draw(st.sampled_from(["request", "input", "output"]))
    if where == "request":
        params = r.parameters
    elif where == "input" and r.inputs:
        params = r.inputs[0].parameters
    else:
        params = r.outputs.add(name=model.outputs[0].name).parameters
    for index in range(count):
        params[f"p{index}"].int64_param = index
    return f"{count} parameters on the {where}"


def _long_string(r: pb.ModelInferRequest, draw: st.DrawFn, model: Model) -> str:
    size = draw(st.sampled_from([4097, 8000, 70_000]))
    key = draw(PARAM_KEYS)
    if draw(st.booleans()):
        r.parameters[key].string_param = "\x01" * size
        return f"parameter {key!r} of {size} characters"
    r.parameters["k" * size].bool_param = True
    return f"parameter name of {size} characters"


def _shape(r: pb.ModelInferRequest, draw: st.DrawFn, model: Model) -> str:
    if not r.inputs:
        return "no input to shape"
    index = draw(st.integers(0, len(r.inputs) - 1))
    if draw(st.integers(0, 9)) == 0:
        shape = [1] * draw(st.integers(33, 300))
    else:
        shape = draw(st.lists(DIMS, max_size=6))
    del r.inputs[index].shape[:]
    r.inputs[index].shape.extend(shape)
    return f"input {index} shape {shape[:8]} (rank {len(shape)})"


def _rows(r: pb.ModelInferRequest, draw: st.DrawFn, model: Model) -> str:
    rows = draw(st.sampled_from([0, 2, 65, 1000, 2**20]))
    for tensor in r.inputs:
        if tensor.shape:
            tensor.shape[0] = rows
    if draw(st.booleans()) and rows <= 1000:  # the data to go with it
        fresh = good_request(model, rows)
        del r.raw_input_contents[:]
        r.raw_input_contents.extend(fresh.raw_input_contents)
    return f"{rows} rows"


def _bytes_count(r: pb.ModelInferRequest, draw: st.DrawFn, model: Model) -> str:
    """A BYTES input (or any) declaring many elements in little data: the allocation bug."""
    if not r.inputs:
        return "no input to count"
    index = next((i for i, t in enumerate(r.inputs) if t.datatype == "BYTES"), 0)
    shape = draw(st.sampled_from([[1, 2**30], [1, 2**31 - 1], [2**31, 1], [1, 2**20]]))
    del r.inputs[index].shape[:]
    r.inputs[index].shape.extend(shape)
    return f"input {r.inputs[index].name!r} ({r.inputs[index].datatype}) shape {shape}"


def _datatype(r: pb.ModelInferRequest, draw: st.DrawFn, model: Model) -> str:
    if not r.inputs:
        return "no input to retype"
    index = draw(st.integers(0, len(r.inputs) - 1))
    datatype = draw(st.one_of(st.sampled_from([*DATATYPES, "", "fp32", "STRING", "FP8"]), TEXT))
    r.inputs[index].datatype = datatype
    return f"input {index} datatype {datatype!r}"


def _raw(r: pb.ModelInferRequest, draw: st.DrawFn, model: Model) -> str:
    how = draw(st.sampled_from(["drop", "extra", "cut", "grow", "random", "none"]))
    if not r.raw_input_contents:
        r.raw_input_contents.append(draw(st.binary(max_size=16)))
        return "raw_input_contents where there were none"
    index = draw(st.integers(0, len(r.raw_input_contents) - 1))
    raw = list(r.raw_input_contents)
    if how == "drop":
        del raw[index]
    elif how == "extra":
        raw.append(draw(st.binary(max_size=16)))
    elif how == "cut":
        raw[index] = raw[index][: max(0, len(raw[index]) - draw(st.integers(1, 9)))]
    elif how == "grow":
        raw[index] = raw[index] + bytes(draw(st.integers(1, 9)))
    elif how == "random":
        raw[index] = draw(st.binary(max_size=64))
    else:
        raw = []
    del r.raw_input_contents[:]
    r.raw_input_contents.extend(raw)
    return f"raw_input_contents {how} at {index}"


def _bytes_prefix(r: pb.ModelInferRequest, draw: st.DrawFn, model: Model) -> str:
    if not r.raw_input_contents:
        return "no raw contents to prefix"
    index = draw(st.integers(0, len(r.raw_input_contents) - 1))
    length = draw(st.sampled_from([1, 99, 2**31, 2**32 - 1]))
    data = struct.pack("<I", length) + draw(st.binary(max_size=8))
    r.raw_input_contents[index] = data * draw(st.integers(1, 4))
    return f"raw input {index}: length prefixes of {length}"


def _typed(r: pb.ModelInferRequest, draw: st.DrawFn, model: Model) -> str:
    if not r.inputs:
        return "no input for typed contents"
    index = draw(st.integers(0, len(r.inputs) - 1))
    fields = [
        "bool_contents", "int_contents", "int64_contents", "uint_contents",
        "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents",
    ]  # fmt: skip
    name = draw(st.sampled_from(fields))
    count = draw(st.integers(0, 10))
    contents = r.inputs[index].contents
    if name == "bool_contents":
        contents.bool_contents.extend([True] * count)
    elif name in ("int_contents",):
        contents.int_contents.extend([draw(st.integers(-(2**31), 2**31 - 1))] * count)
    elif name == "int64_contents":
        contents.int64_contents.extend([-(2**63)] * count)
    elif name == "uint_contents":
        contents.uint_contents.extend([2**32 - 1] * count)
    elif name == "uint64_contents":
        contents.uint64_contents.extend([2**64 - 1] * count)
    elif name == "fp32_contents":
        contents.fp32_contents.extend([math.nan] * count)
    elif name == "fp64_contents":
        contents.fp64_contents.extend([math.inf] * count)
    else:
        contents.bytes_contents.extend([b"x"] * count)
    if draw(st.booleans()):
        del r.raw_input_contents[:]  # typed only
    return f"input {index} typed {name} x{count}"


def _inputs(r: pb.ModelInferRequest, draw: st.DrawFn, model: Model) -> str:
    how = draw(st.sampled_from(["missing", "duplicate", "unexpected", "rename", "many"]))
    if how in ("missing", "duplicate", "rename") and (
        not r.inputs or len(r.raw_input_contents) != len(r.inputs)
    ):
        how = "unexpected"
    if how == "missing":
        index = draw(st.integers(0, len(r.inputs) - 1))
        del r.inputs[index]
        del r.raw_input_contents[index]
    elif how == "duplicate":
        r.inputs.append(r.inputs[0])
        r.raw_input_contents.append(r.raw_input_contents[0])
    elif how == "unexpected":
        r.inputs.add(name=draw(TEXT), datatype="FP32", shape=[1])
        r.raw_input_contents.append(bytes(4))
    elif how == "rename":
        r.inputs[0].name = draw(st.one_of(TEXT, st.just("n" * 10_000)))
    else:
        for index in range(300):
            r.inputs.add(name=f"i{index}", datatype="FP32", shape=[1])
            r.raw_input_contents.append(bytes(4))
    return f"inputs: {how}"


def _outputs(r: pb.ModelInferRequest, draw: st.DrawFn, model: Model) -> str:
    how = draw(st.sampled_from(["unknown", "duplicate", "many", "binary_data"]))
    known = model.outputs[0].name
    if how == "unknown":
        r.outputs.add(name=draw(st.one_of(TEXT, st.just("o" * 10_000))))
    elif how == "duplicate":
        r.outputs.add(name=known)
        r.outputs.add(name=known)
    elif how == "many":
        for _ in range(300):
            r.outputs.add(name=known)
    else:
        _set_param(r.outputs.add(name=known).parameters, "binary_data", draw(PARAM_VALUES))
    return f"outputs: {how}"


def _model_name(r: pb.ModelInferRequest, draw: st.DrawFn, model: Model) -> str:
    how = draw(st.sampled_from(["name", "long name", "version", "long version", "empty"]))
    if how == "name":
        r.model_name = draw(TEXT)
    elif how == "long name":
        r.model_name = "m" * 20_000
    elif how == "version":
        r.model_version = draw(st.one_of(TEXT, st.just("2")))
    elif how == "long version":
        r.model_version = "v" * 20_000
    else:
        r.model_name = ""
    return f"model: {how}"


MUTATIONS: tuple[Mutation, ...] = (
    _param,
    _param,
    _param,
    _many_params,
    _long_string,
    _shape,
    _shape,
    _rows,
    _bytes_count,
    _datatype,
    _raw,
    _raw,
    _bytes_prefix,
    _typed,
    _inputs,
    _outputs,
    _model_name,
)


@st.composite
def malformed(draw: st.DrawFn, models: Sequence[Model]) -> Case:
    """One malformed request: a good one with one to three things done to it, or
    bytes that are not (all) a ModelInferRequest."""
    model = draw(st.sampled_from(list(models)))
    base = good_request(model)
    kind = draw(st.integers(0, 19))
    if kind == 0:
        return Case("garbage bytes", draw(st.binary(max_size=200)))
    if kind == 1:
        data = base.SerializeToString()
        cut = draw(st.integers(1, max(1, len(data) - 1)))
        return Case(f"{model.name} cut at byte {cut}", data[:cut])
    if kind == 2:  # a model_name that is not UTF-8 (field 1, length-delimited)
        return Case("model_name not UTF-8", base.SerializeToString() + b"\x0a\x02\xff\xfe")
    if kind == 3:  # an input whose typed contents do not parse (only a full parse sees it)
        return Case("contents not protobuf", base.SerializeToString() + BAD_CONTENTS_INPUT)
    request = pb.ModelInferRequest()
    request.CopyFrom(base)
    done = [
        draw(st.sampled_from(MUTATIONS))(request, draw, model)
        for _ in range(draw(st.integers(1, 3)))
    ]
    timed = "timeout" in request.parameters or "switchyard_due_us" in request.parameters
    return Case(f"{model.name}: " + "; ".join(done), request.SerializeToString(), timed=timed)


def batches(models: Sequence[Model], size: int) -> st.SearchStrategy[list[Case]]:
    """A batch of `size` requests sent together: malformed ones with good ones among
    them (about one in four)."""
    good = [Case(f"{m.name}: good", good_request(m).SerializeToString(), True) for m in models]
    one = st.one_of(malformed(models), malformed(models), malformed(models), st.sampled_from(good))
    return st.lists(one, min_size=size, max_size=size)


# ---- the run ----------------------------------------------------------------------


def fuzz(address: str, requests: int, seed_value: int = 0, batch: int = 8) -> Tally:
    """Sends about `requests` requests to the gateway at `address` (blocking; in
    batches of `batch` calls in flight together) and tallies the answers."""
    tally = Tally()
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    started = time.perf_counter()
    with grpc.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        models = describe_target(stub, MODELS)
        call = channel.unary_unary(INFER_METHOD)

        @settings(
            max_examples=max(1, math.ceil(requests / batch)),
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @seed(seed_value)
        @given(batches(models, batch))
        def send(cases: list[Case]) -> None:
            futures = [(case, call.future(case.payload, timeout=CALL_TIMEOUT_S)) for case in cases]
            for case, future in futures:
                error = future.exception()
                if error is None:
                    tally.record(case, "OK", "")
                else:
                    assert isinstance(error, grpc.Call)
                    tally.record(case, error.code().name, error.details() or "")

        send()
    tally.wall_s = time.perf_counter() - started
    return tally


def table_rows(tally: Tally) -> list[list[str]]:
    unclean = ", ".join(f"{code} {n}" for code, n in tally.unclean.most_common()) or "none"
    codes = ", ".join(f"{code} {n:,}" for code, n in tally.codes.most_common())
    rate = tally.requests / tally.wall_s if tally.wall_s > 0 else 0.0
    return [
        ["requests", f"{tally.requests:,}"],
        ["crashes (server processes gone)", str(tally.crashes)],
        ["unclean statuses (malformed requests)", unclean],
        ["good requests served OK", f"{tally.good_ok:,} of {tally.good:,}"],
        ["statuses", codes],
        ["wall time", f"{tally.wall_s:,.0f} s ({rate:,.0f} requests/s)"],
    ]


def section(tally: Tally, requests: int, seed_value: int) -> str:
    lines = [
        "## Data-plane fuzzing",
        "",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs shared with whatever else runs.",
        f"- Command: `python -m gateway.bench.fuzz --requests {requests} --seed {seed_value}` "
        "(`make bench` runs it with FUZZ_REQUESTS, default 20,000): `switchyard serve` with "
        f"one launched worker serving {', '.join(MODELS)}; malformed requests generated "
        "with hypothesis (about three in four) among good ones, 8 calls in flight.",
        "- The issue's target, 1,000,000 requests (`--requests 1000000`), takes about 35 "
        "minutes on the 2-core development machine (about 480 requests/s steady: a run "
        "measured over its first 170,000 requests, every gateway outcome clean), more "
        "than `make bench` should spend, so its default is 20,000.",
        "- Clean: every malformed request answered OK, INVALID_ARGUMENT, NOT_FOUND, "
        "RESOURCE_EXHAUSTED, OUT_OF_RANGE, FAILED_PRECONDITION or UNAVAILABLE (or "
        "DEADLINE_EXCEEDED when it gave a timeout of its own), every good one OK, both "
        "processes up at the end.",
        "",
        markdown_table(["", "result"], table_rows(tally)),
        "",
    ]
    if tally.examples:
        lines += ["First unclean answers:", ""] + [f"- `{e}`" for e in tally.examples] + [""]
    return "\n".join(lines)


def fleet_yaml(repository: Path) -> str:
    return (
        f"repository: {json.dumps(str(repository))}\n"
        "gateway: {listen: 127.0.0.1:0, metrics: 127.0.0.1:0, http: 127.0.0.1:0,\n"
        "  admin: 127.0.0.1:0, "
        "latency_probe_interval_s: 0}\n"
        "backends:\n"
        "  - name: cpu\n"
        "    address: 127.0.0.1:0\n"
        "    price_usd_per_hour: 0.08\n"
        f"    launch: {{threads: 1, models: [{', '.join(MODELS)}]}}\n"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_against_gateway(repository: Path, requests: int, seed_value: int, batch: int) -> Tally:
    """Starts `switchyard serve` (one launched worker), fuzzes it, counts the server
    processes that did not survive."""
    with tempfile.TemporaryDirectory(prefix="switchyard-fuzz-") as folder:
        work = Path(folder)
        fleet = work / "fleet.yaml"
        fleet.write_text(fleet_yaml(repository.resolve()))
        ready = work / "ready.json"
        with Child("gateway", serve_command(fleet, ready), work, ROOT) as child:
            description = child.wait_ready_file(ready, STARTUP_TIMEOUT_S)
            pids = [int(p) for p in description.get("pids", {}).values()]
            tally = fuzz(str(description["address"]), requests, seed_value, batch)
            tally.crashes = (child.exited() is not None) + sum(not _alive(p) for p in pids)
            if tally.crashes:
                print(child.stderr_tail(40))
    return tally


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.bench.fuzz", description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000, help="how many to send")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed")
    parser.add_argument("--batch", type=int, default=8, help="calls in flight together")
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--target", default=None, help="a running gateway (HOST:PORT)")
    parser.add_argument("--out", type=Path, default=None, help="BENCHMARKS.md to update")
    args = parser.parse_args(argv)
    try:
        if args.target:
            tally = fuzz(args.target, args.requests, args.seed, args.batch)
        else:
            tally = run_against_gateway(args.repository, args.requests, args.seed, args.batch)
    except BenchError as exc:
        print(exc)
        return 1
    body = section(tally, args.requests, args.seed)
    publish(body, args.out, BEGIN, END)
    return 0 if tally.clean and not tally.crashes else 1


if __name__ == "__main__":
    raise SystemExit(main())
