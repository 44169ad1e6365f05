"""What a Switchyard process arranges about itself when it starts: to end when the
process that started it ends (Linux PR_SET_PDEATHSIG), and to run asyncio on uvloop
where it is installed. The worker, the gateway, the load generator and the benches all
start this way.

Imports nothing from the gateway, and no grpc or protobuf.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import signal
import sys
from collections.abc import Callable

PARENT_PID_ENV = "SWITCHYARD_PARENT_PID"
"""Set by the gateway for the workers it launches: its pid (the worker arms
`die_with_parent` with it first thing)."""
PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Asks the kernel to send this process SIGTERM when its parent exits, then checks
    that its parent is still `parent_pid`: a parent that was gone before the signal was
    armed (which the signal alone would never report) ends this process at once.
    Nothing where prctl is not to be had (not Linux).

    Call it first thing in the child (as the worker does), or between fork and exec
    through `dies_with_this_process` from a single-threaded parent (the benches); never
    as a `preexec_fn` from the threaded gateway, where running Python in the forked
    child can crash it."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        sys.exit(f"the process that started this one ({parent_pid}) is gone")


def stop_on_signals() -> asyncio.Event:
    """An event set when SIGTERM or SIGINT arrives (handled on the running loop): what a
    server process awaits before its orderly stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def dies_with_this_process() -> Callable[[], None]:
    """A `preexec_fn` for subprocess: the child dies with this process
    (`die_with_parent`)."""
    return functools.partial(die_with_parent, os.getpid())


def use_uvloop() -> None:
    """asyncio runs on uvloop from now on, where uvloop is installed."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
