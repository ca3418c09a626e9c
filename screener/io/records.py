"""JARVIS records (json, json.gz): a list of dicts whose `atoms` holds a structure; the one rule
for a record's id, its origin `file[i]`, and its reference gap."""
from __future__ import annotations

import gzip
import io
import json
import math
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from screener.io.files import read_bytes, read_limited
from screener.io.structure import Problem, Source
from screener.io.text import decode

MAX_RECORDS_BYTES = 2 << 30
JARVIS_GAP_KEY = "optb88vdw_bandgap"
_ORIGIN = re.compile(r"^(?P<file>.+\.json(\.gz)?)\[(?P<index>\d+)\]$")


def file_sources(file: Path) -> Iterator[Source]:
    """A record without an `atoms` dict gets {} so that `load` names what is missing; a file
    that cannot be read as records becomes one file Source so that `load` reports why."""
    try:
        records = load_records(file)
    except Problem:
        yield Source(file.name.split(".")[0], str(file), None)
        return
    yield from record_sources(file, records)


def record_sources(file: str | Path, records: list) -> Iterator[Source]:
    """One Source per record of `file` as `read_records` returned them, in order: for callers
    that need the records' other fields too, without reading the file twice."""
    file = Path(file)
    for i, record in enumerate(records):
        atoms = record.get("atoms") if isinstance(record, dict) else None
        yield Source(record_id(record, file, i), record_origin(file, i),
                     atoms if isinstance(atoms, dict) else {})


def record_id(record: object, file: str | Path, index: int) -> str:
    """A record's id: its `jid`, else its `id`, else `<file name before its first dot>[index]`."""
    fields = record if isinstance(record, dict) else {}
    found = fields.get("jid") or fields.get("id")
    return str(found) if found else f"{Path(file).name.split('.')[0]}[{index}]"


def record_origin(file: str | Path, index: int) -> str:
    """Where record `index` of `file` came from, as failures and shortlists name it."""
    return f"{file}[{index}]"


def parse_origin(text: str) -> tuple[str, int] | None:
    """(file, index) of a `record_origin`; None for any other input's origin."""
    match = _ORIGIN.match(text)
    return None if match is None else (match["file"], int(match["index"]))


def reference_gap(record: dict, key: str = JARVIS_GAP_KEY) -> float:
    """A record's reference gap in eV; NaN where unknown (JARVIS writes 'na')."""
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return math.nan


def reference_gaps(records: Iterable[object], file: str | Path, key: str = JARVIS_GAP_KEY
                   ) -> dict[str, float]:
    """Each record's reference gap by its id (record_id); records that are no dict skipped."""
    return {record_id(record, file, i): reference_gap(record, key)
            for i, record in enumerate(records) if isinstance(record, dict)}


def read_records(file: str | Path) -> list:
    """Every record of a JARVIS json or json.gz file, a lone record as a list of one: the one
    reader of record files, so a record read again later (a shortlist's source) is the record
    `discover` read. A file that cannot be read raises its OSError as is; content that is not a
    list of records raises a ValueError whose message says what is wrong."""
    file = Path(file)
    return _parse_records(read_limited(file, MAX_RECORDS_BYTES), file.name)


def load_records(file: Path) -> list:
    """`read_records` for `discover` and `load`, where an unreadable file is a problem too."""
    return _parse_records(read_bytes(file, MAX_RECORDS_BYTES), file.name)


def _parse_records(data: bytes, name: str) -> list:
    if name.lower().endswith(".gz"):
        try:
            data = gzip.GzipFile(fileobj=io.BytesIO(data)).read(MAX_RECORDS_BYTES + 1)
        except (OSError, EOFError, zlib.error) as error:
            raise Problem("read", f"not readable gzip data: {error}") from error
        if len(data) > MAX_RECORDS_BYTES:
            raise Problem("read", f"more than {MAX_RECORDS_BYTES >> 20} MiB of JSON once "
                                  "decompressed (MAX_RECORDS_BYTES): split the file")
    text = decode(data)
    try:
        records = json.loads(text)
    except (ValueError, RecursionError) as error:  # also a 5000-digit number, or deep nesting
        raise Problem("validate", f"invalid JSON: {error}") from error
    records = [records] if isinstance(records, dict) else records
    if not isinstance(records, list):
        raise Problem("validate", f"JSON holds a {type(records).__name__}, not a list of records")
    if not records:
        raise Problem("validate", "JSON holds no records")
    return records


def from_record(atoms: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Arrays straight from the jarvis `Atoms.to_dict()` form: building jarvis objects per
    record would dominate the cost of reading large record lists."""
    missing = [key for key in ("lattice_mat", "coords", "elements") if key not in atoms]
    if missing:
        raise Problem("validate", f"JARVIS atoms record lacks {', '.join(map(repr, missing))}")
    lattice = _number_array(atoms["lattice_mat"], "lattice_mat")
    coords = _number_array(atoms["coords"], "coords")
    if lattice.shape != (3, 3):
        raise Problem("validate", f"lattice_mat has shape {lattice.shape}, expected (3, 3)")
    if coords.size == 0:
        coords = coords.reshape(0, 3)
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise Problem("validate", f"coords has shape {coords.shape}, expected (n, 3)")
    positions = coords if atoms.get("cartesian", False) else coords @ lattice
    elements = atoms["elements"]
    if not isinstance(elements, list) or not all(isinstance(e, str) for e in elements):
        raise Problem("validate", f"elements is not a list of element symbols: {elements!r:.60}")
    return lattice, positions, elements


def _number_array(value: object, name: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise Problem("validate", f"{name} is not an array of numbers: {error}") from error
