"""Read crystal structures (POSCAR, CIF, extended XYZ, JARVIS json) and validate them.

A screening run reads millions of inputs, so nothing here may stop it: `discover` walks the
inputs cheaply in the driver, `load` runs in workers and turns every problem into a `Failure`
whose reason says what is wrong. jarvis and scipy are imported where used, to keep this module
cheap to import in the driver and the CLI.
"""
from __future__ import annotations

import functools
import gzip
import io
import itertools
import json
import os
import re
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_ATOMS = 5000
MIN_DISTANCE = 0.5
MIN_VOLUME_PER_ATOM = 1e-3
MAX_LENGTH = 1e4
MAX_OBLIQUITY = 30.0
MAX_IMAGE_POINTS = 5_000_000  # periodic images x atoms for the closest-pair check: ~0.5 GB
# Reads stop here, so no input can exhaust a worker's memory: a POSCAR of MAX_ATOMS atoms is
# about 0.3 MB; a JSON record list (after gunzip) is parsed whole in the driver.
MAX_FILE_BYTES = 64 << 20
MAX_RECORDS_BYTES = 2 << 30
FILE_TYPES = "POSCAR*, CONTCAR*, *.vasp, *.poscar, *.cif, *.xyz, *.extxyz, *.json, *.json.gz"

_ID_PREFIX = re.compile(r"^(POSCAR|CONTCAR)[-_]")
_ID_SUFFIXES = (".vasp", ".poscar", ".cif", ".extxyz", ".xyz")
_XYZ_KEY_VALUE = re.compile(r'(\w+)=("[^"]*"|\S+)')
_CIF_TOKEN = re.compile(r"'[^']*'(?=\s|$)|\"[^\"]*\"(?=\s|$)|\S+")
_P1_SYMMETRY = "loop_\n_symmetry_equiv_pos_as_xyz\n'x, y, z'\n\n"


@dataclass(frozen=True)
class Structure:
    """A validated crystal: lattice rows and cartesian positions in Angstrom, atomic numbers."""

    id: str
    source: str
    lattice: np.ndarray
    positions: np.ndarray
    numbers: np.ndarray

    @property
    def n_atoms(self) -> int:
        return len(self.numbers)

    @property
    def formula(self) -> str:
        """Reduced formula, elements by electronegativity like jarvis (ties by Z, so stable)."""
        numbers, counts = np.unique(self.numbers, return_counts=True)
        counts //= np.gcd.reduce(counts)
        symbols, electronegativity = _element_tables()[1:]
        order = sorted(range(len(numbers)), key=lambda k: (electronegativity[numbers[k]], numbers[k]))
        return "".join(symbols[numbers[k]] + (str(counts[k]) if counts[k] > 1 else "") for k in order)


@dataclass(frozen=True)
class Failure:
    """Why one input was dropped, and at which stage: "read", "validate", "graph" or "predict"."""

    id: str
    source: str
    stage: str
    reason: str


@dataclass(frozen=True)
class Source:
    """Cheap, picklable handle on one input: `discover` yields it in the driver, workers `load` it.
    `record` holds a JARVIS record's `atoms` dict, None for a file."""

    id: str
    origin: str
    record: dict | None


class _Problem(ValueError):
    """What `load` reports: a stage and a reason meant for the user. A ValueError, so that
    callers of `read_records` outside a run report it like any bad argument."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


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
        if _kind(file.name) == "json":
            yield from _record_sources(file)
        else:
            yield Source(_file_id(file, base), str(file), None)


def load(source: Source) -> Structure | Failure:
    """Parse and validate one input; never raises, so one bad file cannot stop a run.
    Numpy warnings are silenced because non-finite values are reported as failures."""
    try:
        with np.errstate(all="ignore"):
            if source.record is not None:
                lattice, positions, symbols = _from_record(source.record)
            else:
                lattice, positions, symbols = _read_file(Path(source.origin))
            return _structure(source, lattice, positions, symbols)
    except _Problem as problem:
        return Failure(source.id, source.origin, problem.stage, problem.reason)
    except Exception as error:  # noqa: BLE001 -- a worker must survive any input
        return Failure(source.id, source.origin, "read", f"{type(error).__name__}: {error}")


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


def _kind(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith((".json", ".json.gz")):
        return "json"
    if lower.endswith(".cif"):
        return "cif"
    if lower.endswith((".xyz", ".extxyz")):
        return "xyz"
    if name.startswith(("POSCAR", "CONTCAR")) or lower.endswith((".vasp", ".poscar")):
        return "poscar"
    return None


def _file_id(file: Path, base: Path) -> str:
    rel = file.relative_to(base)
    if rel.name == "POSCAR":
        return rel.parent.as_posix() if rel.parent != Path(".") else base.resolve().name
    name = _ID_PREFIX.sub("", rel.name)
    if name.lower().endswith(_ID_SUFFIXES):
        name = name.rsplit(".", 1)[0]
    return (rel.parent / name).as_posix()


def _record_sources(file: Path) -> Iterator[Source]:
    """A record without an `atoms` dict gets {} so that `load` names what is missing; a file
    that cannot be read as records becomes one file Source so that `load` reports why."""
    try:
        records = _records(file)
    except _Problem:
        yield Source(file.name.split(".")[0], str(file), None)
        return
    yield from record_sources(file, records)


def record_sources(file: str | Path, records: list) -> Iterator[Source]:
    """One Source per record of `file` as `read_records` returned them, in order: for callers
    that need the records' other fields too, without reading the file twice."""
    file = Path(file)
    stem = file.name.split(".")[0]
    for i, record in enumerate(records):
        fields = record if isinstance(record, dict) else {}
        atoms = fields.get("atoms")
        record_id = fields.get("jid") or fields.get("id") or f"{stem}[{i}]"
        yield Source(str(record_id), f"{file}[{i}]", atoms if isinstance(atoms, dict) else {})


def read_records(file: str | Path) -> list:
    """Every record of a JARVIS json or json.gz file, a lone record as a list of one: the one
    reader of record files, so a record read again later (a shortlist's source) is the record
    `discover` read. A file that cannot be read raises its OSError as is; content that is not a
    list of records raises a ValueError whose message says what is wrong."""
    file = Path(file)
    return _parse_records(_read_limited(file, MAX_RECORDS_BYTES), file.name)


def _records(file: Path) -> list:
    """`read_records` for `discover` and `load`, where an unreadable file is a problem too."""
    return _parse_records(_read_bytes(file, MAX_RECORDS_BYTES), file.name)


def _parse_records(data: bytes, name: str) -> list:
    if name.lower().endswith(".gz"):
        try:
            data = gzip.GzipFile(fileobj=io.BytesIO(data)).read(MAX_RECORDS_BYTES + 1)
        except (OSError, EOFError, zlib.error) as error:
            raise _Problem("read", f"not readable gzip data: {error}") from error
        if len(data) > MAX_RECORDS_BYTES:
            raise _Problem("read", f"more than {MAX_RECORDS_BYTES >> 20} MiB of JSON once "
                                   "decompressed (MAX_RECORDS_BYTES): split the file")
    text = _decode(data)
    try:
        records = json.loads(text)
    except (ValueError, RecursionError) as error:  # also a 5000-digit number, or deep nesting
        raise _Problem("validate", f"invalid JSON: {error}") from error
    records = [records] if isinstance(records, dict) else records
    if not isinstance(records, list):
        raise _Problem("validate", f"JSON holds a {type(records).__name__}, not a list of records")
    if not records:
        raise _Problem("validate", "JSON holds no records")
    return records


def _read_file(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    kind = _kind(path.name)
    if kind is None:
        raise _Problem("read", f"unrecognised file type {path.name!r}: expected {FILE_TYPES}")
    if kind == "json":
        _records(path)
        raise _Problem("read", "a JSON record list is loaded per record: use discover()")
    text = _decode(_read_bytes(path, MAX_FILE_BYTES))
    if not text.strip():
        raise _Problem("validate", "empty file")
    return {"poscar": _parse_poscar, "cif": _parse_cif, "xyz": _parse_xyz}[kind](text)


def _read_bytes(path: Path, limit: int) -> bytes:
    try:
        return _read_limited(path, limit)
    except OSError as error:
        raise _Problem("read", f"cannot read file: {error}") from error


def _read_limited(path: Path, limit: int) -> bytes:
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
        raise _Problem("read", f"{kind}, not a regular file")
    if len(data) > limit:
        raise _Problem("read", f"larger than the {limit >> 20} MiB limit for this kind of input")
    return data


def _not_regular(mode: int) -> str | None:
    """What a file that is not a regular file is, in words; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISSOCK: "a socket",
             stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
             stat.S_ISDIR: "a folder"}
    return next((name for test, name in kinds.items() if test(mode)), "a special file")


def _decode(data: bytes) -> str:
    nul = data.find(b"\0")
    if nul >= 0:
        raise _Problem("read", f"binary data, not text: NUL byte at offset {nul}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        byte = data[error.start]
        raise _Problem("read", f"not UTF-8 text: byte 0x{byte:02x} at offset {error.start}") from error


def _from_record(atoms: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Arrays straight from the jarvis `Atoms.to_dict()` form: building jarvis objects per
    record would dominate the cost of reading large record lists."""
    missing = [key for key in ("lattice_mat", "coords", "elements") if key not in atoms]
    if missing:
        raise _Problem("validate", f"JARVIS atoms record lacks {', '.join(map(repr, missing))}")
    lattice = _number_array(atoms["lattice_mat"], "lattice_mat")
    coords = _number_array(atoms["coords"], "coords")
    if lattice.shape != (3, 3):
        raise _Problem("validate", f"lattice_mat has shape {lattice.shape}, expected (3, 3)")
    if coords.size == 0:
        coords = coords.reshape(0, 3)
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise _Problem("validate", f"coords has shape {coords.shape}, expected (n, 3)")
    positions = coords if atoms.get("cartesian", False) else coords @ lattice
    elements = atoms["elements"]
    if not isinstance(elements, list) or not all(isinstance(e, str) for e in elements):
        raise _Problem("validate", f"elements is not a list of element symbols: {elements!r:.60}")
    return lattice, positions, elements


def _number_array(value: object, name: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise _Problem("validate", f"{name} is not an array of numbers: {error}") from error


def _parse_poscar(text: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """jarvis parses; the layout check before it names the broken line, and the scale factor is
    applied here because jarvis ignores it for cartesian coordinates and for the negative
    (volume) form. Symbols such as 'Si_pv' or 'Si/<hash>' from VASP 6 CONTCARs become 'Si'."""
    from jarvis.io.vasp.inputs import Poscar

    lines = text.splitlines()
    problem = _poscar_layout_problem(lines)
    if problem:
        raise _Problem("validate", f"unparsable POSCAR: {problem}")
    try:
        atoms = Poscar.from_string(text).atoms
    except Exception as error:
        raise _Problem("validate", f"unparsable POSCAR: {_message(error)}") from error
    scale = float(lines[1].split()[0])
    raw = np.asarray(atoms.lattice_mat, dtype=np.float64) / scale
    factor = scale if scale > 0 else (-scale / abs(np.linalg.det(raw))) ** (1 / 3)
    lattice = raw * factor
    coords = np.asarray(atoms.coords, dtype=np.float64).reshape(-1, 3)
    positions = coords * factor if atoms.cartesian else coords @ lattice
    return lattice, positions, [s.split("/")[0].split("_")[0] for s in atoms.elements]


def _message(error: Exception) -> str:
    """jarvis raises errors with several arguments; str() of those is a tuple repr."""
    return " ".join(map(str, error.args)) or type(error).__name__


def _poscar_layout_problem(lines: list[str]) -> str | None:
    if len(lines) < 8:
        return f"only {len(lines)} lines, a POSCAR needs at least 8"
    if not _leading_numbers(lines[1], 1) or float(lines[1].split()[0]) == 0:
        return f"line 2 should hold a non-zero scale factor, found {lines[1].strip()!r}"
    for i in (2, 3, 4):
        if not _leading_numbers(lines[i], 3):
            return f"line {i + 1} should hold a lattice vector (3 numbers), found {lines[i].strip()!r}"
    symbols, counts = lines[5].split(), lines[6].split()
    if symbols and all(token.isdigit() for token in symbols):
        return "line 6 holds atom counts but no element symbols (VASP 4 format is not supported)"
    if not counts or not all(token.isdigit() for token in counts):
        return f"line 7 should hold atom counts, found {lines[6].strip()!r}"
    if len(counts) != len(symbols):
        return f"line 6 names {len(symbols)} elements but line 7 gives {len(counts)} counts"
    start = 9 if lines[7].lstrip()[:1] in ("s", "S") else 8
    n_atoms = sum(int(count) for count in counts)
    if n_atoms == 0:
        return "line 7 declares no atoms"
    for i in range(start, start + n_atoms):
        if i >= len(lines):
            return f"line 7 declares {n_atoms} atoms but the file ends after {i - start} positions"
        if not _leading_numbers(lines[i], 3):
            return f"line {i + 1} should hold 3 coordinates, found {lines[i].strip()!r}"
    return None


def _leading_numbers(line: str, count: int) -> bool:
    """Whether the line starts with `count` numbers."""
    tokens = line.split()[:count]
    try:
        [float(token) for token in tokens]
    except ValueError:
        return False
    return len(tokens) == count


def _parse_cif(text: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """jarvis parses the cell as written (no primitive reduction). It trips over CIFs without a
    symmetry loop, so a P1 loop goes in front; one written later in the file takes precedence.
    Multi-block and partially occupied CIFs are refused before jarvis sees them."""
    from jarvis.core.atoms import Atoms

    lines = text.splitlines()
    blocks = [i + 1 for i, line in enumerate(lines) if line.lower().startswith("data_")]
    if len(blocks) > 1:
        where = ", ".join(map(str, blocks))
        raise _Problem("validate", f"CIF holds {len(blocks)} data blocks (lines {where}), "
                                   "expected one structure per file")
    partial = _partial_sites(lines)
    if partial:
        raise _Problem("validate", f"partial occupancy on site(s) {', '.join(partial)}: "
                                   "only ordered structures can be screened")
    try:
        atoms = Atoms.from_cif(from_string=_P1_SYMMETRY + text, use_cif2cell=False,
                               get_primitive_atoms=False)
    except Exception as error:
        raise _Problem("validate", f"unparsable CIF: {_message(error)}") from error
    return (np.asarray(atoms.lattice_mat, dtype=np.float64),
            np.asarray(atoms.cart_coords, dtype=np.float64), list(atoms.elements))


def _partial_sites(lines: list[str]) -> list[str]:
    """'label (occupancy)' for every atom site whose occupancy is not 1; jarvis writes the
    occupancy as `_atom_site_fract_occupancy`, the CIF dictionary as `_atom_site_occupancy`."""
    sites = []
    for tags, rows in _cif_loops(lines):
        occupancies = [k for k, tag in enumerate(tags) if tag.startswith("_atom_site")
                       and tag.endswith("occupancy")]
        if not occupancies:
            continue
        occupancy = occupancies[0]
        label = tags.index("_atom_site_label") if "_atom_site_label" in tags else 0
        for row in rows:
            value = row[occupancy].split("(")[0]
            if _leading_numbers(value, 1) and float(value) != 1.0:
                sites.append(f"{row[label]} ({value})")
    return sites


def _cif_loops(lines: list[str]) -> Iterator[tuple[list[str], list[list[str]]]]:
    """(lower-case tags, rows of values) for each `loop_` of a CIF."""
    i = 0
    while i < len(lines):
        if lines[i].strip().lower() != "loop_":
            i += 1
            continue
        i += 1
        tags = []
        while i < len(lines) and lines[i].strip().startswith("_"):
            tags.append(lines[i].split()[0].lower())
            i += 1
        values = []
        while i < len(lines) and not lines[i].strip().lower().startswith(("_", "loop_", "data_")):
            if not lines[i].lstrip().startswith("#"):
                values.extend(_CIF_TOKEN.findall(lines[i]))
            i += 1
        width = max(len(tags), 1)
        yield tags, [values[k:k + width] for k in range(0, len(values) - width + 1, width)]


def _parse_xyz(text: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Extended XYZ (Lattice="..." and Properties= in the comment line), one frame per file.
    The comma-separated 9-number cell line that jarvis' `write_xyz` writes is read too."""
    lines = text.splitlines()
    if not lines[0].strip().isdigit():
        raise _Problem("validate", f"line 1 should hold the atom count, found {lines[0].strip()!r}")
    n_atoms = int(lines[0])
    header = lines[1] if len(lines) > 1 else ""
    lattice = _xyz_lattice(header)
    species, position = _xyz_columns(header)
    rows = [line.split() for line in lines[2:2 + n_atoms]]
    if len(rows) < n_atoms:
        raise _Problem("validate", f"line 1 declares {n_atoms} atoms but only {len(rows)} follow")
    extra = next((i for i in range(2 + n_atoms, len(lines)) if lines[i].strip()), None)
    if extra is not None:
        raise _Problem("validate", f"more than one frame: line {extra + 1} continues after the "
                                   f"{n_atoms} atoms, expected one structure per file")
    try:
        symbols = [row[species] for row in rows]
        positions = np.array([row[position:position + 3] for row in rows], dtype=np.float64)
        positions = positions.reshape(n_atoms, 3)
    except (IndexError, ValueError):
        i = next(i for i, row in enumerate(rows) if len(row) <= species
                 or not _leading_numbers(" ".join(row[position:position + 3]), 3))
        raise _Problem("validate", f"line {i + 3} should hold a symbol and 3 coordinates, "
                                   f"found {lines[i + 2].strip()!r}") from None
    return lattice, positions, symbols


def _xyz_lattice(header: str) -> np.ndarray:
    fields = {key.lower(): value.strip('"') for key, value in _XYZ_KEY_VALUE.findall(header)}
    values = fields["lattice"].split() if "lattice" in fields else header.split(",")
    try:
        return np.array(values, dtype=np.float64).reshape(3, 3)
    except ValueError:
        if "lattice" in fields:
            raise _Problem("validate", f"Lattice on line 2 should hold 9 numbers, "
                                       f"found {fields['lattice']!r}") from None
        raise _Problem("validate", 'no cell: line 2 has no Lattice="..." (extended XYZ); '
                                   "a periodic cell is required") from None


def _xyz_columns(header: str) -> tuple[int, int]:
    """Columns of the species and of the first position value, from Properties=."""
    fields = {key.lower(): value for key, value in _XYZ_KEY_VALUE.findall(header)}
    spec = fields.get("properties", "species:S:1:pos:R:3").split(":")
    columns, start = {}, 0
    for name, count in zip(spec[0::3], spec[2::3]):
        if not count.isdigit():
            raise _Problem("validate", f"Properties on line 2 gives {name} {count!r} columns, "
                                       "not a whole number")
        columns[name] = start
        start += int(count)
    if "species" not in columns or "pos" not in columns:
        raise _Problem("validate", f"Properties on line 2 lacks species or pos: {':'.join(spec)!r}")
    return columns["species"], columns["pos"]


def _structure(source: Source, lattice: np.ndarray, positions: np.ndarray,
               symbols: list[str]) -> Structure:
    """Every check a structure must pass before a crystal graph can be built from it."""
    n_atoms = len(symbols)
    if positions.shape != (n_atoms, 3):
        raise _Problem("validate", f"{len(positions)} positions for {n_atoms} element symbols")
    if n_atoms == 0:
        raise _Problem("validate", "no atoms")
    if n_atoms > MAX_ATOMS:
        raise _Problem("validate", f"{n_atoms} atoms, more than the limit of {MAX_ATOMS} (MAX_ATOMS)")
    if not np.isfinite(lattice).all():
        raise _Problem("validate", f"lattice has non-finite values: {lattice.tolist()}")
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if bad.size:
        i = bad[0]
        raise _Problem("validate", f"atom {i} ({symbols[i]}) has a non-finite position "
                                   f"{positions[i].tolist()}")
    numbers = _atomic_numbers(symbols)
    volume = abs(float(np.linalg.det(lattice)))
    if volume < MIN_VOLUME_PER_ATOM * n_atoms:
        raise _Problem("validate", f"cell volume {volume:.3g} A^3 is too small for {n_atoms} atoms "
                                   f"(minimum {MIN_VOLUME_PER_ATOM} A^3 per atom)")
    pair = _closest_pair(lattice, positions)
    if pair is not None and pair[2] < MIN_DISTANCE:
        raise _Problem("validate", _closeness(*pair, symbols))
    problem = _cell_shape_problem(lattice, volume)
    if problem is None and pair is None:
        problem = (f"the cell is too thin to check its {MIN_DISTANCE} A atom spacing within "
                   f"{MAX_IMAGE_POINTS:.0e} periodic image points: use a reduced (Niggli) cell")
    if problem:
        raise _Problem("validate", problem)
    return Structure(source.id, source.origin, np.ascontiguousarray(lattice),
                     np.ascontiguousarray(positions), numbers)


def _cell_shape_problem(lattice: np.ndarray, volume: float) -> str | None:
    """A cell too big or too oblique for the graph's neighbour search, which walks images of
    the cell as given: a vector longer than MAX_LENGTH, or one more than MAX_OBLIQUITY times
    the spacing of the lattice planes it crosses (a reduced cell's ratio is below 2). The
    images searched grow as the cube of that ratio, about 160 ratio^3 points in all: 100 MB
    at the limit, terabytes for the bases a fuzzer makes."""
    lengths = np.linalg.norm(lattice, axis=1)
    if lengths.max() > MAX_LENGTH:
        i = int(np.argmax(lengths))
        return f"lattice vector {i + 1} is {lengths[i]:.3g} A long, more than {MAX_LENGTH:g} A"
    spacings = volume / np.linalg.norm(np.cross(lattice[[1, 2, 0]], lattice[[2, 0, 1]]), axis=1)
    i = int(np.argmax(lengths / spacings))
    if lengths[i] > MAX_OBLIQUITY * spacings[i]:
        return (f"lattice vector {i + 1} is {lengths[i]:.3g} A long but its lattice planes are "
                f"{spacings[i]:.3g} A apart: too oblique a basis, use a reduced (Niggli) cell")
    return None


def _closeness(i: int, j: int, distance: float, symbols: list[str]) -> str:
    limit = f"closer than the {MIN_DISTANCE} A minimum"
    if i == j:
        return (f"atom {i} ({symbols[i]}) is {distance:.3f} A from its own periodic image, "
                f"{limit}: a lattice vector is too short")
    return f"atoms {i} ({symbols[i]}) and {j} ({symbols[j]}) are {distance:.3f} A apart, {limit}"


def _atomic_numbers(symbols: list[str]) -> np.ndarray:
    numbers = _element_tables()[0]
    unknown = sorted({symbol for symbol in symbols if symbol not in numbers})
    if unknown:
        raise _Problem("validate", f"unknown element symbol(s): {', '.join(map(repr, unknown))}")
    return np.array([numbers[symbol] for symbol in symbols], dtype=np.int64)


def element_symbol(text: str) -> str:
    """The element symbol `text` names in any letter case ('o' -> 'O', 'CL' -> 'Cl'); a
    ValueError for a name that is no element jarvis knows."""
    symbol = text.strip().capitalize()
    if symbol not in _element_tables()[0]:
        raise ValueError(f"{text!r} is not an element symbol")
    return symbol


@functools.cache
def _element_tables() -> tuple[dict[str, int], dict[int, str], dict[int, float]]:
    """symbol -> Z, Z -> symbol, Z -> electronegativity, for the elements jarvis knows; read
    from jarvis' own table file, because importing jarvis.core.specie loads much more, and the
    CLI checks element symbols too."""
    from importlib.resources import files

    chem_data = json.loads(files("jarvis.core").joinpath("Elements.json").read_text())
    numbers = {symbol: int(data["Z"]) for symbol, data in chem_data.items()}
    return (numbers, {z: symbol for symbol, z in numbers.items()},
            {int(data["Z"]): float(data["X"]) for data in chem_data.values()})


def _closest_pair(lattice: np.ndarray, positions: np.ndarray) -> tuple[int, int, float] | None:
    """Closest periodic pair (i, j, distance), i == j for an atom and its own image, searched
    only up to MIN_DISTANCE (distance inf beyond). Each axis gets as many images as its plane
    spacing requires; a cell that would need more than the neighbouring ones is reduced first,
    which keeps the image count small and exposes a too short lattice vector directly. None
    where even the reduced cell needs more than MAX_IMAGE_POINTS: a basis that the reduction
    (100 rounds, in floating point) leaves thin, whose search would take gigabytes."""
    from scipy.spatial import cKDTree

    cell, inverse = lattice, np.linalg.inv(lattice)
    if _reach(inverse).max() > 1:
        cell = _reduced(lattice)
        inverse = np.linalg.inv(cell)
        lengths = np.linalg.norm(cell, axis=1)
        if lengths.min() < MIN_DISTANCE:
            return 0, 0, float(lengths.min())
    reach = _reach(inverse)
    n_atoms = len(positions)
    if np.prod(2.0 * reach + 1) * n_atoms > MAX_IMAGE_POINTS:
        return None
    fractional = positions @ inverse
    inside = (fractional - np.floor(fractional)) @ cell
    shifts = _image_shifts(tuple(reach)) @ cell
    images = (shifts[:, None, :] + inside[None, :, :]).reshape(-1, 3)
    distances, found = cKDTree(images).query(inside, k=2, distance_upper_bound=MIN_DISTANCE)
    itself = found[:, 0] == (len(shifts) // 2) * n_atoms + np.arange(n_atoms)
    nearest = np.where(itself, distances[:, 1], distances[:, 0])
    partner = np.where(itself, found[:, 1], found[:, 0])
    i = int(np.argmin(nearest))
    return i, int(partner[i] % n_atoms), float(nearest[i])


def _reach(inverse: np.ndarray) -> np.ndarray:
    """Images needed on each side per axis: MIN_DISTANCE over the spacing of the lattice planes,
    which is one over the length of the matching column of the inverse cell."""
    return np.ceil(MIN_DISTANCE * np.linalg.norm(inverse, axis=0)).astype(int)


@functools.cache
def _image_shifts(reach: tuple[int, ...]) -> np.ndarray:
    """Integer cell shifts in lexicographic order, so the zero shift sits in the middle."""
    return np.array(list(itertools.product(*(range(-r, r + 1) for r in reach))), dtype=np.float64)


_STEPS = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)], dtype=np.float64)


def _reduced(lattice: np.ndarray) -> np.ndarray:
    """The same lattice with a nearly orthogonal basis: each vector is replaced by a shorter
    one made by adding whole multiples of the other two (nearest multiples of each, and all
    +-1 combinations of both), until none shrinks."""
    cell = lattice.copy()
    for _ in range(100):
        changed = False
        for k in range(3):
            others = np.delete(cell, k, axis=0)
            nearest = np.round(others @ cell[k] / np.einsum("ij,ij->i", others, others))
            steps = np.vstack([np.diag(nearest), _STEPS])
            candidates = cell[k] - steps @ others
            best = candidates[np.argmin(np.einsum("ij,ij->i", candidates, candidates))]
            if best @ best < (1 - 1e-12) * (cell[k] @ cell[k]):
                cell[k] = best
                changed = True
        if not changed:
            break
    return cell
