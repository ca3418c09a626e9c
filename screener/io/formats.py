"""The input formats, one row each: how a file of it is named and how it is read; and `load`,
which reads and validates one input of any of them."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from screener.io.cif import read_cif
from screener.io.files import read_bytes
from screener.io.poscar import read_poscar
from screener.io.records import from_record, load_records
from screener.io.structure import Failure, Problem, Source, Structure, validated
from screener.io.text import decode
from screener.io.xyz import read_xyz

# Reads stop here, so no input can exhaust a worker's memory: a POSCAR of MAX_ATOMS atoms is
# about 0.3 MB; a JSON record list (after gunzip) is parsed whole in the driver.
MAX_FILE_BYTES = 64 << 20

Reader = Callable[[str], tuple[np.ndarray, np.ndarray, list[str]]]


@dataclass(frozen=True)
class Format:
    """A file format: name endings (matched in any case) and name starts (as written) that
    mark its files, and the reader of one file's text; None for a list of records, which
    `discover` turns into one input per record."""

    name: str
    suffixes: tuple[str, ...]
    prefixes: tuple[str, ...]
    read: Reader | None

    @property
    def patterns(self) -> tuple[str, ...]:
        return (*(f"{p}*" for p in self.prefixes), *(f"*{s}" for s in self.suffixes))


FORMATS = (
    Format("poscar", (".vasp", ".poscar"), ("POSCAR", "CONTCAR"), read_poscar),
    Format("cif", (".cif",), (), read_cif),
    Format("xyz", (".xyz", ".extxyz"), (), read_xyz),
    Format("json", (".json", ".json.gz"), (), None),
)
FILE_TYPES = ", ".join(pattern for f in FORMATS for pattern in f.patterns)


def format_of(name: str) -> Format | None:
    """The format of a file name: by its ending, else by its start (POSCAR.cif is a CIF)."""
    lower = name.lower()
    return (next((f for f in FORMATS if lower.endswith(f.suffixes)), None)
            or next((f for f in FORMATS if f.prefixes and name.startswith(f.prefixes)), None))


def load(source: Source) -> Structure | Failure:
    """Parse and validate one input; never raises, so one bad file cannot stop a run.
    Numpy warnings are silenced because non-finite values are reported as failures."""
    try:
        with np.errstate(all="ignore"):
            if source.record is not None:
                lattice, positions, symbols = from_record(source.record)
            else:
                lattice, positions, symbols = read_file(Path(source.origin))
            return validated(source, lattice, positions, symbols)
    except Problem as problem:
        return Failure(source.id, source.origin, problem.stage, problem.reason)
    except Exception as error:  # noqa: BLE001 -- a worker must survive any input
        return Failure(source.id, source.origin, "read", f"{type(error).__name__}: {error}")


def read_file(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Lattice, cartesian positions and element symbols of one structure file."""
    found = format_of(path.name)
    if found is None:
        raise Problem("read", f"unrecognised file type {path.name!r}: expected {FILE_TYPES}")
    if found.read is None:
        load_records(path)
        raise Problem("read", "a JSON record list is loaded per record: use discover()")
    text = decode(read_bytes(path, MAX_FILE_BYTES))
    if not text.strip():
        raise Problem("validate", "empty file")
    return found.read(text)
