"""The control state shared by several gateways that route as one (`gateway.state:
redis://HOST:PORT/DB`): the admin API's prices, policies, drains and routing rule,
the price schedule's start and prices, the backends each gateway's outlier
detection ejected (until when by the wall clock, the count in the run, by whom and
why: `Control.share_ejection`), and the backends' carbon figures set through the admin
API or by a carbon feed, in one Redis store.

The whole `ControlState` is one JSON value (gateway.control.state's format) in a hash
with a version and an epoch (a new one whenever the value is created afresh, as after
a store lost its data); its carbon figures are a field of their own in that hash
(`carbon`), which a gateway of a version that does not know them never reads or
writes, so it keeps them through its writes. A gateway writes its changes as a
read-modify-write in a WATCH/MULTI transaction: the changes from the state it last
read, made on the state stored now (`merge_state`), so two gateways' changes of
different values never undo each other. Each write publishes `epoch:version` on a
channel; every gateway listens, and every `resync_s` reads the version anyway (a lost
message costs at most that long), and applies a newer state to its live fleet
(`Control.apply_state`).

A store that cannot be reached changes nothing in serving: each gateway keeps the
last state it knew, says so (a warning, `switchyard_state_store_up` 0) and keeps its
own changes; when the store is back they are written (on top of what the others
wrote meanwhile) and the others' changes applied. A store that lost its data is
written again from what the gateway knows.

Singletons (the price schedule's player, each feed's poller) take a `RedisLease`:
`SET key owner NX PX`, renewed every third of its time, released at stop; held while
renewed in time.

Imports redis-py's asyncio client and the control state: no grpc, no protobuf.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, WatchError

from backends.protocol.errors import InvalidInput
from gateway.control.state import (
    ControlState,
    StateError,
    decode_carbon,
    decode_state,
    encode_carbon,
    encode_state,
    merge_state,
)

log = logging.getLogger("switchyard.control")

KEY = "switchyard:state"
"""The hash holding the state (`state`, `version`, `epoch`, and `carbon`: its carbon
figures)."""
CHANNEL = "switchyard:state:changed"
"""Where each new `epoch:version` is announced."""
LEASE_PREFIX = "switchyard:lease:"

RESYNC_S = 0.5
"""How often a gateway reads the stored version whatever it heard: the longest a lost
announcement delays a change."""
WRITE_TIMEOUT_S = 1.0
"""How long an admin call waits for its change to be stored before answering that it is
applied here and not shared yet."""
COMMAND_TIMEOUT_S = 1.0
"""A Redis command's longest wait (connect or answer) before the store counts as down."""
LEASE_TTL_S = 3.0
"""A lease lasts this long unless renewed (every third of it)."""
CLOSE_WAIT_S = 2.0
"""How long `close` waits for the store's background tasks once cancelled."""

Job = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


def redacted(url: str) -> str:
    """The store's URL without a password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urlunsplit(parts._replace(netloc=user + host))


def owner_id() -> str:
    """Who holds a lease: this host and process, and a token for this gateway."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True, slots=True)
class Head:
    """Which stored state: its epoch (new when the value was created afresh) and its
    version (one more at each write)."""

    epoch: str
    version: int


class RedisStateStore:
    """The control state in Redis, shared by the gateways that name the same store.
    A `StateStore` whose `load` and `save` are the state this gateway knows, and whose
    writes and reads run in the background (`start`), `flush` waiting for a write."""

    def __init__(
        self,
        client: aioredis.Redis,
        where: str,
        up: Callable[[bool], None],
        *,
        resync_s: float = RESYNC_S,
        write_timeout_s: float = WRITE_TIMEOUT_S,
        key: str = KEY,
        channel: str = CHANNEL,
    ) -> None:
        """`up` is told whether the store answers, on every attempt (the gauge)."""
        self._client = client
        self._where = where
        self._report_up = up
        self._resync_s = resync_s
        self._write_timeout_s = write_timeout_s
        self._key = key
        self._channel = channel
        self._base = ControlState()
        """The stored state as last read or written here."""
        self._head: Head | None = None
        """Its epoch and version; None: none read yet."""
        self._mine = ControlState()
        """The state in force here: `_base` with the changes not stored yet."""
        self._saved = 0
        """States saved here so far."""
        self._stored = 0
        """Of those, how many are stored."""
        self._attempts = 0
        self._error: str | None = None
        self._up: bool | None = None
        self._apply: Callable[[ControlState], None] = lambda state: None
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self._leases: list[RedisLease] = []

    @classmethod
    def from_url(cls, url: str, up: Callable[[bool], None], **kwargs: Any) -> RedisStateStore:
        """A store at `url` (redis-py's forms: redis://, rediss://, unix://);
        InvalidInput naming the URL when redis-py cannot read it."""
        try:
            client = aioredis.Redis.from_url(
                url,
                decode_responses=True,
                socket_timeout=COMMAND_TIMEOUT_S,
                socket_connect_timeout=COMMAND_TIMEOUT_S,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as exc:
            raise InvalidInput(f"gateway.state {redacted(url)}: {exc}") from exc
        return cls(client, f"shared store {redacted(url)}", up, **kwargs)

    @property
    def where(self) -> str:
        return self._where

    @property
    def shared(self) -> bool:
        return True

    @property
    def up(self) -> bool:
        """The store answered the last attempt."""
        return bool(self._up)

    def load(self) -> ControlState:
        return self._mine

    def save(self, state: ControlState) -> None:
        self._mine = state
        self._saved += 1
        self._wake.set()

    async def flush(self) -> str | None:
        target = self._saved
        if self._stored >= target:
            return None
        attempts = self._attempts
        self._wake.set()

        def settled() -> bool:
            failed = self._attempts > attempts and self._error is not None
            return self._stored >= target or failed

        try:
            async with asyncio.timeout(self._write_timeout_s), self._progress:
                await self._progress.wait_for(settled)
        except TimeoutError:
            return f"{self._where} did not store it within {self._write_timeout_s:g} s"
        if self._stored >= target:
            return None
        return f"{self._where} is unreachable ({self._error})"

    async def connect(self) -> None:
        """Reads the stored state (before `Control.restore`, which loads it). A store
        that cannot be reached is logged; the gateway starts from its fleet file and
        takes the stored state when the store answers."""
        try:
            fields = await self._client.hgetall(self._key)  # type: ignore[misc]
            head, stored = self._decode(fields)
        except (RedisError, OSError) as exc:
            self._set_up(False, f"{type(exc).__name__}: {exc}")
            return
        self._set_up(True)
        if head is not None:
            self._base = self._mine = stored
            self._head = head

    def start(self, apply: Callable[[ControlState], None]) -> None:
        """Keeps the store and this gateway in step from now on: writes what is saved
        here, and hands each newer stored state (with this gateway's changes not yet
        stored on top) to `apply`."""
        self._apply = apply
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._listen()), loop.create_task(self._keep_in_step())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: a cancellation that lands inside a redis-py command can be lost
            # there (the task goes on to its next wait), and a gateway that stops must
            # not wait for it forever.
            _, stuck = await asyncio.wait(self._tasks, timeout=CLOSE_WAIT_S)
            for task in stuck:
                log.warning("shared store task %s did not stop when cancelled", task.get_name())
        for lease in self._leases:
            await lease.release()
        await self._client.aclose()

    def lease(self, name: str, ttl_s: float = LEASE_TTL_S) -> RedisLease:
        """A lease called `name` in this store (released at `close`)."""
        lease = RedisLease(self._client, LEASE_PREFIX + name, owner_id(), ttl_s)
        self._leases.append(lease)
        return lease

    # ---- in the background ---------------------------------------------------------

    async def _listen(self) -> None:
        """Wakes the sync on each announcement; after (re)subscribing, once anyway."""
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                self._wake.set()
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=self._resync_s
                    )
                    if message is not None:
                        self._wake.set()
            except (RedisError, OSError):
                _raise_if_cancelled()  # else the sync reports the store down
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            _raise_if_cancelled()
            await asyncio.sleep(self._resync_s)

    async def _keep_in_step(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._resync_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._sync()
                self._error = None
                self._set_up(True)
            except (RedisError, OSError) as exc:
                _raise_if_cancelled()
                self._error = f"{type(exc).__name__}: {exc}"
                self._set_up(False, self._error)
            self._attempts += 1
            async with self._progress:
                self._progress.notify_all()

    async def _sync(self) -> None:
        epoch, version = await self._client.hmget(self._key, ["epoch", "version"])  # type: ignore[misc]
        missing = epoch is None or version is None
        if self._mine != self._base or (missing and self._mine != ControlState()):
            await self._write()
        elif not missing and Head(str(epoch), int(version)) != self._head:
            fields = await self._client.hgetall(self._key)  # type: ignore[misc]
            head, stored = self._decode(fields)
            if head is not None:
                self._absorb(head, stored, self._base)

    async def _write(self) -> None:
        mine, saved = self._mine, self._saved
        async with self._client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self._key)
                    head, stored = self._decode(await pipe.hgetall(self._key))  # type: ignore[misc]
                    # A value created afresh gets everything known here.
                    base = self._base if head is not None else ControlState()
                    merged = merge_state(stored, base, mine)
                    new = Head(
                        uuid.uuid4().hex if head is None else head.epoch,
                        1 if head is None else head.version + 1,
                    )
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(
                        self._key,
                        mapping={
                            "state": encode_state(merged),
                            "carbon": encode_carbon(merged),
                            "epoch": new.epoch,
                            "version": new.version,
                        },
                    )
                    pipe.publish(self._channel, f"{new.epoch}:{new.version}")
                    await pipe.execute()
                    break
                except WatchError:
                    continue  # another gateway wrote in between: merge onto theirs
        self._stored = max(self._stored, saved)
        self._absorb(new, merged, mine)

    def _absorb(self, head: Head, stored: ControlState, known: ControlState) -> None:
        """Makes `stored` the base; the state here becomes it with the changes made
        here since `known` on top, and is applied when it differs."""
        local = merge_state(stored, known, self._mine)
        self._base, self._head = stored, head
        if local != self._mine:
            self._mine = local
            self._apply(local)
        if local == stored:
            self._stored = self._saved

    def _decode(self, fields: dict[str, str]) -> tuple[Head | None, ControlState]:
        """The stored head and state; (None, empty) when there is none, or when what
        is there is not a state (logged: it is written afresh)."""
        if not fields:
            return None, ControlState()
        try:
            head = Head(fields["epoch"], int(fields["version"]))
            source = f"{self._where} key {self._key}"
            state = decode_state(fields["state"], source)
            carbon = decode_carbon(fields.get("carbon"), source)
            return head, replace(state, carbon=carbon)
        except (KeyError, ValueError, StateError) as exc:
            log.error("%s holds no valid state, writing it afresh: %s", self._where, exc)
            return None, ControlState()

    def _set_up(self, up: bool, why: str = "") -> None:
        if up != self._up:
            if up:
                log.info("%s reachable: control state shared", self._where)
            else:
                log.warning(
                    "%s unreachable, serving on the last known state and keeping this "
                    "gateway's changes until it is back: %s",
                    self._where,
                    why,
                )
        self._up = up
        self._report_up(up)


_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisLease:
    """One holder at a time of `key` among the gateways: `SET key owner NX PX ttl`,
    renewed every third of the ttl. Held from a successful take or renewal until the ttl
    after it was sent, so a holder cut off from the store stops before another can take
    it."""

    def __init__(self, client: aioredis.Redis, key: str, owner: str, ttl_s: float) -> None:
        self._client = client
        self.key = key
        self.owner = owner
        self.ttl_s = ttl_s
        self._held_until = 0.0

    @property
    def name(self) -> str:
        return self.key.removeprefix(LEASE_PREFIX)

    async def take(self) -> bool:
        """Takes or renews the lease; whether it is held now."""
        loop = asyncio.get_running_loop()
        sent = loop.time()
        ttl_ms = max(1, int(self.ttl_s * 1000))
        try:
            taken = await self._client.set(self.key, self.owner, nx=True, px=ttl_ms)
            if not taken:
                taken = bool(await self._client.eval(_RENEW, 1, self.key, self.owner, str(ttl_ms)))  # type: ignore[misc]
        except (RedisError, OSError):
            _raise_if_cancelled()
            return loop.time() < self._held_until
        self._held_until = sent + self.ttl_s if taken else 0.0
        return bool(taken)

    async def release(self) -> None:
        if self._held_until == 0.0:
            return
        self._held_until = 0.0
        with contextlib.suppress(RedisError, OSError):
            await self._client.eval(_RELEASE, 1, self.key, self.owner)  # type: ignore[misc]

    async def hold(self, job: Job, stop: asyncio.Event) -> None:
        """Runs `job` while this gateway holds the lease: it starts once taken, is told
        to stop (its event) when the lease is lost, and starts again when taken again.
        Returns at `stop` or when `job` ends on its own (the lease released)."""
        running: asyncio.Task[None] | None = None
        job_stop = asyncio.Event()
        try:
            while not stop.is_set():
                held = await self.take()
                if running is not None and running.done():
                    if not running.cancelled() and running.exception() is not None:
                        log.error("lease %s: its job failed: %r", self.name, running.exception())
                    return
                if held and running is None:
                    log.info("lease %s taken by %s", self.name, self.owner)
                    job_stop = asyncio.Event()
                    running = asyncio.get_running_loop().create_task(job(job_stop))
                elif not held and running is not None:
                    log.warning("lease %s lost by %s", self.name, self.owner)
                    job_stop.set()
                    await running
                    running = None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.ttl_s / 3):
                        await stop.wait()
        finally:
            job_stop.set()
            if running is not None:
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running
            await self.release()


async def run_leased(lease: RedisLease | None, job: Job, stop: asyncio.Event) -> None:
    """`job` under `lease`; with no lease (one gateway), it runs at once until `stop`."""
    if lease is None:
        await job(stop)
    else:
        await lease.hold(job, stop)


def _raise_if_cancelled() -> None:
    """CancelledError when the running task has been asked to stop: redis-py can answer
    a cancellation that lands inside a command with a connection error instead, which a
    loop that outlives store outages would otherwise take for one and go on, and its
    `close` would wait for it forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
