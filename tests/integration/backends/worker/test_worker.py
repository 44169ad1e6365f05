"""The backend worker over real gRPC: metadata, inference against reference
outputs, every datatype raw and typed, and every kind of bad input."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio

from backends.demo.echo import ECHO_TYPES
from backends.protocol.tensors import NUMPY_DTYPES, encode_bytes_tensor
from backends.worker.served import parse_batching
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import Worker, launch_worker, output, raw_request, samples
from tests.waiting import wait_until


async def test_metadata_config_and_index(stub) -> None:  # type: ignore[no-untyped-def]
    assert (await stub.ServerLive(pb.ServerLiveRequest())).live
    assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="digits"))).ready
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name="nope"))).ready
    meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"))
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("input", "FP32", [-1, 64])
    ]
    assert {t.name for t in meta.outputs} == {"label", "probabilities"}
    config = (await stub.ModelConfig(pb.ModelConfigRequest(name="cnn"))).config
    assert config.max_batch_size == 64
    assert list(config.input[0].dims) == [3, 32, 32]
    assert config.input[0].data_type == pb.TYPE_FP32
    assert config.parameters["switchyard_variant"].string_value == "ort-cpu-fp32"
    assert config.parameters["switchyard_hardware_class"].string_value == "test-1c"
    index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
    assert [m.name for m in index.models] == [
        "cnn",
        "digits",
        "echo",
        "echo_typed",
        "magika",
        "mobilenet",
        "resnet",
        "transformer",
    ]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_stub(repository: Path) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    """A stub of one worker for the module's cases that only read from it (inference,
    datatypes, bad requests): one worker for them all, not one each."""
    worker = await launch_worker(repository, threads=1, hardware_class="test-1c")
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            yield pb_grpc.GRPCInferenceServiceStub(channel)
    finally:
        await worker.stop()


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("model", ["digits", "cnn", "resnet", "mobilenet", "transformer", "magika"])
async def test_inference_matches_reference(shared_stub, repository: Path, model: str) -> None:  # type: ignore[no-untyped-def]
    inputs, reference = samples(repository, model)
    meta = await shared_stub.ModelMetadata(pb.ModelMetadataRequest(name=model))
    types = {t.name: t.datatype for t in meta.inputs}
    reply = await shared_stub.ModelInfer(raw_request(model, inputs, types))
    assert reply.parameters["switchyard_variant"].string_param == "ort-cpu-fp32"
    for name, expected in reference.items():
        got = output(reply, name, expected.dtype.type)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    if model == "digits":
        assert (output(reply, "label", np.int64) == reference["label"]).all()


def _echo_inputs() -> dict[str, np.ndarray]:
    arrays = {}
    for datatype in ECHO_TYPES:
        if datatype == "BYTES":
            arrays[datatype] = np.array([[b"a", b"", "é".encode(), b"xyz"]] * 2, dtype=np.object_)
        elif datatype == "BOOL":
            arrays[datatype] = np.array([[True, False, True, True]] * 2)
        else:
            # NUMPY_DTYPES holds dtype[generic]: its kind says integer or floating.
            dtype = NUMPY_DTYPES[datatype]
            lim = np.iinfo(dtype) if dtype.kind in "iu" else np.finfo(dtype)  # type: ignore[type-var]
            arrays[datatype] = np.array(
                [[lim.min, lim.max, 0, 1]] * 2, dtype=NUMPY_DTYPES[datatype]
            )
    return arrays


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
async def test_every_datatype_round_trips(shared_stub, raw: bool) -> None:  # type: ignore[no-untyped-def]
    arrays = _echo_inputs()
    req = pb.ModelInferRequest(model_name="echo" if raw else "echo_typed", id="req-7")
    if not raw:
        req.parameters["binary_data_output"].bool_param = False
    for datatype, array in arrays.items():
        tensor = req.inputs.add(name=f"in_{datatype.lower()}", datatype=datatype, shape=array.shape)
        if raw or datatype == "FP16":
            continue
        field = {
            "BOOL": "bool_contents",
            "BYTES": "bytes_contents",
            "FP32": "fp32_contents",
            "FP64": "fp64_contents",
            "INT64": "int64_contents",
            "UINT64": "uint64_contents",
        }.get(datatype, "int_contents" if datatype.startswith("INT") else "uint_contents")
        getattr(tensor.contents, field).extend(array.ravel().tolist())
    if not raw:
        del req.inputs[[t.name for t in req.inputs].index("in_fp16")]
        arrays.pop("FP16")
    else:
        for datatype, array in arrays.items():
            data = encode_bytes_tensor(array) if datatype == "BYTES" else array.tobytes()
            req.raw_input_contents.append(data)
    reply = await shared_stub.ModelInfer(req)
    assert reply.id == "req-7"
    by_name = {o.name: (i, o) for i, o in enumerate(reply.outputs)}
    for datatype, array in arrays.items():
        index, out = by_name[f"out_{datatype.lower()}"]
        assert out.datatype == datatype
        assert list(out.shape) == list(array.shape)
        if raw:
            if datatype == "BYTES":
                assert reply.raw_output_contents[index] == encode_bytes_tensor(array)
            else:
                got = np.frombuffer(reply.raw_output_contents[index], NUMPY_DTYPES[datatype])
                assert got.tolist() == array.ravel().tolist()
        else:
            assert not reply.raw_output_contents
            fields = [f for f, v in out.contents.ListFields()]
            assert len(fields) == 1
            values = list(getattr(out.contents, fields[0].name))
            assert values == array.ravel().tolist()


def _digits(batch: int = 1) -> pb.ModelInferRequest:
    return raw_request("digits", {"input": np.zeros((batch, 64), np.float32)}, {"input": "FP32"})


def _bad(mutate) -> pb.ModelInferRequest:  # type: ignore[no-untyped-def]
    req = _digits(2)
    mutate(req)
    return req


BAD_REQUESTS = [
    (
        "unknown model",
        _bad(lambda r: setattr(r, "model_name", "nope")),
        grpc.StatusCode.NOT_FOUND,
        "unknown model 'nope'",
    ),
    (
        "unknown version",
        _bad(lambda r: setattr(r, "model_version", "7")),
        grpc.StatusCode.NOT_FOUND,
        "no version '7'",
    ),
    (
        "wrong input name",
        _bad(lambda r: setattr(r.inputs[0], "name", "image")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unexpected input 'image'",
    ),
    (
        "missing input",
        _bad(lambda r: (r.ClearField("inputs"), r.ClearField("raw_input_contents"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "missing input 'input'",
    ),
    (
        "wrong datatype",
        _bad(lambda r: setattr(r.inputs[0], "datatype", "FP64")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'input': datatype FP64",
    ),
    (
        "shape vs model",
        _bad(lambda r: r.inputs[0].shape.__setitem__(1, 63)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'input': shape [2, 63]",
    ),
    (
        "shape vs content",
        _bad(lambda r: r.inputs[0].shape.__setitem__(0, 3)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'input': raw contents hold 512 bytes",
    ),
    (
        "raw count",
        _bad(lambda r: r.raw_input_contents.append(b"x")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "raw_input_contents has 2 entries for 1 inputs",
    ),
    (
        "raw size",
        _bad(lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 5)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'input': raw contents hold 5 bytes",
    ),
    (
        "negative dim",
        _bad(lambda r: r.inputs[0].shape.__setitem__(0, -1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'input': shape [-1, 64] has a negative dimension",
    ),
    (
        "overflowing dim",
        _bad(lambda r: r.inputs[0].shape.__setitem__(0, 2**62)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'input': shape",
    ),
    (
        "batch too big",
        _bad(
            lambda r: (
                r.inputs[0].shape.__setitem__(0, 65),
                r.raw_input_contents.__setitem__(0, b"\0" * 65 * 256),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_batch_size 64",
    ),
]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(
    ("case", "request_", "code", "message"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
async def test_bad_input_gets_a_clear_status(shared_stub, case, request_, code, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await shared_stub.ModelInfer(request_)
    assert info.value.code() == code, info.value.details()
    assert message in (info.value.details() or "")


async def test_non_utf8_bytes_for_a_string_model(stub) -> None:  # type: ignore[no-untyped-def]
    arrays = _echo_inputs()
    arrays["BYTES"] = np.array([[b"\xff", b"", b"", b""]] * 2, dtype=np.object_)
    req = pb.ModelInferRequest(model_name="echo")
    for datatype, array in arrays.items():
        req.inputs.add(name=f"in_{datatype.lower()}", datatype=datatype, shape=array.shape)
        req.raw_input_contents.append(
            encode_bytes_tensor(array) if datatype == "BYTES" else array.tobytes()
        )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelInfer(req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'in_bytes': element 0 is not valid UTF-8" in (info.value.details() or "")


async def test_bad_requests_do_not_disturb_concurrent_good_ones(stub, repository: Path) -> None:  # type: ignore[no-untyped-def]
    inputs, reference = samples(repository, "digits")
    good = raw_request("digits", {"input": inputs["input"][:1]}, {"input": "FP32"})

    async def call(req: pb.ModelInferRequest) -> object:
        try:
            return await stub.ModelInfer(req)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""

    cases = [None if i % 2 else BAD_REQUESTS[i % len(BAD_REQUESTS)] for i in range(120)]
    requests = [good if case is None else case[1] for case in cases]
    results = await asyncio.gather(*(call(r) for r in requests))
    for case, result in zip(cases, results, strict=True):
        if case is None:
            assert isinstance(result, pb.ModelInferResponse)
            assert output(result, "label", np.int64)[0] == reference["label"][0]
        else:
            # Each bad request gets its own refusal, as it does alone.
            name, _, code, message = case
            assert isinstance(result, tuple), name
            assert result[0] == code and message in result[1], (name, result)
    assert (await stub.ServerReady(pb.ServerReadyRequest())).ready


async def test_concurrent_requests_are_batched_and_answered_correctly(repository: Path) -> None:
    # A batch may wait 100 ms for company, so concurrent requests meet even on a busy machine.
    worker = await launch_worker(repository, threads=1, max_queue_delay_us=100_000)
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            await _check_batched(pb_grpc.GRPCInferenceServiceStub(channel), repository)
    finally:
        await worker.stop()


async def test_max_batch_rows_caps_what_dynamic_batching_merges(repository: Path) -> None:
    # The same concurrent burst, with a batch waiting 100 ms for company, but at most
    # 4 rows per execution: every execution has 1..4 rows and all 32 are answered.
    worker = await launch_worker(
        repository, threads=1, max_queue_delay_us=100_000, max_batch_rows=4
    )
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await _check_batched_within(stub, repository, 4)
    finally:
        await worker.stop()


async def _check_batched_within(
    stub: pb_grpc.GRPCInferenceServiceStub, repository: Path, rows: int
) -> None:
    """The concurrent burst of `_check_batched`, merged into executions of 1..`rows` rows."""
    await _check_batched(stub, repository)
    stats = (await stub.ModelStatistics(pb.ModelStatisticsRequest(name="cnn"))).model_stats[0]
    assert max(b.batch_size for b in stats.batch_stats) <= rows
    assert stats.execution_count >= 32 // rows


async def _check_batched(stub: pb_grpc.GRPCInferenceServiceStub, repository: Path) -> None:
    inputs, reference = samples(repository, "cnn")
    requests = [
        raw_request("cnn", {"image": inputs["image"][i : i + 1]}, {"image": "FP32"})
        for i in range(32)
    ]
    replies = await asyncio.gather(*(stub.ModelInfer(r) for r in requests))
    for i, reply in enumerate(replies):
        np.testing.assert_allclose(
            output(reply, "probabilities", np.float32)[0],
            reference["probabilities"][i],
            rtol=1e-4,
            atol=1e-5,
        )
    stats = (await stub.ModelStatistics(pb.ModelStatisticsRequest(name="cnn"))).model_stats[0]
    assert stats.inference_count == 32
    assert stats.inference_stats.success.count == 32
    # One request per execution would make these equal; batching makes fewer executions.
    assert stats.execution_count < 32
    assert sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats) == 32


async def test_streaming_inference(stub, repository: Path) -> None:  # type: ignore[no-untyped-def]
    inputs, reference = samples(repository, "digits")

    async def requests() -> AsyncIterator[pb.ModelInferRequest]:
        for i in range(4):
            req = raw_request("digits", {"input": inputs["input"][i : i + 1]}, {"input": "FP32"})
            req.id = str(i)
            yield req
        yield _bad(lambda r: setattr(r.inputs[0], "datatype", "INT8"))

    replies = [r async for r in stub.ModelStreamInfer(requests())]
    # Answers come as requests finish, each naming its request.
    answered = {r.infer_response.id: r for r in replies if not r.error_message}
    assert sorted(answered) == ["0", "1", "2", "3"]
    for i in range(4):
        label = output(answered[str(i)].infer_response, "label", np.int64)[0]
        assert label == reference["label"][i]
    [error] = [r for r in replies if r.error_message]
    assert "datatype INT8 does not match" in error.error_message
    assert error.infer_response.parameters["switchyard_status"].string_param == "INVALID_ARGUMENT"


async def test_a_stopping_worker_ends_its_streams_once_their_requests_are_answered(
    repository: Path,
) -> None:
    """What the worker does first when it stops (`end_streams`): a stream with a request
    in flight takes no further request, answers the one it took and ends OK; an idle
    stream (a gateway's, between requests) ends OK at once; a stream opened after ends at
    once. Without it, the server's stop would hold both open for its grace and then
    cancel them, the request in flight included."""
    worker = await launch_worker(repository, threads=1, hardware_class="test-1c")
    held = await worker.hold("digits")
    assert worker.servicer is not None
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            busy = stub.ModelStreamInfer()
            idle = stub.ModelStreamInfer()
            await idle.wait_for_connection()
            first = _one_row(repository, {})
            first.id = "taken"
            await busy.write(first)
            await wait_until(lambda: held.gate.holding, what="the first request running")
            worker.servicer.end_streams()
            # The idle stream ends now, though its caller has not closed it (the bound
            # only turns a stream left open into a failure).
            assert await asyncio.wait_for(idle.read(), 30) == grpc.aio.EOF
            assert await idle.code() == grpc.StatusCode.OK
            late = _one_row(repository, {})
            late.id = "not taken"
            await busy.write(late)
            held.gate.open()
            reply = await busy.read()
            assert isinstance(reply, pb.ModelStreamInferResponse)
            assert reply.infer_response.id == "taken" and not reply.error_message
            # "not taken" is never answered.
            assert await asyncio.wait_for(busy.read(), 30) == grpc.aio.EOF
            assert await busy.code() == grpc.StatusCode.OK
            assert held.batcher.arrived == 1
            after = stub.ModelStreamInfer()
            assert await asyncio.wait_for(after.read(), 30) == grpc.aio.EOF
            assert await after.code() == grpc.StatusCode.OK
    finally:
        await worker.stop()


Params = dict[str, int | str]


def _one_row(repository: Path, params: Params, row: int = 0) -> pb.ModelInferRequest:
    inputs, _ = samples(repository, "digits")
    r = raw_request("digits", {"input": inputs["input"][row : row + 1]}, {"input": "FP32"})
    for key, value in params.items():
        if isinstance(value, str):
            r.parameters[key].string_param = value
        elif value >= 0:
            r.parameters[key].uint64_param = value
        else:
            r.parameters[key].int64_param = value
    return r


async def _run_order(
    worker: Worker, repository: Path, arrivals: list[tuple[str, Params]]
) -> list[str]:
    """The first request runs and is held there (the model busy, one row at a time)
    while the others arrive one after another behind it, each queued before the next is
    sent; then the model is let go: the order the model ran them in (each request
    carries a sample row of its own, by which its execution is known)."""
    held = await worker.hold("digits")
    rows = samples(repository, "digits")[0]["input"]
    names = {rows[i].tobytes(): name for i, (name, _) in enumerate(arrivals)}
    assert len(names) == len(arrivals), "the sample rows are not distinct"
    async with grpc.aio.insecure_channel(worker.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        calls = []
        for row, (name, params) in enumerate(arrivals):
            # A call starts as it is made: each only once the one before it is queued.
            calls.append(stub.ModelInfer(_one_row(repository, params, row)))
            if row == 0:
                await wait_until(lambda: held.gate.holding, what="the first request to run")
            else:

                def queued(n: int = row + 1) -> bool:
                    return held.batcher.arrived == n

                await wait_until(queued, what=f"{name} to queue")
        held.gate.open()
        await asyncio.gather(*calls)
    return [names[row] for row in held.rows_run("input")]


async def _refused(
    stub: pb_grpc.GRPCInferenceServiceStub, repository: Path, key: str, bad: int | str
) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ModelInfer(_one_row(repository, {key: bad}))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return caught.value.details() or ""


async def test_waiting_requests_run_by_priority(repository: Path) -> None:
    """Triton's `priority`: while one request runs (one at a time), requests that
    arrive behind it run by priority level (1 first, then 2, then the default 0), not
    in arrival order."""
    worker = await launch_worker(repository, threads=1, models=["digits"])
    try:
        arrivals: list[tuple[str, Params]] = [
            ("first", {}),
            ("default", {}),
            ("p2", {"priority": 2}),
            ("zero", {"priority": 0}),
            ("p1", {"priority": 1}),
        ]
        order = await _run_order(worker, repository, arrivals)
        assert order == ["first", "p1", "p2", "default", "zero"]
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for bad in (-1, "high"):
                details = await _refused(stub, repository, "priority", bad)
                assert "'priority' must be a non-negative integer" in details
            r = _one_row(repository, {})
            r.parameters["priority"].double_param = 1.5
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ModelInfer(r)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "'priority' must be a non-negative integer" in (caught.value.details() or "")
    finally:
        await worker.stop()


async def test_waiting_requests_of_one_priority_run_earliest_deadline_first(
    repository: Path,
) -> None:
    """`switchyard_due_us`: while one request runs, those behind it run by when they
    are due (arrival + the microseconds they give), those that give none after them,
    and a priority level still before any deadline. The worker says in its
    configuration that it queues so (the gateway then sends deadlines). The deadlines
    lie far apart (10 ms, 30 s, 250 s), so their order does not depend on how quickly
    the requests arrive one after another."""
    worker = await launch_worker(repository, threads=1, models=["digits"])
    try:
        due = "switchyard_due_us"
        arrivals: list[tuple[str, Params]] = [
            ("first", {}),
            ("none", {}),
            ("bronze", {due: 250_000_000}),
            ("gold", {due: 10_000}),
            ("silver", {due: 30_000_000}),
            ("p1-late", {due: 900_000_000, "priority": 1}),
        ]
        order = await _run_order(worker, repository, arrivals)
        assert order == ["first", "p1-late", "gold", "silver", "bronze", "none"]
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            config = await stub.ModelConfig(pb.ModelConfigRequest(name="digits"))
            assert config.config.parameters["switchyard_queue"].string_value == "deadline"
            for bad in (-1, "soon"):
                details = await _refused(stub, repository, due, bad)
                assert "'switchyard_due_us' must be a non-negative integer" in details
    finally:
        await worker.stop()


async def test_batching_is_set_per_model(repository: Path) -> None:
    """cnn gets its own dynamic batching (at most 4 rows, waiting up to 100 ms for
    company), the worker's default (no waiting, the variant's limit) stays for digits."""
    worker = await launch_worker(
        repository, threads=1, models=("cnn", "digits"), batching={"cnn": (4, 100_000)}
    )
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await _check_batched_within(stub, repository, 4)
            configs = {
                name: (await stub.ModelConfig(pb.ModelConfigRequest(name=name))).config
                for name in ("cnn", "digits")
            }
            assert configs["cnn"].dynamic_batching.max_queue_delay_microseconds == 100_000
            assert configs["digits"].dynamic_batching.max_queue_delay_microseconds == 0
    finally:
        await worker.stop()


def test_batching_option_is_checked() -> None:
    assert parse_batching(["resnet=8:2000", "cnn=1:0"]) == {"resnet": (8, 2000), "cnn": (1, 0)}
    for bad in ("resnet", "resnet=8", "=8:10", "resnet=x:1", "resnet=-1:5"):
        with pytest.raises(ValueError, match="expected MODEL=ROWS:DELAY_US"):
            parse_batching([bad])
