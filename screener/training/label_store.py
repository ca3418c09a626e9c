"""DFT labels as immutable, append-only part files: one folder per level of theory, one set.

A label folder (`data/labels/<level>/`) holds `part-0000.h5`, `part-0001.h5`, ...: each run of
`screen label` adds one part with what it finished and never rewrites an earlier one, so a
commit of new labels adds only the new part to the repository. A part holds spectra, cells
and metadata, not graphs: graphs are rebuilt on first use and cached outside git (graph_cache).

Reading a folder gives one training set. Rule: per structure id, the labelled record of the
highest-numbered part wins (a relabel, e.g. spin-polarized, supersedes the earlier record);
rows are sorted by id and split by id hash as every training set is (dataset.split_by_id), so
splits follow ids, not parts. Failures are kept too: `screen label` skips what failed before.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from screener import graphs as graph_builder
from screener.dos import N_BINS
from screener.io import Failure, Structure
from screener.io.files import file_sha256, fsync
from screener.results.hdf5 import (
    ATTRS_SHA256,
    LIBVER,
    SchemaError,
    attrs_digest,
    create_dataset,
    damage_named,
    read_graphs,
    screener_version,
    write_graphs,
)
from screener.results.shards import read_shard_failures, write_failures
from screener.training.dataset import (
    SPLIT_METHOD,
    SPLIT_SEED,
    TrainingSet,
    read_structures_group,
    split_by_id,
    write_structures,
)

KIND = "label_part"
SCHEMA_VERSION = 1
GRAPH_CACHE_KIND = "label_part_graphs"
PART = re.compile(r"^part-(\d{4,})\.h5$")
CACHE_ENV = "DOS_SCREENER_CACHE"
DEFAULT_CACHE = Path("~/.cache/dos-screener")
# Per-record values besides the spectrum: float unless listed in _EXTRA_DTYPES.
EXTRA = ("gpaw_gap", "vbm", "cbm", "e_fermi", "energy", "n_electrons", "wall_time", "cpu_time",
         "kpts", "magmom", "spin", "finished")
_EXTRA_DTYPES = {"kpts": np.int64, "spin": np.str_, "finished": np.str_}
_STR = {name for name, dtype in _EXTRA_DTYPES.items() if dtype is np.str_}


@dataclass
class Records:
    """Labelled structures, row-aligned: DOS on the grid, JARVIS reference gap, EXTRA values."""

    structures: list[Structure]
    dos: np.ndarray
    ref_gap: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.structures)


@dataclass
class Part:
    path: Path
    records: Records
    failures: list[Failure]
    provenance: dict


def part_paths(folder: str | Path) -> list[Path]:
    """The folder's parts in the order they were added."""
    folder = Path(folder)
    found = [(int(m[1]), path) for path in folder.glob("part-*.h5") if (m := PART.match(path.name))]
    return [path for _, path in sorted(found)]


def is_label_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and bool(part_paths(path))


def write_part(folder: str | Path, records: Records, failures: list[Failure],
               provenance: dict) -> Path:
    """Add a part after the last one and return its path; an existing part is never touched.

    Written to a temporary file, fsynced, then hard-linked to its name, which fails rather
    than replace a part that appeared meanwhile (the next number is tried instead).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _check_records(records)
    if not len(records) and not failures:
        raise ValueError("a part needs at least one record or failure")
    tmp = folder / f".part-{os.getpid()}.h5.tmp"
    try:
        with h5py.File(tmp, "w", libver=LIBVER) as f:
            _write(f, records, failures, provenance)
        fsync(tmp)
        while True:
            paths = part_paths(folder)
            number = int(PART.match(paths[-1].name)[1]) + 1 if paths else 0
            path = folder / f"part-{number:04d}.h5"
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                continue
        os.chmod(path, 0o444)
        fsync(folder)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check_records(records: Records) -> None:
    n = len(records)
    ids = [s.id for s in records.structures]
    if len(set(ids)) != n:
        raise ValueError("a part holds each structure id once")
    if records.dos.shape != (n, N_BINS) or records.ref_gap.shape != (n,):
        raise ValueError(f"dos {records.dos.shape} and ref_gap {records.ref_gap.shape} do not "
                         f"fit {n} structures")
    if set(records.extra) != set(EXTRA) or any(len(v) != n for v in records.extra.values()):
        raise ValueError(f"extra must hold {EXTRA}, one row per structure")


def _write(f: h5py.File, records: Records, failures: list[Failure], provenance: dict) -> None:
    f.attrs.update(kind=KIND, schema_version=SCHEMA_VERSION, n_structures=len(records),
                   created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   screener_version=screener_version(), provenance=json.dumps(provenance))
    create_dataset(f, "ids", np.array([s.id for s in records.structures], dtype=str), {})
    create_dataset(f, "sources", np.array([s.source for s in records.structures], dtype=str), {})
    create_dataset(f, "dos", np.asarray(records.dos, dtype=np.float32),
                   {"compression": "gzip", "compression_opts": 9, "shuffle": True})
    create_dataset(f, "ref_gap", np.asarray(records.ref_gap, dtype=np.float32), {})
    write_structures(f.create_group("structures"), records.structures)
    group = f.create_group("extra")
    for name in EXTRA:
        create_dataset(group, name, np.asarray(records.extra[name],
                                               dtype=_EXTRA_DTYPES.get(name, np.float64)),
                       {"compression": "gzip"} if name != "spin" else {})
    write_failures(f, failures)
    f.attrs[ATTRS_SHA256] = np.bytes_(attrs_digest(f.attrs))


def read_part(path: str | Path) -> Part:
    """One part, checked: kind, version, attribute digest and dataset checksums."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise SchemaError(f"{path}: not a readable label part ({err})") from err
    with f, damage_named(path):
        if f.attrs.get("kind") != KIND or f.attrs.get("schema_version") != SCHEMA_VERSION:
            raise SchemaError(f"{path}: not a label part of schema {SCHEMA_VERSION}")
        if f.attrs[ATTRS_SHA256].decode() != attrs_digest(f.attrs):
            raise SchemaError(f"{path}: attributes differ from their checksum: damaged")
        ids = f["ids"].asstr()[()].astype(str)
        sources = f["sources"].asstr()[()].astype(str)
        structures = read_structures_group(f["structures"], ids, sources)
        extra = {name: (f["extra"][name].asstr()[()].astype(str) if name in _STR
                        else f["extra"][name][()]) for name in EXTRA}
        records = Records(structures, f["dos"][()], f["ref_gap"][()], extra)
        return Part(path, records, read_shard_failures(f), json.loads(f.attrs["provenance"]))



@dataclass
class Newest:
    """The winning record of each id (sorted by id) and where it lies: part index and row."""

    parts: list[Part]
    ids: np.ndarray
    part: np.ndarray
    row: np.ndarray
    failed: dict[str, Failure]


def newest(folder: str | Path) -> Newest:
    """Every part of `folder`, read once, reduced to the newest labelled record per id.

    `failed`: the ids whose latest entry is a failure newer than any label of theirs.
    """
    parts = [read_part(path) for path in part_paths(folder)]
    if not parts:
        levels = sorted(str(sub) for sub in Path(folder).iterdir() if is_label_folder(sub))
        hint = f"; its label folders: {', '.join(levels)}" if levels else ""
        raise SchemaError(f"{folder}: no label parts (part-NNNN.h5){hint}")
    _check_one_level(parts)
    where: dict[str, tuple[int, int]] = {}
    failed: dict[str, Failure] = {}
    for p, part in enumerate(parts):
        for r, structure in enumerate(part.records.structures):
            where[structure.id] = (p, r)
            failed.pop(structure.id, None)
        for failure in part.failures:
            failed[failure.id] = failure
    ids = np.array(sorted(where), dtype=str)
    located = np.array([where[i] for i in ids], dtype=np.int64).reshape(-1, 2)
    return Newest(parts, ids, located[:, 0], located[:, 1], failed)


def _check_one_level(parts: list[Part]) -> None:
    """All parts of a folder share one level of theory: every setting but the spin rule, which
    decides per structure and is recorded with each record (extra/spin)."""
    levels = {json.dumps({k: v for k, v in part.provenance["settings"].items() if k != "spin"},
                         sort_keys=True) for part in parts}
    if len(levels) > 1:
        raise SchemaError(f"{parts[0].path.parent}: parts of different levels of theory: "
                          f"{sorted(levels)}")


def read_label_set(folder: str | Path, graphs: bool = True) -> TrainingSet:
    """The folder's newest records as one training set (see the module's rule)."""
    found = newest(folder)
    pick = [found.parts[p].records for p in found.part]
    dos = np.stack([records.dos[r] for records, r in zip(pick, found.row)]) if pick else \
        np.empty((0, N_BINS), np.float32)
    extra = {name: np.array([records.extra[name][r] for records, r in zip(pick, found.row)])
             for name in EXTRA}
    latest = found.parts[-1]
    attrs = {**latest.provenance, "source": str(folder),
             "parts": [part.path.name for part in found.parts], "split_seed": SPLIT_SEED,
             "split_method": SPLIT_METHOD, "kind": "label_folder",
             "n_structures": int(found.ids.size), "n_failed": len(found.failed)}
    return TrainingSet(
        ids=found.ids,
        graphs=read_label_graphs(folder, np.arange(found.ids.size), found) if graphs else [],
        dos=dos,
        ref_gap=np.array([records.ref_gap[r] for records, r in zip(pick, found.row)],
                         dtype=np.float32),
        formula=np.array([records.structures[r].formula for records, r in zip(pick, found.row)],
                         dtype=str),
        split=split_by_id(found.ids.tolist(), SPLIT_SEED),
        attrs=attrs,
        extra=extra,
    )


def read_label_structures(folder: str | Path) -> list[Structure]:
    """The cells of the folder's training set, in its row order."""
    found = newest(folder)
    return [found.parts[p].records.structures[r] for p, r in zip(found.part, found.row)]


def read_label_graphs(folder: str | Path, indices, found: Newest | None = None) -> list[dict]:
    """Graphs of rows `indices` of the folder's training set, from each part's graph cache."""
    found = found or newest(folder)
    indices = np.asarray(indices, dtype=np.int64)
    out: list[dict | None] = [None] * len(indices)
    for p in np.unique(found.part[indices]):
        mine = np.flatnonzero(found.part[indices] == p)
        with h5py.File(graph_cache(found.parts[p]), "r") as f:
            for i, graph in zip(mine, read_graphs(f["graphs"], found.row[indices[mine]])):
                out[i] = {name: array.copy() for name, array in graph.items()}
    return out


def label_set_sha256(folder: str | Path) -> str:
    """sha256 over the folder's part names and contents: changes with every added part."""
    lines = [f"{path.name} {file_sha256(path)}" for path in part_paths(folder)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def builder_sha256() -> str:
    """Identifies the graph builder: a change to screener/graphs.py invalidates the caches."""
    return file_sha256(graph_builder.__file__)


def graph_cache(part: Part) -> Path:
    """The graphs of a part's records (its row order), built once and kept under cache_dir().

    Keyed by the sha256 of the part and of the graph builder, so a different part or builder
    never reads another's graphs; a cache that does not read back whole is rebuilt.
    """
    key = f"{file_sha256(part.path)}-{builder_sha256()[:16]}"
    path = cache_dir() / "graphs" / f"{key}.h5"
    if _cache_ok(path, key, len(part.records)):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    built = [graph_builder.build_graph(s.lattice, s.positions, s.numbers)
             for s in part.records.structures]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w", libver=LIBVER) as f:
            f.attrs.update(kind=GRAPH_CACHE_KIND, key=key, n=len(built))
            write_graphs(f.create_group("graphs"), built)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _cache_ok(path: Path, key: str, n: int) -> bool:
    """Whether `path` is a finished cache of this key with n graphs (its data checksums are
    checked as it is read)."""
    try:
        with h5py.File(path, "r") as f:
            return (f.attrs.get("kind") == GRAPH_CACHE_KIND and f.attrs.get("key") == key
                    and len(f["graphs/node_offsets"]) == n + 1)
    except (OSError, KeyError):
        return False
