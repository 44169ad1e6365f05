"""The batcher runs a model whose executions are short on the event loop, not in a
thread: after its first executions (in the executor) say what a run costs, runs whose
recent mean is below `inline_below_us` happen on the loop's own thread, and a model that
turns slow goes back to the executor. A real ONNX Runtime model served inline answers as
it does in a thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from backends.repository import ModelRepository
from backends.runtimes.base import Array
from backends.runtimes.loader import load_adapter
from backends.worker.batching import INLINE_AFTER_EXECUTIONS, Batcher
from backends.worker.served import AUTO_INLINE_BELOW_US
from tests.integration.conftest import launch_worker, samples


class Clock:
    """Nanoseconds that move only when a run says."""

    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


class Recorder:
    """Doubles its input; records which thread ran it and costs `cost_ns` on `clock`."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.cost_ns = 10_000
        self.threads: list[int] = []

    def __call__(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> list[Array]:
        self.threads.append(threading.get_ident())
        self.clock.ns += self.cost_ns
        return [inputs["x"] * 2]


def row(value: float) -> dict[str, Array]:
    return {"x": np.full((1, 2), value, dtype=np.float32)}


async def one_at_a_time(batcher: Batcher, count: int) -> None:
    for i in range(count):
        out = await batcher.infer(row(i), 1)
        assert out["y"].tolist() == [[2.0 * i, 2.0 * i]]


async def test_short_runs_move_onto_the_loop_and_a_slow_model_moves_back() -> None:
    loop_thread = threading.get_ident()
    clock = Clock()
    run = Recorder(clock)
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(run, executor, ["y"], 8, clock_ns=clock, inline_below_us=200)
        batcher.start()
        try:
            await one_at_a_time(batcher, INLINE_AFTER_EXECUTIONS + 4)
            first, later = (
                run.threads[:INLINE_AFTER_EXECUTIONS],
                run.threads[INLINE_AFTER_EXECUTIONS:],
            )
            assert loop_thread not in first, "the first runs measure in the executor"
            assert later == [loop_thread] * 4

            run.cost_ns = 5_000_000  # the model turned slow: 5 ms a run
            run.threads.clear()
            await one_at_a_time(batcher, 4)
            assert run.threads[0] == loop_thread, "the slow run itself was already inline"
            assert loop_thread not in run.threads[1:], "then back to the executor"
        finally:
            await batcher.stop()


async def test_off_by_default_every_run_in_the_executor() -> None:
    loop_thread = threading.get_ident()
    clock = Clock()
    run = Recorder(clock)
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(run, executor, ["y"], 8, clock_ns=clock)
        batcher.start()
        try:
            await one_at_a_time(batcher, INLINE_AFTER_EXECUTIONS + 4)
        finally:
            await batcher.stop()
    assert loop_thread not in run.threads


async def test_onnx_runtime_inline_answers_as_in_a_thread(repository: Path) -> None:
    variant = ModelRepository(repository).scan("digits").variants[0]
    adapter = load_adapter(variant, 1)
    outputs = [s.name for s in adapter.outputs]
    rows = samples(repository, "digits")[0]["input"][:16]
    expected = [adapter.run({"input": rows[i : i + 1]}, outputs) for i in range(len(rows))]
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(adapter.run, executor, outputs, 64, inline_below_us=1_000_000)
        batcher.start()
        try:
            got = [await batcher.infer({"input": rows[i : i + 1]}, 1) for i in range(len(rows))]
            together = await asyncio.gather(
                *(batcher.infer({"input": rows[i : i + 1]}, 1) for i in range(len(rows)))
            )
        finally:
            await batcher.stop()
    assert batcher._runs_fast()
    for answer in (got, together):
        for one, want in zip(answer, expected, strict=True):
            for name, array in zip(outputs, want, strict=True):
                # batched rows may differ from single-row runs in the last bits
                np.testing.assert_allclose(
                    one[name].astype(np.float64), array.astype(np.float64), rtol=1e-5, atol=1e-7
                )


async def test_a_one_thread_worker_runs_a_variant_that_merges_nothing_inline_by_itself(
    repository: Path,
) -> None:
    """With no `inline_below_us` given, a variant that merges no rows (here capped at
    one row a run) on a one-thread worker runs inline below AUTO_INLINE_BELOW_US; one
    that batches, one on a two-thread worker, and one whose worker says 0 run in a
    thread."""
    cases = (
        ({"threads": 1, "max_batch_rows": 1}, AUTO_INLINE_BELOW_US * 1000),
        ({"threads": 1}, 0),  # digits merges up to 64 rows a run
        ({"threads": 2, "max_batch_rows": 1}, 0),
        ({"threads": 1, "max_batch_rows": 1, "inline_below_us": 0}, 0),
    )
    for settings, expected_ns in cases:
        worker = await launch_worker(repository, models=["digits"], **settings)
        try:
            for batcher in worker.models["digits"].batchers():
                assert batcher._inline_below_ns == expected_ns, settings
        finally:
            await worker.stop()


async def test_the_workers_setting_reaches_its_batchers_but_never_with_emulated_latency(
    repository: Path,
) -> None:
    inline = await launch_worker(repository, models=["digits"], inline_below_us=150)
    emulated = await launch_worker(
        repository, models=["digits"], inline_below_us=150, emulate_latency_ms=1.0
    )
    try:
        for worker, expected_ns in ((inline, 150_000), (emulated, 0)):
            for batcher in worker.models["digits"].batchers():
                assert batcher._inline_below_ns == expected_ns
    finally:
        await inline.stop()
        await emulated.stop()
