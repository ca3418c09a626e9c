"""Files, safely: an input read within a size limit (and refused when it is no regular file),
an output replaced durably, and the sha256 that records and checks a file."""
from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from screener.io.structure import Problem


def read_bytes(path: Path, limit: int) -> bytes:
    """`read_limited` for inputs, where a file that cannot be read is that input's failure."""
    try:
        return read_limited(path, limit)
    except OSError as error:
        raise Problem("read", f"cannot read file: {error}") from error


def read_limited(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. Anything else is refused before it
    is read: a FIFO or a device would block or never end, and a socket cannot be opened. The
    open does not block and the check is made again on what was opened, in case the path was
    replaced in between."""
    kind = _not_regular(os.stat(path).st_mode)
    if kind is None:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        with os.fdopen(fd, "rb") as fh:
            kind = _not_regular(os.fstat(fd).st_mode)
            data = b"" if kind else fh.read(limit + 1)
    if kind:
        raise Problem("read", f"{kind}, not a regular file")
    if len(data) > limit:
        raise Problem("read", f"larger than the {limit >> 20} MiB limit for this kind of input")
    return data


def _not_regular(mode: int) -> str | None:
    """What a file that is not a regular file is, in words; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISSOCK: "a socket",
             stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
             stat.S_ISDIR: "a folder"}
    return next((name for test, name in kinds.items() if test(mode)), "a special file")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def portable_path(path: str | Path) -> str:
    """`path` relative to the working directory, as a record of where an input lay: a
    checkpoint that stored absolute paths would name them only on the machine it was made on,
    while a relative one holds on any clone used from the same folder (the sha256 beside it
    says whether the file found there is the same)."""
    return Path(os.path.relpath(Path(path).resolve())).as_posix()


def tmp_path(path: Path) -> Path:
    """Where `path` is written before it replaces the file: beside it, so the rename is atomic."""
    return path.with_name(path.name + ".tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write `path` through: after the block it replaces `path` durably, so
    a reader or a crash sees the old file or the new one, never half of one; after an error it
    is deleted."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        yield tmp
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, final: Path) -> None:
    """fsync the data before the rename and the directory after it: a crash leaves old or new."""
    fsync(tmp)
    os.replace(tmp, final)
    fsync(final.parent)
