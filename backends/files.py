"""Writing a file so that readers never see a part of it: the compiler's artifacts and
records, and the gateway's ready file.

Imports nothing from the gateway, and no grpc, protobuf or runtime.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object], suffix: str = "") -> None:
    """`write` writes a hidden partial file beside `path` (`.NAME.partial` and `suffix`,
    for writers that go by a file's ending), which then replaces `path` in one rename:
    readers see the old file, or no file, or the whole new one. The partial file is
    synced before the rename and the folder after it, so a crash or power cut leaves
    the old file or the whole new one on disk too."""
    partial = path.with_name(f".{path.name}.partial{suffix}")
    write(partial)
    _fsync(partial, os.O_RDONLY)
    partial.replace(path)
    _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomically(path: Path, text: str) -> None:
    """`text` into `path`, atomically (`write_atomically`)."""
    write_atomically(path, lambda partial: partial.write_text(text))
