"""Dynamic batching for one served model.

Requests wait in a queue; one consumer takes every request already waiting
(up to `max_batch_size` rows, waiting at most `max_queue_delay_s` for more),
concatenates those whose non-batch dimensions agree, runs them as one call on
the runtime in a worker thread, and splits the outputs back. A model whose runs take
less than `inline_below_us` on recent average (a tiny model: tens of microseconds) runs
on the event loop instead: the hand-off to a thread and back (a queue, a lock, a wake-up
of the loop) costs it more CPU than the run. While one batch
runs, the next one gathers, so batches grow with load and a lone request waits
for nobody. A batch that fails is retried one request at a time, so one bad
request never fails its neighbours.

Waiting requests are taken by priority, as Triton's request parameter `priority`
orders its scheduler's queue: a lower non-zero value first, and 0 (the default,
or no priority) after every explicit level. Within a level, earliest deadline
first: a request may say by when it is due with `switchyard_due_us` (microseconds
from its arrival; the gateway sends what is left of the request's SLA), and those
that do not say come after those that do; arrival order among equals. The due time
is a soft priority, never a deadline: a request past it still runs. A sender that
would rather hear at once than be answered late (a gateway with other backends to go
to) asks the worker to refuse a request it predicts past its due time: `answer_in_ns`
is that prediction, from what waits ahead across the worker's batchers.

The queue is bounded (`max_queue` requests waiting, not counting those already in a
batch): a request that finds it full is shed at once with `QueueFull`, which says
the limit and estimates when room frees (the requests waiting x the recent mean
execution time / the recent mean requests per execution, at least 1 ms). A request
may also carry a deadline (`timeout_s`: the caller's gRPC deadline or Triton's
`timeout`); one whose deadline has passed when its batch is formed is answered
`DeadlineExceeded` without running, and counted in `BatchStats.expired`.

A worker's batchers (one per model variant) share its inference slots (`Slots`, one
per thread): at most that many batches run at once, whatever the models and variants,
and a slot that frees goes to the formed batch due first among them all (priority
level, then due time, then arrival), or stays with the batcher whose batch just ran
when the request waiting there ranks before them (its next batch forms only then). So
the worker is one queue, earliest deadline first, over as many slots as it says it
has, which is how a gateway models it.

Arrays in, arrays out: imports no grpc, no protobuf and nothing from the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from backends.protocol.errors import DeadlineExceeded, Exhausted
from backends.protocol.load import GROUP_SEPARATOR
from backends.protocol.parameters import priority_level
from backends.runtimes.base import Array

RunFn = Callable[[Mapping[str, Array], Sequence[str]], list[Array]]
Clock = Callable[[], int]
"""A monotonic clock in nanoseconds (time.perf_counter_ns; tests may pass their own)."""

DEFAULT_MAX_QUEUE = 128
"""Requests that may wait in one batcher's queue (per model variant) by default:
two full batches of the demo models' 64 rows, and few enough that the last waits
tens of milliseconds, not seconds, behind the others."""

EWMA_WEIGHT = 0.2

INLINE_AFTER_EXECUTIONS = 8
"""Executions in a thread before a batcher may run them on the event loop: enough for the
recent mean to say what a run costs (the first runs of a runtime are its slowest)."""
"""Weight of the newest execution in the recent means behind the retry estimate."""


class Slots:
    """A worker's inference slots, shared by the batchers of all its models and
    variants: at most `count` batches run at once, and a slot that frees goes to the
    waiting batch that ranks first by its key (priority level, due time, arrival)."""

    def __init__(self, count: int) -> None:
        self.count = max(1, count)
        self.free = self.count
        self._waiting: list[tuple[tuple[int, int], int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @property
    def waiting(self) -> int:
        """Batches formed and waiting for a slot."""
        return sum(1 for *_, future in self._waiting if not future.done())

    async def acquire(self, key: tuple[int, int]) -> None:
        """Takes a slot for a batch ranked by `key` (level, due ns), waiting for one to
        free if none is; returns holding it (give it back with `release`)."""
        if self.free > 0 and not self._waiting:
            self.free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (key, next(self._order), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # handed a slot as it was cancelled: pass it on
            else:
                future.cancel()  # left in the heap, skipped by `release`
            raise

    def first_waiting(self) -> tuple[int, int] | None:
        """The key of the batch waiting for a slot that ranks first (None: none waits)."""
        waiting = self._waiting
        while waiting and waiting[0][2].done():
            heapq.heappop(waiting)  # cancelled while it waited
        return waiting[0][0] if waiting else None

    def release(self) -> None:
        """Gives a slot back: to the waiting batch ranked first, else it is free."""
        while self._waiting:
            *_, future = heapq.heappop(self._waiting)
            if not future.done():
                future.set_result(None)
                return
        self.free += 1


class BatchTrace(Protocol):
    """A traced request's view of its batch (backends.worker.tracing)."""

    def started(self, requests: int, rows: int) -> None:
        """Its batch, of `requests` requests and `rows` rows, starts running now."""


class QueueFull(Exhausted):
    """The queue holds its limit: the request was shed without waiting."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        # About when room frees, in ms: a retry sooner would likely be shed again.
        super().__init__(message, retry_after_ms)


@dataclass(slots=True)
class BatchStats:
    """Counters the statistics API reports (nanoseconds, as Triton does)."""

    executions: int = 0
    inferences: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    by_size: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Batch size -> (executions, compute ns)."""
    shed: int = 0
    """Requests refused because the queue was full."""
    expired: int = 0
    """Requests whose deadline passed before their batch formed: answered, never run."""
    refused_late: int = 0
    """Requests refused at arrival, as their senders asked, because they would have been
    answered past their due time (backends.protocol.parameters.REFUSE_LATE_PARAMETER)."""


NO_DEADLINE_NS = 2**63
"""Where a request that gives no deadline ranks within its priority level: after every
request that does."""


@dataclass(order=True, slots=True)
class _Pending:
    level: int
    due_ns: int
    seq: int
    inputs: dict[str, Array] = field(compare=False)
    rows: int = field(compare=False)
    key: tuple[tuple[str, tuple[int, ...]], ...] = field(compare=False)
    enqueued_ns: int = field(compare=False)
    expires_ns: int = field(compare=False)
    """When its deadline passes (the batcher's clock); NO_DEADLINE_NS: never."""
    future: asyncio.Future[list[Array]] = field(compare=False)
    queued: bool = field(default=True, compare=False)
    """Waiting in the queue, so counted against its bound."""
    caller: str = field(default="", compare=False)
    """Who sent it (a gateway's `switchyard_caller`), for load reports."""
    trace: BatchTrace | None = field(default=None, compare=False)
    """Told when its batch starts (a traced request)."""
    started_ns: int = field(default=0, compare=False)
    """When its batch started (0: not yet)."""


class Batcher:
    """Runs inference for one model, batching concurrent requests when it can."""

    def __init__(
        self,
        run: RunFn,
        executor: Executor,
        output_names: Sequence[str],
        max_batch_size: int,
        max_queue_delay_s: float = 0.0,
        max_queue: int = DEFAULT_MAX_QUEUE,
        name: str = "this model",
        clock_ns: Clock = time.perf_counter_ns,
        inline_below_us: int = 0,
        slots: Slots | None = None,
    ) -> None:
        """`max_queue`: most requests waiting (at least 1); `name` names the model
        (and variant) in the errors callers see; `inline_below_us`: executions whose
        recent mean is below this run on the event loop, not in `executor` (0: never;
        `run` must then never block on anything but its own compute); `slots`: the
        worker's inference slots, shared with its other batchers (None: this batcher's
        one batch at a time is its only bound)."""
        self._run = run
        self._executor = executor
        self._outputs = list(output_names)
        self._max_rows = max(1, max_batch_size)
        self._batching = max_batch_size > 0
        self._delay_s = max_queue_delay_s
        self._queue: asyncio.PriorityQueue[_Pending] = asyncio.PriorityQueue()
        self._seq = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._clock = clock_ns
        self._inline_below_ns = inline_below_us * 1000
        self.max_queue = max(1, max_queue)
        self.name = name
        self.waiting = 0
        """Requests in the queue now, not yet taken into a batch."""
        self.running = 0
        """Requests in the batch executing now."""
        self._running_since_ns = 0
        self._waiters: dict[int, _Pending] = {}
        """The requests counted in `waiting`, by arrival number (for load reports)."""
        self._slots = slots
        self._batch: list[_Pending] = []
        """The batch executing now."""
        self._formed: list[_Pending] = []
        """A batch formed and waiting for one of the worker's slots."""
        self._execution_ns = 0.0
        self._requests_per_execution = 1.0
        self.stats = BatchStats()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._consume())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def infer(
        self,
        inputs: dict[str, Array],
        rows: int,
        priority: int = 0,
        due_us: int | None = None,
        timeout_s: float | None = None,
        caller: str = "",
        trace: BatchTrace | None = None,
    ) -> dict[str, Array]:
        """Runs one request (`priority` as Triton's, due `due_us` microseconds from now
        or None, its deadline `timeout_s` seconds from now or None: see the module;
        `caller`: who sent it, for `others_load`; `trace`: told when its batch starts);
        returns every output by name.
        QueueFull when the queue holds its limit; DeadlineExceeded when the deadline
        passed before its batch formed."""
        outputs, _ = await self.infer_waited(
            inputs, rows, priority, due_us, timeout_s, caller, trace
        )
        return outputs

    async def infer_waited(
        self,
        inputs: dict[str, Array],
        rows: int,
        priority: int = 0,
        due_us: int | None = None,
        timeout_s: float | None = None,
        caller: str = "",
        trace: BatchTrace | None = None,
    ) -> tuple[dict[str, Array], int]:
        """`infer`, and how long (ns) the request waited here before its batch started
        (for its caller's load report)."""
        if self.waiting >= self.max_queue:
            self.stats.shed += 1
            raise QueueFull(
                f"{self.name}: queue full ({self.waiting} requests waiting, "
                f"limit {self.max_queue})",
                self.retry_after_ms(),
            )
        key = tuple(sorted((name, tuple(a.shape[1:])) for name, a in inputs.items()))
        future: asyncio.Future[list[Array]] = asyncio.get_running_loop().create_future()
        now_ns = self._clock()
        pending = _Pending(
            priority_level(priority),
            NO_DEADLINE_NS if due_us is None else now_ns + due_us * 1000,
            next(self._seq),
            inputs,
            rows,
            key,
            now_ns,
            NO_DEADLINE_NS if timeout_s is None else now_ns + int(timeout_s * 1e9),
            future,
            caller=caller,
            trace=trace,
        )
        self._queue.put_nowait(pending)
        self.waiting += 1
        self._waiters[pending.seq] = pending
        try:
            arrays = await future
        finally:
            self._dequeued(pending)  # the caller went away: it waits no more
        return dict(zip(self._outputs, arrays, strict=True)), pending.started_ns - now_ns

    def retry_after_ms(self) -> int:
        """About when the queue has room, in ms: the requests waiting x the recent mean
        execution time / the recent mean requests per execution; at least 1. The batch
        running now counts as one execution at least as long as it has taken so far."""
        execution_ns = self._execution_ns
        if self.running:
            execution_ns = max(execution_ns, self._clock() - self._running_since_ns)
        ns = self.waiting * execution_ns / max(1.0, self._requests_per_execution)
        return max(1, math.ceil(ns / 1e6))

    def others_load(
        self,
        caller: str,
        now_ns: int,
        edges_ns: Sequence[int],
        counts: list[int],
        work: list[float],
        group: str | None = None,
    ) -> tuple[int | None, int]:
        """Adds the requests waiting here that `caller` did not send to `counts` and
        `work` (ns of expected work, the recent mean execution time per request), in
        the bucket of `edges_ns` they are due within (the last: after them all, or no
        due time). Returns about how long (ns) until the batch running ends when it
        holds a request of another caller's (else None), and how many requests here,
        waiting or running, callers outside `group` sent (`GROUP/...`; 0 when `group`
        is None)."""
        batch = self._batch
        if not batch and not self._waiters and not self._formed:
            return None, 0  # idle (every answer's report asks each batcher of the worker)
        per_request_ns = self._per_request_ns()
        last = len(edges_ns)
        foreign = 0
        prefix = None if group is None else group + GROUP_SEPARATOR
        for pending in self._waiting():
            if pending.caller == caller:
                continue
            if prefix is not None and not pending.caller.startswith(prefix):
                foreign += 1
            due = pending.due_ns
            at = last if due == NO_DEADLINE_NS else bisect_left(edges_ns, due - now_ns)
            counts[at] += 1
            work[at] += per_request_ns
        if prefix is not None:
            foreign += sum(1 for p in batch if not p.caller.startswith(prefix))
        if not batch or all(p.caller == caller for p in batch):
            return None, foreign
        return self._rest_ns(now_ns), foreign

    def per_request_ns(self) -> float | None:
        """The recent mean execution time per request (ns); None before the first."""
        return self._per_request_ns() if self.stats.executions else None

    def _per_request_ns(self) -> float:
        return self._execution_ns / max(1.0, self._requests_per_execution)

    def _rest_ns(self, now_ns: int) -> int:
        """About how long (ns) the batch running has left: the recent mean execution
        time less how long it has run (0 once past it)."""
        return max(0, int(self._execution_ns) - (now_ns - self._running_since_ns))

    def _waiting(self) -> Iterator[_Pending]:
        """The requests waiting here: in the queue, then in a batch formed and waiting
        for a slot."""
        return itertools.chain(self._waiters.values(), self._formed)

    def ahead(self, level: int, due_ns: int, now_ns: int) -> tuple[float, int | None]:
        """What a request ranked (`level`, `due_ns`) would find here at `now_ns`: the
        expected work (ns) of the requests waiting that rank at or before it (in the
        queue, or in a batch formed and waiting for a slot), and how long (ns) the batch
        running has left (None: none runs)."""
        rank = (level, due_ns)
        count = sum(1 for p in self._waiting() if (p.level, p.due_ns) <= rank)
        rest = self._rest_ns(now_ns) if self._batch else None
        return count * self._per_request_ns(), rest

    def latest_due_ns(self) -> int | None:
        """The latest due time (ns, the batcher's clock) among the requests waiting here
        that give one (in the queue, or in a batch formed and waiting for a slot); None
        when none does."""
        latest: int | None = None
        for pending in self._waiting():
            due = pending.due_ns
            if due != NO_DEADLINE_NS and (latest is None or due > latest):
                latest = due
        return latest

    def _dequeued(self, pending: _Pending) -> None:
        if pending.queued:
            pending.queued = False
            self.waiting -= 1
            self._waiters.pop(pending.seq, None)

    def _requeue(self, pending: _Pending) -> None:
        self._queue.put_nowait(pending)
        if not pending.queued:
            pending.queued = True
            self.waiting += 1
            self._waiters[pending.seq] = pending

    def _take(self, pending: _Pending) -> bool:
        """Takes `pending` off the queue for a batch: False when it is not to run (its
        caller went away, or its deadline passed: answered DeadlineExceeded)."""
        self._dequeued(pending)
        if pending.future.done():
            return False
        now_ns = self._clock()
        if pending.expires_ns <= now_ns:
            self.stats.expired += 1
            waited_ms = (now_ns - pending.enqueued_ns) / 1e6
            _deliver(
                pending.future,
                DeadlineExceeded(
                    f"{self.name}: the request's deadline passed after "
                    f"{waited_ms:.1f} ms in the queue; it was not run"
                ),
            )
            return False
        return True

    async def _next_batch(self, wait: bool = True) -> list[_Pending]:
        """The next batch to run; with `wait` false, an empty one when no request that is
        to run waits now (rather than waiting for one)."""
        while True:
            if wait:
                first = await self._queue.get()
            else:
                try:
                    first = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    return []
            if self._take(first):
                break
        batch = [first]
        if not self._batching:
            return batch
        rows = first.rows
        deadline = time.perf_counter() + self._delay_s
        while rows < self._max_rows:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        item = await self._queue.get()
                except TimeoutError:
                    break
            if item.key != first.key or rows + item.rows > self._max_rows:
                if not item.future.done():
                    self._requeue(item)  # keeps its place: level, deadline, arrival
                    break
            if not self._take(item):
                continue
            batch.append(item)
            rows += item.rows
        return batch

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        held = False  # this batcher kept the slot its last batch ran in (see `_keeps`)
        while True:
            try:
                formed = await self._next_batch(wait=not held)
                start_ns = self._clock()
                # Formed now: one whose deadline passed while the batch gathered is dropped.
                batch = [p for p in formed if not p.future.done() and self._in_time(p, start_ns)]
                slots = self._slots
                if not batch:
                    if held:
                        assert slots is not None
                        held = False
                        slots.release()
                    continue
                if slots is None:
                    await self._execute(loop, batch, start_ns)
                    continue
                if not held:
                    self._formed = batch
                    try:
                        await slots.acquire(min((p.level, p.due_ns) for p in batch))
                    finally:
                        self._formed = []
                held = True
                start_ns = self._clock()
                batch = [p for p in batch if not p.future.done() and self._in_time(p, start_ns)]
                if batch:
                    await self._execute(loop, batch, start_ns)
                held = self._keeps(slots)
                if not held:
                    slots.release()
            except BaseException:
                if held:
                    assert self._slots is not None
                    held = False
                    self._slots.release()
                raise

    def _keeps(self, slots: Slots) -> bool:
        """Whether this batcher keeps the slot its batch just ran in for its next batch:
        when the request waiting here that ranks first ranks before every batch waiting
        for a slot. (Its next batch forms only now, after the slot would have gone to
        them: without this, two batchers' requests would take turns at the slot
        whatever their due times.)"""
        queue: list[_Pending] = self._queue._queue  # type: ignore[attr-defined]
        while queue and queue[0].future.done():
            self._dequeued(heapq.heappop(queue))  # its caller went away
        if not queue:
            return False
        head = queue[0]
        other = slots.first_waiting()
        return other is None or (head.level, head.due_ns) < other

    async def _execute(
        self, loop: asyncio.AbstractEventLoop, batch: list[_Pending], start_ns: int
    ) -> None:
        """Runs a formed batch (in a worker thread, or on the event loop for a model
        that runs fast) and delivers each request its outputs or its error."""
        for pending in batch:
            pending.started_ns = start_ns
            self.stats.queue_ns += start_ns - pending.enqueued_ns
            if pending.trace is not None:
                pending.trace.started(len(batch), sum(p.rows for p in batch))
        self.running, self._running_since_ns = len(batch), start_ns
        self._batch = batch
        try:
            if self._inline_below_ns and self._runs_fast():
                results = self._run_batch(batch)
            else:
                results = await loop.run_in_executor(self._executor, self._run_batch, batch)
        except Exception as exc:  # delivered to the callers, never kills the loop
            if len(batch) == 1:
                _deliver(batch[0].future, exc)
                return
            for pending in batch:  # isolate the culprit
                try:
                    single = await loop.run_in_executor(self._executor, self._run_batch, [pending])
                    _deliver(pending.future, single[0])
                except Exception as single_exc:
                    _deliver(pending.future, single_exc)
            return
        finally:
            self.running = 0
            self._batch = []
        elapsed_ns = self._clock() - start_ns
        weight = EWMA_WEIGHT if self.stats.executions else 1.0
        self._execution_ns += weight * (elapsed_ns - self._execution_ns)
        self._requests_per_execution += weight * (len(batch) - self._requests_per_execution)
        size = sum(p.rows for p in batch)
        self.stats.executions += 1
        self.stats.inferences += size
        self.stats.compute_ns += elapsed_ns
        count, total = self.stats.by_size.get(size, (0, 0))
        self.stats.by_size[size] = (count + 1, total + elapsed_ns)
        for pending, result in zip(batch, results, strict=True):
            _deliver(pending.future, result)

    def _runs_fast(self) -> bool:
        """The recent executions were short enough to run on the event loop: handing
        them to a thread and back costs more than they do."""
        return (
            self.stats.executions >= INLINE_AFTER_EXECUTIONS
            and self._execution_ns < self._inline_below_ns
        )

    def _in_time(self, pending: _Pending, now_ns: int) -> bool:
        return pending.expires_ns > now_ns or self._take(pending)

    def _run_batch(self, batch: list[_Pending]) -> list[list[Array]]:
        """Runs in a worker thread: one runtime call for the whole batch."""
        if len(batch) == 1:
            return [self._run(batch[0].inputs, self._outputs)]
        names = batch[0].inputs.keys()
        merged = {name: np.concatenate([p.inputs[name] for p in batch]) for name in names}
        outputs = self._run(merged, self._outputs)
        split: list[list[Array]] = []
        offset = 0
        for pending in batch:
            split.append([out[offset : offset + pending.rows] for out in outputs])
            offset += pending.rows
        return split


def answer_in_ns(
    batchers: Iterable[Batcher], slots: int, own: Batcher, level: int, due_ns: int, now_ns: int
) -> float | None:
    """About how long (ns) until a request for `own`, ranked (`level`, `due_ns`), would be
    answered by a worker of `slots` slots whose batchers are `batchers`: the work of
    every request ahead of it (waiting and ranked at or before it, and what the batches
    running have left) shared by the slots (none while a slot is free and nothing
    waits ahead), plus its own run at `own`'s recent mean. None when `own` has not run
    yet (nothing to go by)."""
    own_ns = own.per_request_ns()
    if own_ns is None:
        return None
    waiting = left = 0.0
    running = 0
    for batcher in batchers:
        work, rest = batcher.ahead(level, due_ns, now_ns)
        waiting += work
        if rest is not None:
            running += 1
            left += rest
    if waiting == 0.0 and running < slots:
        return own_ns
    return (waiting + left) / max(1, slots) + own_ns


def _deliver(future: asyncio.Future[list[Array]], result: list[Array] | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
