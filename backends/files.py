"""Files the backends write and read with care: writing so that readers never see a part
of a file (the compiler's artifacts and records, the gateway's ready file), reading a
variant's artifact from inside its folder only, once, and copying verified bytes into a
private file for a runtime that loads only from a path.

Imports nothing from the gateway, and no grpc, protobuf or runtime.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath


class UnsafePath(Exception):
    """A path that must stay inside a folder would leave it, or names no regular file
    reached without symbolic links."""


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


def confined_parts(relative: str) -> tuple[str, ...]:
    """The components of `relative`, a path that must name something inside a folder;
    UnsafePath when it is empty, absolute, or has `..`, `.`, empty or backslashed parts
    (nothing that could be read as another folder's file)."""
    if not relative:
        raise UnsafePath("is empty")
    if "\x00" in relative:
        raise UnsafePath("contains a NUL character")
    if "\\" in relative:
        raise UnsafePath("contains a backslash")
    if PurePosixPath(relative).is_absolute():
        raise UnsafePath("is absolute")
    parts = tuple(relative.split("/"))
    if ".." in parts:
        raise UnsafePath("has a '..' component")
    if "." in parts or "" in parts:
        raise UnsafePath("is not in normal form (an empty or '.' component)")
    return parts


_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
# Never blocks opening a FIFO planted where a file should be; no effect on regular files.
_FILE_FLAGS = _READ_FLAGS | os.O_NONBLOCK
_DIR_FLAGS = _READ_FLAGS | os.O_DIRECTORY


def read_confined(folder: Path, relative: str) -> bytes:
    """The bytes of the regular file `relative` names inside `folder`, read once through
    one open file descriptor.

    Each component is opened relative to the one before with O_NOFOLLOW, so a symbolic
    link anywhere in `relative`, whether it points inside `folder` or out of it, is
    refused, and the file read is the one opened: nothing can swap it between a check
    and the read. UnsafePath says why a path is refused; FileNotFoundError when nothing
    is there."""
    parts = confined_parts(relative)
    directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            inner = _open_at(part, _DIR_FLAGS, directory, relative)
            os.close(directory)
            directory = inner
        fd = _open_at(parts[-1], _FILE_FLAGS, directory, relative)
    finally:
        os.close(directory)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePath("is not a regular file")
        return handle.read()


def _open_at(name: str, flags: int, directory: int, relative: str) -> int:
    try:
        return os.open(name, flags, dir_fd=directory)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        # O_NOFOLLOW refuses a link with ELOOP, or ENOTDIR where a folder was asked for.
        if exc.errno == errno.ELOOP or stat.S_ISLNK(
            os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode
        ):
            raise UnsafePath(f"goes through a symbolic link ({name!r})") from exc
        raise UnsafePath(f"goes through {name!r}, which is not a folder") from exc


@contextlib.contextmanager
def private_copy(data: bytes, suffix: str = "") -> Iterator[Path]:
    """`data` in a new file (mode 0600) in a new folder only this user can enter (0700),
    both removed on the way out: for a runtime that loads a file by path (a shared
    library), so it loads these bytes and no other."""
    folder = tempfile.mkdtemp(prefix="switchyard-artifact-")
    try:
        fd, name = tempfile.mkstemp(suffix=suffix, dir=folder)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        yield Path(name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def empty_private_folder() -> Iterator[Path]:
    """A new empty folder only this user can enter (0700), removed on the way out."""
    folder = tempfile.mkdtemp(prefix="switchyard-empty-")
    try:
        yield Path(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
