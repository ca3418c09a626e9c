"""Finding the inputs under a path: every file, in sorted order, and every record of a JSON
list, each named by an id that a rerun gives it again."""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from screener.io.formats import FORMATS, format_of
from screener.io.records import file_sources
from screener.io.structure import Source

_ID_PREFIX = re.compile(r"^(POSCAR|CONTCAR)[-_]")
_ID_SUFFIXES = tuple(suffix for f in FORMATS if f.read is not None for suffix in f.suffixes)


def discover(path: str | Path) -> Iterator[Source]:
    """Yield one Source per input structure, in sorted order, without parsing any file
    except JSON record lists (one Source per record). Hidden files and folders are skipped;
    files of unknown type are still yielded so that `load` reports them."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no such file or folder: {root}")
    base = root if root.is_dir() else root.parent
    files = _walk(root, set()) if root.is_dir() else iter([root])
    for file in files:
        found = format_of(file.name)
        if found is not None and found.read is None:
            yield from file_sources(file)
        else:
            yield Source(_file_id(file, base), str(file), None)


def _walk(folder: Path, seen: set[tuple[int, int]]) -> Iterator[Path]:
    """Depth-first, sorted by name; follows links to folders but walks each folder once."""
    stat = folder.stat()
    if (stat.st_dev, stat.st_ino) in seen:
        return
    seen.add((stat.st_dev, stat.st_ino))
    with os.scandir(folder) as scan:
        entries = sorted((e for e in scan if not e.name.startswith(".")), key=lambda e: e.name)
    for entry in entries:
        try:
            is_dir = entry.is_dir()
        except OSError:  # a symlink loop: `load` reports it as this input's failure
            is_dir = False
        if is_dir:
            yield from _walk(Path(entry.path), seen)
        else:
            yield Path(entry.path)


def _file_id(file: Path, base: Path) -> str:
    """The path below `base` without POSCAR-/CONTCAR- and the format's ending; a file named
    just POSCAR takes its folder's name."""
    rel = file.relative_to(base)
    if rel.name == "POSCAR":
        return rel.parent.as_posix() if rel.parent != Path(".") else base.resolve().name
    name = _ID_PREFIX.sub("", rel.name)
    if name.lower().endswith(_ID_SUFFIXES):
        name = name.rsplit(".", 1)[0]
    return (rel.parent / name).as_posix()
