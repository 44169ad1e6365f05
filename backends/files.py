"""Writing a file so that readers never see a part of it: the compiler's artifacts and
records, and the gateway's ready file.

Imports nothing from the gateway, and no grpc, protobuf or runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object], suffix: str = "") -> None:
    """`write` writes a hidden partial file beside `path` (`.NAME.partial` and `suffix`,
    for writers that go by a file's ending), which then replaces `path` in one rename:
    readers see the old file, or no file, or the whole new one."""
    partial = path.with_name(f".{path.name}.partial{suffix}")
    write(partial)
    partial.replace(path)


def write_text_atomically(path: Path, text: str) -> None:
    """`text` into `path`, atomically (`write_atomically`)."""
    write_atomically(path, lambda partial: partial.write_text(text))
