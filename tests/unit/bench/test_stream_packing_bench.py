"""`python -m gateway.bench.stream_packing`: packing and unpacking agree, and a short run
against its echo server (a process of its own) answers every request at each packing."""

from __future__ import annotations

import subprocess
import sys

from gateway.bench.stream_packing import pack, unpack


def test_unpack_reads_what_pack_wrote() -> None:
    items = [b"", b"a", bytes(range(256)) * 50]
    assert unpack(pack(items)) == items
    assert unpack(b"") == []


def test_a_short_run_prints_a_figure_for_each_packing() -> None:
    run = subprocess.run(
        [
            *(sys.executable, "-m", "gateway.bench.stream_packing"),
            *("--requests", "64", "--rounds", "1", "--packs", "1", "4"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = run.stdout.splitlines()
    assert [line.split(" a message")[0] for line in lines] == ["1", "4"], run.stdout
    assert all("requests/s" in line and "server" in line for line in lines)
