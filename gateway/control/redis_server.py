"""A private redis-server process: the store that `switchyard serve --processes N`
starts for its processes when the fleet names none, and that the shared-state tests
and bench start for themselves.

Imports redis and the standard library only: no grpc, no protobuf.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import redis


class RedisServer:
    """A redis-server of its own: on a Unix socket in `folder` (no TCP port, so none to
    pick), nothing kept on disk, so a restart starts empty as a store that lost its
    data does."""

    def __init__(
        self, folder: Path, executable: str = "redis-server", detached: bool = False
    ) -> None:
        """`detached`: in a session of its own (a terminal's Ctrl-C reaches this process,
        which stops it once done with it) and ending when this process ends, however
        it ends (Linux PR_SET_PDEATHSIG, armed before redis-server is executed)."""
        self.folder = folder
        self.executable = executable
        self.detached = detached
        self.socket = folder / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def find() -> str | None:
        """The redis-server executable on PATH, or None."""
        return shutil.which("redis-server")

    @property
    def url(self) -> str:
        return f"unix://{self.socket}?db=0"

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket), decode_responses=True)

    def start(self, timeout_s: float = 10.0) -> None:
        """Starts it; returns once it answers PING (RuntimeError with its log if it
        does not within `timeout_s`)."""
        log = self.folder / "redis.log"
        command = [
            self.executable,
            "--port",
            "0",
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.folder),
            "--logfile",
            str(log),
        ]
        if self.detached:
            command = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, start_new_session=self.detached
        )
        deadline = time.monotonic() + timeout_s
        client = self.client()
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited ({self.process.returncode}): {_tail(log)}"
                    )
                try:
                    if self.socket.exists() and client.ping():
                        return
                except (redis.RedisError, OSError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server not answering after {timeout_s:g} s")
                time.sleep(0.01)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        self.socket.unlink(missing_ok=True)


_DIE_WITH_PARENT = (
    "import os, sys; from backends.process import die_with_parent; "
    "die_with_parent(int(sys.argv[1])); os.execvp(sys.argv[2], sys.argv[2:])"
)
"""Arms the parent-death signal, then becomes the command (the signal stays armed
across exec)."""


def _tail(path: Path) -> str:
    try:
        return path.read_text()[-2000:]
    except OSError:
        return "(no log)"
