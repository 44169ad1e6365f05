"""What one message on a grpc.aio bidirectional stream costs, against the requests it
carries: the question behind packing several requests into one stream message on the
gateway's hop.

    python -m gateway.bench.stream_packing [--requests 20000] [--rounds 2] [--packs 1 2 4]

An echo server in a process of its own (uvloop) answers each message with one small
answer (64 bytes) per request it carries; the client keeps 16 requests of 12 KB (a
tinyconv image's size) in flight on one stream, sent `k` to a message (length-prefixed),
each pack sent again as soon as the answers to as many have come. Prints the requests a
second and the CPU time (user + system, /proc) each process spent a request, for each
`k`, the rounds taking turns. What it leaves out: inference, routing, protobuf.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import uvloop

SERVICE, METHOD = "bench.Echo", "Stream"
REQUEST_BYTES = 12 * 1024
ANSWER_BYTES = 64
IN_FLIGHT = 16


def pack(items: Sequence[bytes]) -> bytes:
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


def unpack(data: bytes) -> list[bytes]:
    items, at = [], 0
    while at < len(data):
        size = int.from_bytes(data[at : at + 4], "little")
        items.append(data[at + 4 : at + 4 + size])
        at += 4 + size
    return items


async def serve(port_file: Path) -> None:
    async def stream(
        messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for message in messages:
            yield pack([item[:ANSWER_BYTES] for item in unpack(message)])

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.stream_stream_rpc_method_handler(stream)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await asyncio.to_thread(port_file.write_text, str(port))
    await server.wait_for_termination()


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(port: int, k: int, requests: int, server_pid: int) -> tuple[float, float, float]:
    """Requests a second, and client and server CPU microseconds a request."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(f"/{SERVICE}/{METHOD}")()
        message = pack([os.urandom(REQUEST_BYTES)] * k)
        room = asyncio.Semaphore(IN_FLIGHT // k)
        answered = 0
        sent = 0
        all_answered = asyncio.Event()

        async def read() -> None:
            nonlocal answered
            while True:
                data = await call.read()
                if data is grpc.aio.EOF:
                    return
                answered += len(unpack(data))
                room.release()
                if answered >= requests:
                    all_answered.set()

        reader = asyncio.ensure_future(read())
        client0, server0, started = cpu_s(os.getpid()), cpu_s(server_pid), time.perf_counter()
        while sent < requests:
            await room.acquire()
            await call.write(message)
            sent += k
        await all_answered.wait()
        elapsed = time.perf_counter() - started
        client1, server1 = cpu_s(os.getpid()), cpu_s(server_pid)
        await call.done_writing()
        await reader
    return (
        answered / elapsed,
        (client1 - client0) * 1e6 / answered,
        (server1 - server0) * 1e6 / answered,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="a multiple of 4")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--packs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        uvloop.run(serve(args.serve))
        return 0
    with tempfile.TemporaryDirectory() as folder:
        port_file = Path(folder) / "port"
        server = subprocess.Popen(
            [sys.executable, "-m", "gateway.bench.stream_packing", "--serve", str(port_file)]
        )
        try:
            while not (port_file.exists() and port_file.read_text()):
                if server.poll() is not None:
                    raise SystemExit("the echo server did not start")
                time.sleep(0.05)
            port = int(port_file.read_text())
            for _ in range(args.rounds):
                for k in args.packs:
                    rate, client_us, server_us = uvloop.run(
                        drive(port, k, args.requests, server.pid)
                    )
                    print(
                        f"{k} a message: {rate:,.0f} requests/s, CPU a request: "
                        f"client {client_us:.0f} us, server {server_us:.0f} us",
                        flush=True,
                    )
        finally:
            server.kill()
            server.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
