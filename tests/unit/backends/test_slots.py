"""A worker's inference slots (backends.worker.batching.Slots), alone: at most `count`
held at once, a freed slot handed to the waiter that ranks first by (priority level, due
time), arrival order among equals; a waiter cancelled while it waits, or just as it is
handed a slot, never loses one. And what an emulated worker merges (`model_batching`):
nothing unless it is told to."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from backends.worker.batching import Slots
from backends.worker.served import WorkerSettings, model_batching


async def waiter(slots: Slots, key: tuple[int, int], got: list[str], name: str) -> None:
    await slots.acquire(key)
    got.append(name)


async def settle() -> None:
    """Lets every task that can run now run (nothing here waits on I/O or time)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_freed_slot_goes_to_the_waiter_ranked_first() -> None:
    slots = Slots(1)
    await slots.acquire((5, 0))
    assert (slots.free, slots.waiting) == (0, 0)
    got: list[str] = []
    tasks = [
        asyncio.create_task(waiter(slots, key, got, name))
        for name, key in [
            ("late", (5, 300)),
            ("early", (5, 100)),
            ("early-too", (5, 100)),  # a tie: after "early", which came first
            ("urgent-but-late", (1, 900)),  # a lower level ranks before any due time
        ]
    ]
    await settle()
    assert got == [] and slots.waiting == 4
    for expected in (["urgent-but-late"], ["early"], ["early-too"], ["late"]):
        slots.release()
        await settle()
        assert got[-1:] == expected and slots.free == 0
    slots.release()
    assert (slots.free, slots.waiting) == (1, 0)
    await asyncio.gather(*tasks)


async def test_two_slots_two_holders_and_the_third_waits() -> None:
    slots = Slots(2)
    await slots.acquire((0, 0))
    await slots.acquire((0, 0))
    got: list[str] = []
    third = asyncio.create_task(waiter(slots, (0, 0), got, "third"))
    await settle()
    assert got == [] and slots.waiting == 1
    slots.release()
    await third
    assert got == ["third"] and slots.free == 0
    slots.release()
    slots.release()
    assert slots.free == 2
    assert Slots(0).count == 1  # a worker has one slot at least


async def test_a_waiter_cancelled_while_it_waits_loses_no_slot() -> None:
    slots = Slots(1)
    await slots.acquire((0, 0))
    got: list[str] = []
    first = asyncio.create_task(waiter(slots, (0, 1), got, "first"))
    second = asyncio.create_task(waiter(slots, (0, 2), got, "second"))
    await settle()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert slots.waiting == 1  # the cancelled one no longer counts
    slots.release()  # skips the cancelled waiter
    await second
    assert got == ["second"] and slots.free == 0
    slots.release()
    assert (slots.free, slots.waiting) == (1, 0)


async def test_a_waiter_cancelled_as_it_is_handed_the_slot_passes_it_on() -> None:
    slots = Slots(1)
    await slots.acquire((0, 0))
    got: list[str] = []
    first = asyncio.create_task(waiter(slots, (0, 1), got, "first"))
    second = asyncio.create_task(waiter(slots, (0, 2), got, "second"))
    await settle()
    slots.release()  # handed to `first`...
    first.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await first
    await second
    assert got == ["second"] and slots.free == 0
    slots.release()
    assert slots.free == 1

    # With nobody else waiting, the slot it was handed is free again.
    await slots.acquire((0, 0))
    alone = asyncio.create_task(waiter(slots, (0, 1), got, "alone"))
    await settle()
    slots.release()
    alone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await alone
    assert (slots.free, slots.waiting) == (1, 0)
    await slots.acquire((0, 0))  # at once: the slot is there to take


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        # Emulated, nothing said: one row a batch, no merging (the delay kept).
        ({"emulate_latency_ms": 5.0}, (1, 0)),
        ({"emulate_latency_ms": 5.0, "max_queue_delay_us": 300}, (1, 300)),
        # Emulated, told to merge: as told.
        ({"emulate_latency_ms": 5.0, "max_batch_rows": 8}, (8, 0)),
        ({"emulate_latency_ms": 5.0, "batching": {"m": (4, 2000)}}, (4, 2000)),
        ({"emulate_latency_ms": 5.0, "batching": {"other": (4, 2000)}}, (1, 0)),
        # Not emulated: as before, 0 meaning the variant's own max_batch_size.
        ({}, (0, 0)),
        ({"max_batch_rows": 8, "max_queue_delay_us": 300}, (8, 300)),
        ({"batching": {"m": (4, 2000)}}, (4, 2000)),
    ],
)
def test_an_emulated_worker_merges_nothing_unless_told(
    settings: dict[str, object], expected: tuple[int, int]
) -> None:
    worker = WorkerSettings(repository=Path("models"), **settings)  # type: ignore[arg-type]
    assert model_batching(worker, "m") == expected
