"""Open-loop digits traffic through a gateway, every answer recorded once: what the
fault suite and the multi-host tests send and check."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

import grpc
import numpy as np

from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc

CLIENT_DEADLINE_S = 30.0
"""Every request's deadline: an answer near it would be a request left hanging."""
NO_ROUTE = "no healthy backend serves model 'digits'"
OK = grpc.StatusCode.OK


def digits_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(np.zeros((1, 64), np.float32).tobytes())
    return request


@dataclass(frozen=True, slots=True)
class Answer:
    sent_s: float
    latency_s: float
    code: grpc.StatusCode
    backend: str
    detail: str
    attempts: int
    """switchyard_attempts: more than 1 when the gateway retried it."""


class Traffic:
    """Requests at a steady rate (open loop: one every 1/rate_per_s s, whatever the
    answers), each one's answer recorded once."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        rate_per_s: float = 40.0,
        timeout_s: float = CLIENT_DEADLINE_S,
    ) -> None:
        self.stub = pb_grpc.GRPCInferenceServiceStub(channel)
        self.request = digits_request()
        self.period_s = 1.0 / rate_per_s
        self.timeout_s = timeout_s
        self.sent = 0
        self.answers: list[Answer] = []
        self._calls: set[asyncio.Task[Answer]] = set()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Traffic:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def stop(self) -> None:
        """Stops sending and waits for every answer."""
        self._stop.set()
        assert self._task is not None
        await self._task
        await asyncio.gather(*self._calls)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not self._stop.is_set():
            call = loop.create_task(self.send())
            self._calls.add(call)
            due += self.period_s
            await asyncio.sleep(max(0.0, due - loop.time()))  # the rate's pacing

    async def send(self) -> Answer:
        """One request; its answer, also recorded."""
        self.sent += 1
        loop = asyncio.get_running_loop()
        sent = loop.time()
        try:
            reply = await self.stub.ModelInfer(self.request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            code, backend, detail, attempts = exc.code(), "", exc.details() or "", 0
        else:
            code, backend = OK, reply.parameters["switchyard_backend"].string_param
            detail, attempts = "", int(reply.parameters["switchyard_attempts"].string_param)
        answer = Answer(sent, loop.time() - sent, code, backend, detail, attempts)
        self.answers.append(answer)
        return answer

    def answered_by(self, backend: str, after_s: float = 0.0) -> int:
        return sum(1 for a in self.answers if a.backend == backend and a.sent_s >= after_s)

    def latest(self, count: int) -> list[Answer]:
        return sorted(self.answers, key=lambda a: a.sent_s)[-count:]

    def check(
        self, allowed: tuple[grpc.StatusCode, ...] = (OK,), no_route: bool = False
    ) -> Counter[str]:
        """Every request answered once, each with an allowed status, none near its
        deadline; returns the count of each status. `no_route`: UNAVAILABLE is a right
        answer too while no backend is ready (say, the other one's probe timed out on
        this busy host), and only then."""
        assert len(self.answers) == self.sent, f"{self.sent} sent, {len(self.answers)} answered"
        bad = [
            a
            for a in self.answers
            if a.code not in allowed
            and not (
                no_route and a.code == grpc.StatusCode.UNAVAILABLE and a.detail.startswith(NO_ROUTE)
            )
        ]
        assert not bad, f"{len(bad)} of {self.sent} unclean answers, first: {bad[:5]}"
        slowest = max(a.latency_s for a in self.answers)
        assert slowest < CLIENT_DEADLINE_S / 2, f"a request waited {slowest:.1f} s"
        return Counter(a.code.name for a in self.answers)
