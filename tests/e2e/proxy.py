"""A TCP proxy for network faults, on 127.0.0.1 (port 0) in an event loop of its own
thread, so it keeps forwarding whatever the test's own loop or threads are doing.

`blackhole` is a partition as TCP sees one: connections stay open (new ones are
accepted too) but nothing is forwarded either way; what was sent waits in the socket
buffers, as it would in retransmission, and is delivered on `heal` unless an end gave
up on the connection meanwhile. `retarget` sends new connections to another upstream
(the one behind the address restarted elsewhere)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
CHUNK_BYTES = 64 * 1024


class Proxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.address = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._open = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> Proxy:
        self._thread.start()
        self._call(self._start())
        return self

    def blackhole(self) -> None:
        """Forward nothing more, in either direction, keeping every connection open."""
        self._loop.call_soon_threadsafe(self._open.clear)

    def heal(self) -> None:
        """Forward again (what waited first)."""
        self._loop.call_soon_threadsafe(self._open.set)

    def retarget(self, upstream: str) -> None:
        """New connections go to `upstream`; open ones stay where they are."""
        self.upstream = upstream

    def close(self) -> None:
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _start(self) -> None:
        self._open.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        self._open.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._open.wait()  # a partitioned connection reaches nothing
            host, port = self.upstream.rsplit(":", 1)
            try:
                up_reader, up_writer = await asyncio.open_connection(host, int(port))
            except OSError:
                return  # the upstream is gone: the client sees the connection close
            self._writers.add(up_writer)
            try:
                pumps = [
                    asyncio.ensure_future(self._pump(reader, up_writer)),
                    asyncio.ensure_future(self._pump(up_reader, writer)),
                ]
                # Either end closing closes the other: no half-open HTTP/2 connections.
                _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                for pump in pending:
                    pump.cancel()
            finally:
                self._writers.discard(up_writer)
                up_writer.close()
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                data = await source.read(CHUNK_BYTES)
                await self._open.wait()  # an end's close crosses no partition either
                if not data:
                    return
                sink.write(data)
                await sink.drain()
