"""HDF5 shards of graphs and predictions, the manifest that lists complete ones, and queries.

A results directory holds ``manifest.json``, ``graphs/graphs-XXXXX.h5`` and
``predictions/predictions-XXXXX.h5`` (layout: schemas/shards.json). A shard is written to
``<name>.h5.tmp`` and renamed when complete, so a file under its final name is whole; the
manifest records its size and sha256 so later damage is caught and names the file. Every byte
a reader uses is under a checksum HDF5 checks on each read (see CHECKSUM), so damage found
later is an error naming the file, never a wrong value.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import h5py
import numpy as np

from screener.dos import ENERGY_GRID
from screener.errors import ScreenerError
from screener.window import in_range, p_in_window, shortlisted

if TYPE_CHECKING:
    from screener.io import Failure, Structure

SCHEMA_VERSION = 1
KINDS = ("graphs", "predictions")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
JOURNAL_MIN_LINES = 64
STR = np.str_
# A prediction shard's table is its graph shard's table plus the spectral columns.
GRAPH_COLUMNS: dict[str, Any] = {"ids": STR, "source": STR, "formula": STR, "elements": STR,
                                 "n_atoms": np.int32}
PREDICTION_COLUMNS: dict[str, Any] = {
    **GRAPH_COLUMNS, "band_gap": np.float32, "band_gap_std": np.float32, "p_metal": np.float32,
    "dos_band_gap": np.float32, "vbm": np.float32, "cbm": np.float32, "dos_at_ef": np.float32,
    "band_gap_mean": np.float32, "in_domain": np.bool_, "dos": np.float32}
# The columns of a model without a gap head, from its band_gap (read off the spectrum, with
# certainty 1, by a model whose domain was not recorded): what older shards lack.
_DERIVED = {"dos_band_gap": lambda gap: gap, "band_gap_mean": lambda gap: gap,
            "band_gap_std": np.zeros_like, "p_metal": lambda gap: (gap == 0).astype(np.float32),
            "in_domain": lambda gap: np.ones(gap.shape, np.bool_)}
# Units of the columns, in the names that tables and CSV files show them under.
UNITS = {"band_gap": "eV", "band_gap_std": "eV", "band_gap_mean": "eV", "dos_band_gap": "eV",
         "vbm": "eV", "cbm": "eV", "dos_at_ef": "per_eV_per_electron"}
WINDOW_COLUMN = "p_in_window"
FAILURE_FIELDS = ("ids", "sources", "stages", "reasons")
RECORD_KEYS = ("kind", "n", "n_failed", "ids_sha256", "size", "sha256")
REQUIRED_ATTRS = ("model_id", "model_hash")
# Graph shards are an internal hand-off read back once by this code: lzf writes ~1.6x faster
# than gzip-4 at equal read speed (real JARVIS graphs), and the 1.5x larger file is immaterial.
# Prediction shards are the user-facing result: gzip is in every HDF5 build, lzf only in h5py.
GRAPH_FILTER = {"compression": "lzf"}
PREDICTION_FILTER = {"compression": "gzip", "compression_opts": 4}
DOS_CHUNK_ROWS = 256
# Integrity on every read at the cost of a sum per chunk: each dataset with rows is chunked with
# HDF5's fletcher32 checksum, strings are fixed-length so that their bytes lie in those chunks
# (variable-length strings live in a heap no checksum covers), and files are written in the
# HDF5 1.10 format, whose object headers, and so numeric attributes, carry checksums too.
# Shards keep string attributes as fixed-length bytes in those headers too (read them with
# `attr`): HDF5 loops forever on some damaged variable-length heaps.
CHECKSUM = {"fletcher32": True}
LIBVER = ("v110", "v110")
CONFIG_ATTR = "run_config"
LOCK = "run.lock"


class SchemaError(ScreenerError):
    """A file that is not a readable shard of this schema: foreign, damaged or another version."""


class ManifestDamaged(SchemaError):
    """A manifest that cannot be read at all; a run rebuilds it from the shards (Manifest.open)."""


class UnknownColumn(ValueError):
    """A column name the prediction shards do not hold."""


def shard_name(kind: str, index: int) -> str:
    """Name of chunk `index`'s shard relative to the results dir, so a resumed run finds it."""
    if kind not in KINDS:
        raise ValueError(f"shard kind must be one of {KINDS}, not {kind!r}")
    return f"{kind}/{kind}-{index:05d}.h5"


def ids_digest(ids: Iterable[str]) -> str:
    """Order-free sha256 of a chunk's ids, so a resumed run can tell its input changed."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def screener_version() -> str:
    try:
        return metadata.version("dos-screener")
    except metadata.PackageNotFoundError:  # running from a source checkout
        return "unknown"


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_durably(tmp: Path, final: Path) -> None:
    """fsync the data before the rename and the directory after it: a crash leaves old or new."""
    _fsync(tmp)
    os.replace(tmp, final)
    _fsync(final.parent)


class ShardWriter:
    """Context manager yielding an open h5py.File that appears under `path` only when complete.

    Writes ``<path>.tmp``; a clean exit closes, fsyncs and renames it, an exception (or a file
    that does not read back as a shard) deletes it.
    After the block, ``info`` holds the manifest record (n, n_failed, size, sha256, ...).
    """

    def __init__(self, path: str | Path, kind: str, attrs: dict[str, Any]):
        if kind not in KINDS:
            raise ValueError(f"shard kind must be one of {KINDS}, not {kind!r}")
        missing = [key for key in REQUIRED_ATTRS if key not in attrs]
        if missing:
            raise ValueError(f"{path}: {kind} shard attrs lack {missing}")
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.attrs = {**attrs, "schema_version": SCHEMA_VERSION, "kind": kind,
                      "screener_version": screener_version(),
                      "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.info: dict[str, Any] | None = None

    def __enter__(self) -> h5py.File:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = h5py.File(self.tmp, "w", libver=LIBVER)
        self.file.attrs.update({key: np.bytes_(value.encode()) if isinstance(value, str) else value
                                for key, value in self.attrs.items()})
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        self.file.close()
        try:
            if exc_type is None:
                self.info = shard_info(self.tmp)  # also proves it reads back as a shard
                _replace_durably(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)


def create_dataset(group: h5py.Group, name: str, data: Any, filters: dict) -> None:
    """Create a dataset under CHECKSUM; str arrays become fixed-length UTF-8. Empty ones skip
    the filters: they hold no bytes to check."""
    data = np.asarray(data)
    if data.dtype.kind in "UO":
        encoded = np.char.encode(data.astype(str), "utf-8")
        data = encoded.astype(h5py.string_dtype("utf-8", max(1, encoded.dtype.itemsize)))
    if data.size == 0:
        group.create_dataset(name, data=data)
    else:
        group.create_dataset(name, data=data, **filters, **CHECKSUM)


def _read(dataset: h5py.Dataset) -> np.ndarray:
    if h5py.check_string_dtype(dataset.dtype) is not None:
        return np.asarray(dataset.asstr()[()], dtype=STR)
    return dataset[()]


def _column(f: h5py.File, name: str) -> np.ndarray:
    """A prediction shard's column; an older shard's missing one derived (_DERIVED)."""
    return _read(f[name]) if name in f or name not in _DERIVED else _DERIVED[name](
        _read(f["band_gap"]))


def write_graphs(group: h5py.Group, graphs: list[dict]) -> None:
    """Ragged graphs as concatenated arrays plus offsets: one dataset per field, not per graph.

    Neighbours are stored local to their structure, so reading a graph needs no re-indexing.
    Line-graph offsets are edge offsets times (k - 1) and are not stored.
    """
    n_nodes = np.array([len(g["numbers"]) for g in graphs], dtype=np.int64)
    n_edges = np.array([len(g["neighbors"]) for g in graphs], dtype=np.int64)
    k = int(n_edges[0] // n_nodes[0]) if graphs else 0
    for i, g in enumerate(graphs):
        if (n_edges[i] != n_nodes[i] * k or g["edge_vec"].shape != (n_edges[i], 3)
                or len(g["angle_cos"]) != n_edges[i] * (k - 1)):
            raise ValueError(f"graph {i} is not shaped for k={k} neighbours: n={n_nodes[i]}, "
                             f"neighbors {len(g['neighbors'])}, edge_vec {g['edge_vec'].shape}, "
                             f"angle_cos {len(g['angle_cos'])}")
    group.attrs["k"] = k
    create_dataset(group, "node_offsets", np.concatenate([[0], np.cumsum(n_nodes)]), {})
    create_dataset(group, "edge_offsets", np.concatenate([[0], np.cumsum(n_edges)]), {})
    fields = {"numbers": np.uint8, "neighbors": np.int32, "edge_vec": np.float32,
              "angle_cos": np.float32}
    for name, dtype in fields.items():
        parts = [np.asarray(g[name], dtype=dtype) for g in graphs]
        empty = np.empty((0, 3) if name == "edge_vec" else 0, dtype)
        create_dataset(group, name, np.concatenate(parts) if parts else empty, GRAPH_FILTER)


def read_graphs(group: h5py.Group, indices: Sequence[int] | np.ndarray | None = None) -> list[dict]:
    """Inverse of write_graphs: one contiguous read per field, split with the offsets.

    `indices` selects structures (any order); the span they cover is read once.
    """
    k = int(group.attrs["k"])
    node_offsets = group["node_offsets"][()]
    edge_offsets = group["edge_offsets"][()]
    n = len(node_offsets) - 1
    if (node_offsets[-1] != len(group["numbers"]) or edge_offsets[-1] != len(group["neighbors"])
            or len(group["angle_cos"]) != edge_offsets[-1] * (k - 1)
            or not np.array_equal(edge_offsets, node_offsets * k)):
        raise SchemaError(f"{group.file.filename}: graph arrays disagree with their offsets")
    picks = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(picks) == 0:
        return []
    if picks.min() < 0 or picks.max() >= n:
        raise IndexError(f"{group.file.filename}: indices out of range for {n} graphs")
    lo, hi = int(picks.min()), int(picks.max()) + 1
    offsets = {"numbers": node_offsets, "neighbors": edge_offsets, "edge_vec": edge_offsets,
               "angle_cos": edge_offsets * (k - 1)}
    dtypes = {"numbers": np.int64, "neighbors": np.int64, "edge_vec": np.float32,
              "angle_cos": np.float32}
    split = {}
    for name, off in offsets.items():
        data = group[name][off[lo]:off[hi]].astype(dtypes[name], copy=False)
        split[name] = np.split(data, off[lo + 1:hi] - off[lo])
    return [{name: parts[i - lo] for name, parts in split.items()} for i in picks]


def _write_failures(f: h5py.File, failures: Sequence[Failure]) -> None:
    group = f.create_group("failures")
    for name, field in zip(FAILURE_FIELDS, ("id", "source", "stage", "reason")):
        create_dataset(group, name, np.array([getattr(x, field) for x in failures], dtype=STR), {})


def _read_failures(f: h5py.File) -> list[Failure]:
    from screener.io import Failure  # lazily: keeps jarvis-tools out of plain queries

    columns = [_read(f["failures"][name]) for name in FAILURE_FIELDS]
    return [Failure(id=str(i), source=str(s), stage=str(t), reason=str(r))
            for i, s, t, r in zip(*columns)]


def _columns(table: dict[str, Any], spec: dict[str, Any], path: Path) -> dict[str, np.ndarray]:
    """Cast a table to the schema's dtypes, refusing missing, unknown or ragged columns."""
    if set(table) != set(spec):
        raise ValueError(f"{path}: columns {sorted(table)} differ from the schema's "
                         f"{sorted(spec)}")
    columns = {name: np.asarray(table[name], dtype=dtype) for name, dtype in spec.items()}
    lengths = {name: len(col) for name, col in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{path}: columns have different lengths {lengths}")
    return columns


def elements_of(formula: str) -> str:
    """Sorted unique element symbols of a formula, space separated ("Al2O3" -> "Al O")."""
    return " ".join(sorted(set(re.findall(r"[A-Z][a-z]*", formula))))


def write_graph_shard(path: str | Path, structures: Sequence[Structure], graphs: list[dict],
                      failures: Sequence[Failure], meta: dict[str, Any]) -> dict[str, Any]:
    """Write one chunk's graphs (graphs[i] of structures[i]) and failures.

    Of a structure only id, source and formula are kept: the graph holds the rest.
    Returns the manifest record for Manifest.add.
    """
    if len(structures) != len(graphs):
        raise ValueError(f"{path}: {len(structures)} structures for {len(graphs)} graphs")
    table = {"ids": [s.id for s in structures], "source": [s.source for s in structures],
             "formula": [s.formula for s in structures],
             "elements": [elements_of(s.formula) for s in structures],
             "n_atoms": [len(g["numbers"]) for g in graphs]}
    columns = _columns(table, GRAPH_COLUMNS, Path(path))
    writer = ShardWriter(path, "graphs", meta)
    with writer as f:
        for name, col in columns.items():
            create_dataset(f, name, col, {})
        write_graphs(f.create_group("graphs"), graphs)
        _write_failures(f, failures)
    return writer.info


def empty_prediction_table() -> dict[str, np.ndarray]:
    """Zero rows of every prediction column, for a chunk in which nothing was predicted."""
    return {name: np.empty((0, len(ENERGY_GRID)) if name == "dos" else 0, dtype)
            for name, dtype in PREDICTION_COLUMNS.items()}


def write_prediction_shard(path: str | Path, table: dict[str, Any], failures: Sequence[Failure],
                           attrs: dict[str, Any]) -> dict[str, Any]:
    """Write one chunk's predictions (the columns of PREDICTION_COLUMNS; a table without the
    gap head's columns is a model's without one, see _DERIVED).

    `attrs` may carry the model's own energy_grid; dos.ENERGY_GRID otherwise.
    Returns the manifest record for Manifest.add.
    """
    attrs = {"energy_grid": ENERGY_GRID, **attrs}
    if "band_gap" in table:
        gap = np.asarray(table["band_gap"], np.float32)
        table = {**{name: derive(gap) for name, derive in _DERIVED.items()}, **table}
    writer = ShardWriter(path, "predictions", attrs)
    columns = _columns(table, PREDICTION_COLUMNS, Path(path))
    n, width = len(columns["ids"]), len(attrs["energy_grid"])
    if columns["dos"].shape != (n, width):
        raise ValueError(f"{path}: dos has shape {columns['dos'].shape}, expected ({n}, {width}) "
                         "for the energy grid")
    with writer as f:
        for name, col in columns.items():
            chunks = (min(n, DOS_CHUNK_ROWS), width) if name == "dos" else True
            create_dataset(f, name, col, {**PREDICTION_FILTER, "chunks": chunks})
        _write_failures(f, failures)
    return writer.info


@contextmanager
def _open_shard(path: str | Path, kind: str | None = None, info: dict | None = None,
                verify: bool = False, model_hash: str | None = None) -> Iterator[h5py.File]:
    """Open a shard read-only after checking it is one; read errors inside become SchemaError.

    `info` (the manifest record) adds a size check, and with `verify` a sha256 check.
    Complete shards never change, so no file lock is taken (locks fail on many shared filesystems).
    """
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: no such shard file")
    if info is not None:
        size = path.stat().st_size
        if size != info["size"]:
            raise SchemaError(f"{path}: {size} bytes but the manifest recorded {info['size']}: "
                              "truncated or replaced after it was written")
        if verify and file_sha256(path) != info["sha256"]:
            raise SchemaError(f"{path}: sha256 differs from the manifest: damaged after writing")
    if not h5py.is_hdf5(path):
        raise SchemaError(f"{path}: not an HDF5 file")
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as err:
        raise SchemaError(f"{path}: unreadable HDF5 (truncated or damaged): {err}") from err
    with f, damage_named(path):
        version, found = attr(f, "schema_version"), attr(f, "kind")
        if version is None or found is None:
            raise SchemaError(f"{path}: HDF5 file without schema_version/kind attributes: "
                              "not a dos-screener shard")
        if version != SCHEMA_VERSION:
            raise SchemaError(f"{path}: schema version {version}, this screener "
                              f"reads version {SCHEMA_VERSION}")
        if kind is not None and found != kind:
            raise SchemaError(f"{path}: a {found!r} shard where a {kind!r} shard was expected")
        if model_hash is not None and attr(f, "model_hash") != model_hash:
            raise SchemaError(f"{path}: written by model hash {attr(f, 'model_hash')!r}, "
                              f"expected {model_hash!r}")
        yield f


def attr(f: h5py.Group, key: str) -> Any:
    """An attribute, strings as str however they were stored; None if absent."""
    value = f.attrs.get(key)
    return value.decode() if isinstance(value, bytes) else value


@contextmanager
def damage_named(path: str | Path) -> Iterator[None]:
    """What h5py raises on a failed checksum or damaged metadata, as a SchemaError naming the file."""
    try:
        yield
    except (OSError, KeyError, RuntimeError, ValueError) as err:
        raise SchemaError(f"{path}: damaged or incomplete shard: {err}") from err


def shard_info(path: str | Path) -> dict[str, Any]:
    """The manifest record of a complete shard, also for registering one found after a crash."""
    with _open_shard(path) as f:
        ids = list(_read(f["ids"])) + list(_read(f["failures/ids"]))
        record = {"kind": attr(f, "kind"), "n": len(f["ids"]),
                  "n_failed": len(f["failures/ids"]), "ids_sha256": ids_digest(ids)}
    return {**record, "size": Path(path).stat().st_size, "sha256": file_sha256(path)}


def config_attr(config: dict[str, Any]) -> str:
    """A run's config as its shards keep it (CONFIG_ATTR), so that a lost manifest can be rebuilt."""
    return json.dumps(config, sort_keys=True)


def checked_shard_info(path: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    """shard_info of a shard written with `config`, after reading every dataset in full, which
    checks each of its checksums."""
    with _open_shard(path) as f:
        if attr(f, CONFIG_ATTR) != config_attr(config):
            raise SchemaError(f"{path}: written by a run with other settings")
        _read_all(f)
    return shard_info(path)


def _read_all(group: h5py.Group) -> None:
    for obj in group.values():
        if isinstance(obj, h5py.Group):
            _read_all(obj)
        else:
            obj[()]


def read_graph_shard(path: str | Path, info: dict | None = None, verify: bool = False
                     ) -> tuple[dict[str, np.ndarray], list[dict], list[Failure]]:
    """The table (GRAPH_COLUMNS), graphs and failures of one graph shard.

    The table is what a prediction shard's table starts from.
    """
    with _open_shard(path, "graphs", info, verify) as f:
        table = {name: _read(f[name]) for name in GRAPH_COLUMNS}
        return table, read_graphs(f["graphs"]), _read_failures(f)


class Manifest:
    """The list of complete shards: manifest.json (a snapshot) plus the journal it names.

    The snapshot holds the config, the shards complete when it was written and the name of its
    journal; the journal gets one JSON line per shard added or discarded since. Appending a line
    costs the same at shard 10 as at shard 80,000, whereas rewriting the whole list per shard
    makes a run's bookkeeping quadratic in its size. The snapshot is rewritten (with a new,
    empty journal) only when the journal holds as many lines as the snapshot has shards, so the
    total work stays linear. One writer (the driver); readers need no lock: the snapshot is
    replaced by rename, journals only grow, and a torn last line (a crash mid-append) is ignored.
    """

    def __init__(self, results_dir: str | Path, config: dict[str, Any],
                 shards: dict[str, dict[str, Any]], generation: int = 0, n_logged: int = 0):
        self.dir = Path(results_dir)
        self.config = config
        self.shards = shards
        self.generation = generation
        self.n_logged = n_logged
        self.rebuilt_because: str | None = None

    @classmethod
    def create(cls, results_dir: str | Path, config: dict[str, Any]) -> Manifest:
        """Start a results dir; shards from any earlier run there are no longer listed."""
        manifest = cls(results_dir, dict(config), {})
        manifest.dir.mkdir(parents=True, exist_ok=True)
        manifest._snapshot()
        return manifest

    @classmethod
    def load(cls, results_dir: str | Path) -> Manifest:
        """The current list; retried when the writer starts a new journal between two reads."""
        for _ in range(10):
            data = _read_snapshot(Path(results_dir) / MANIFEST)
            try:
                journal = (Path(results_dir) / _journal_name(data["generation"])).read_bytes()
            except FileNotFoundError:
                continue
            manifest = cls(results_dir, data["config"], data["shards"], data["generation"])
            try:
                manifest._replay(journal)
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
                raise ManifestDamaged(f"{manifest.dir / _journal_name(manifest.generation)}: "
                                      f"damaged line: {err}") from err
            return manifest
        raise SchemaError(f"{Path(results_dir) / MANIFEST}: its journal keeps disappearing; "
                          f"is another run compacting it?")

    @classmethod
    def open(cls, results_dir: str | Path, config: dict[str, Any]) -> Manifest:
        """The manifest a run writes to: a new one, or the existing one when resuming.

        Resuming with a different config (another model, another input) is refused, because the
        shards already listed would silently mix with the new ones. A resumed manifest starts a
        new journal, so a line torn by the crash is never followed by new ones. A missing or
        damaged manifest is rebuilt from the shards (see `rebuild`).
        """
        config = json.loads(json.dumps(config))  # compare as stored: tuples become lists
        if not (Path(results_dir) / MANIFEST).exists():
            return cls.rebuild(results_dir, config)
        try:
            manifest = cls.load(results_dir)
        except ManifestDamaged as damage:
            manifest = cls.rebuild(results_dir, config)
            manifest.rebuilt_because = str(damage)
            return manifest
        changed = {key: (manifest.config.get(key), value) for key, value in config.items()
                   if manifest.config.get(key) != value}
        if changed:
            raise SchemaError(f"{manifest.dir / MANIFEST}: made by a run with other settings "
                              f"(was, now): {changed}; use a new results directory")
        manifest._snapshot()
        return manifest

    @classmethod
    def rebuild(cls, results_dir: str | Path, config: dict[str, Any]) -> Manifest:
        """A new manifest listing each shard file written with `config` (its CONFIG_ATTR) whose
        every checksum holds; the run makes the others again. Only the writing run may call it.
        """
        manifest = cls.create(results_dir, config)
        for journal in manifest.dir.glob("manifest.*.jsonl"):
            if journal.name != _journal_name(manifest.generation):
                journal.unlink()
        for kind in KINDS:
            for path in sorted((manifest.dir / kind).glob(f"{kind}-*.h5")):
                try:
                    info = checked_shard_info(path, config)
                except SchemaError:
                    continue
                manifest.shards[f"{kind}/{path.name}"] = info
        manifest._snapshot()
        return manifest

    def add(self, name: str, info: dict[str, Any]) -> None:
        """Record a complete shard by its name relative to the results dir (see shard_name).

        `info` is the record a write_*_shard returned (or shard_info); extra keys are kept.
        """
        missing = [key for key in RECORD_KEYS if key not in info]
        if missing or info["kind"] not in KINDS:
            raise ValueError(f"{name}: manifest record lacks {missing} or its kind: {info}")
        self.shards[name] = dict(info)
        self._log({"add": name, "info": self.shards[name]})

    def discard(self, name: str) -> None:
        """Unlist a shard found damaged, so that readers skip it until it is written again."""
        if self.shards.pop(name, None) is not None:
            self._log({"discard": name})

    def has(self, name: str, ids_sha256: str | None = None) -> bool:
        """Whether shard `name` is complete (and, given a digest, made from those same ids)."""
        info = self.shards.get(name)
        return info is not None and ids_sha256 in (None, info["ids_sha256"])

    def complete(self, kind: str) -> list[str]:
        """Names of the complete shards of `kind` in chunk order."""
        return sorted((name for name, info in self.shards.items() if info["kind"] == kind),
                      key=lambda name: (len(name), name))

    def _replay(self, journal: bytes) -> None:
        *lines, _torn_or_empty = journal.split(b"\n")
        for line in lines:
            entry = json.loads(line)
            if "add" in entry:
                if not _is_record(entry["info"]):
                    raise KeyError(f"{entry['add']}: a record without {RECORD_KEYS}")
                self.shards[entry["add"]] = entry["info"]
            else:
                self.shards.pop(entry["discard"], None)
        self.n_logged = len(lines)

    def _log(self, entry: dict[str, Any]) -> None:
        if self.n_logged >= max(JOURNAL_MIN_LINES, len(self.shards)):
            self._snapshot()
            return
        with open(self.dir / _journal_name(self.generation), "ab") as f:
            f.write(json.dumps(entry, sort_keys=True).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self.n_logged += 1

    def _snapshot(self) -> None:
        """Write every shard into a new snapshot that starts an empty journal; drop the old one."""
        old = self.dir / _journal_name(self.generation)
        self.generation += 1
        journal = self.dir / _journal_name(self.generation)
        journal.write_bytes(b"")
        _fsync(journal)
        path = self.dir / MANIFEST
        tmp = path.with_name(MANIFEST + ".tmp")
        data = {"schema_version": MANIFEST_VERSION, "config": self.config, "shards": self.shards,
                "generation": self.generation}
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        _replace_durably(tmp, path)
        old.unlink(missing_ok=True)
        self.n_logged = 0


def _journal_name(generation: int) -> str:
    return f"manifest.{generation}.jsonl"


def _read_snapshot(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SchemaError(f"{path}: missing: not a results directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestDamaged(f"{path}: not valid JSON: {err}") from err
    found = data.get("schema_version") if isinstance(data, dict) else None
    if isinstance(found, int) and found != MANIFEST_VERSION:
        raise SchemaError(f"{path}: schema version {found!r}, this screener reads "
                          f"version {MANIFEST_VERSION}")
    if (found != MANIFEST_VERSION or not isinstance(data.get("config"), dict)
            or not isinstance(data.get("generation"), int)
            or not isinstance(data.get("shards"), dict)
            or not all(_is_record(info) for info in data["shards"].values())):
        raise ManifestDamaged(f"{path}: not a manifest of version {MANIFEST_VERSION}: damaged")
    return data


def _is_record(info: Any) -> bool:
    return isinstance(info, dict) and all(key in info for key in RECORD_KEYS)


def results_dir_problem(results_dir: str | Path) -> str | None:
    """Why a results dir cannot be made or written at `results_dir`, in words; None if it can."""
    path = Path(results_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK):
        return f"cannot write in {existing} (read-only or no permission)"
    return None


def prepare_results_dir(results_dir: str | Path) -> Path:
    """Make the results dir and its shard folders, or say in one line why they cannot be made."""
    out = Path(results_dir)
    problem = results_dir_problem(out)
    try:
        if problem is None:
            for kind in KINDS:
                (out / kind).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        problem = f"cannot make {out}: {err.strerror}"
    if problem:
        raise ScreenerError(f"{out}: {problem}")
    return out


@contextmanager
def run_lock(results_dir: str | Path) -> Iterator[None]:
    """Hold the results dir for the one run that writes it; another is refused at once. The lock
    is the kernel's (flock), so it ends with its holder: a killed run's lock is free."""
    from filelock import FileLock, Timeout

    path = Path(results_dir) / LOCK
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ScreenerError(f"{results_dir}: another `screen run` is writing here (it holds "
                            f"{path}); wait for it to end, or use another -o") from None
    try:
        yield
    finally:
        lock.release()


def complete_shards(results_dir: str | Path, kind: str = "predictions") -> list[tuple[Path, dict]]:
    """(path, manifest record) of each complete shard of `kind`, in chunk order."""
    manifest = Manifest.load(results_dir)
    return [(manifest.dir / name, manifest.shards[name]) for name in manifest.complete(kind)]


def _concat(shards: list[tuple[Path, dict]], names: list[str], verify: bool,
            model_hash: str | None) -> dict[str, np.ndarray]:
    parts = []
    for path, info in shards:
        with _open_shard(path, "predictions", info, verify, model_hash) as f:
            parts.append({name: _column(f, name) for name in names})
    if not parts:
        empty = empty_prediction_table()
        return {name: empty[name] for name in names}
    return {name: np.concatenate([part[name] for part in parts]) for name in names}


def read_predictions(results_dir: str | Path, columns: Iterable[str] | None = None,
                     verify: bool = False, model_hash: str | None = None) -> dict[str, np.ndarray]:
    """Columns of all complete prediction shards, concatenated in chunk order.

    Only shards the manifest lists are read, so this is safe while a run is still writing.
    """
    names = list(PREDICTION_COLUMNS if columns is None else columns)
    unknown = set(names) - set(PREDICTION_COLUMNS)
    if unknown:
        raise ValueError(f"unknown prediction columns {sorted(unknown)}; known: "
                         f"{list(PREDICTION_COLUMNS)}")
    return _concat(complete_shards(results_dir, "predictions"), names, verify, model_hash)


def find_prediction(results_dir: str | Path, structure_id: str) -> dict[str, Any]:
    """Every column of one structure's prediction, reading only the ids of the other shards."""
    for path, info in complete_shards(results_dir, "predictions"):
        with _open_shard(path, "predictions", info) as f:
            hits = np.flatnonzero(_read(f["ids"]) == structure_id)
            if hits.size:
                row = {name: _column(f, name)[hits[0]] for name in PREDICTION_COLUMNS
                       if name != "dos"}
                return {**row, "dos": f["dos"][hits[0]]}
    raise ScreenerError(f"{structure_id!r} has no prediction in {results_dir}")


def read_failures(results_dir: str | Path, verify: bool = False) -> list[Failure]:
    """Failure records of all complete shards, graph shards first; exact repeats dropped."""
    failures: list[Failure] = []
    for kind in KINDS:
        for path, info in complete_shards(results_dir, kind):
            with _open_shard(path, kind, info, verify) as f:
                failures += _read_failures(f)
    return list(dict.fromkeys(failures))


def _read_rows(shards: list[tuple[Path, dict]], names: list[str], rows: np.ndarray,
               verify: bool, model_hash: str | None) -> dict[str, np.ndarray]:
    """Columns at global row numbers (any order), opening only the shards that hold some."""
    parts, found, start = [], [], 0
    for path, info in shards:
        local = np.sort(rows[(rows >= start) & (rows < start + info["n"])] - start)
        if len(local):
            with _open_shard(path, "predictions", info, verify, model_hash) as f:
                parts.append({name: _column(f, name)[local] for name in names})
            found.append(local + start)
        start += info["n"]
    if not parts:
        empty = empty_prediction_table()
        return {name: empty[name] for name in names}
    where = np.searchsorted(np.concatenate(found), rows)
    return {name: np.concatenate([part[name] for part in parts])[where] for name in names}


def _order(values: np.ndarray, descending: bool) -> np.ndarray:
    """Stable sort order; ties keep their stored order in both directions."""
    if not descending:
        return np.argsort(values, kind="stable")
    return (len(values) - 1 - np.argsort(values[::-1], kind="stable"))[::-1]


def query(results_dir: str | Path, bandgap: tuple[float | None, float | None] | None = None,
          elements: Iterable[str] = (), exclude: Iterable[str] = (), formula: str | None = None,
          dos_at_ef: tuple[float | None, float | None] | None = None,
          n_atoms: tuple[int | None, int | None] | None = None, sort: str | None = "auto",
          limit: int | None = None, with_dos: bool = False, min_probability: float | None = None,
          in_domain_only: bool = False, verify: bool = False, model_hash: str | None = None) -> dict[str, np.ndarray]:
    """Rows of the complete predictions that pass every filter, sorted, at most `limit`.

    `bandgap` keeps the rows of `shortlisted`, with `min_probability` by default the one the
    model chose on validation (the shards' `min_probability`, else 0.5); `p_in_window` is a
    column of the result. `in_domain_only` drops structures outside the
    model's applicability domain. Other ranges are inclusive (lo, hi) with None
    for an open end; `elements` must all be present, none of `exclude` may be; `sort` names a
    column (a name with its unit too), '-' prefix for descending, None keeps chunk order,
    "auto" is -p_in_window with a window and band_gap without. Only the filter and sort
    columns are read for every row; the other columns, and the dos matrix when `with_dos`,
    only from shards holding a returned row.
    """
    shards = complete_shards(results_dir, "predictions")  # once: a running job may add shards
    columns = _row_columns(shards, verify, model_hash)
    if sort == "auto":
        sort = f"-{WINDOW_COLUMN}" if bandgap is not None else "band_gap"
    sort_by = None if sort is None else plain_name(sort.removeprefix("-"))
    sortable = columns + ([WINDOW_COLUMN] if bandgap is not None else [])
    if sort_by is not None and sort_by not in sortable:
        raise UnknownColumn(f"cannot sort by {sort_by!r}; columns: {', '.join(sortable)}")
    symbols = [(e, True) for e in _symbols(elements)] + [(e, False) for e in _symbols(exclude)]
    ranges = {"dos_at_ef": dos_at_ef, "n_atoms": n_atoms}
    ranges = {column: bounds for column, bounds in ranges.items() if bounds is not None}
    window = ("p_metal", "band_gap_mean", "band_gap_std") if bandgap is not None else ()
    point = ("band_gap",) if bandgap is not None else ()
    wanted = {*ranges, *window, *point, sort_by, "formula" if formula is not None else None,
              "elements" if symbols else None, "in_domain" if in_domain_only else None}
    filtered = [c for c in columns if c in wanted]
    table = _concat(shards, filtered, verify, model_hash)
    keep = np.ones(sum(info["n"] for _, info in shards), dtype=bool)
    if bandgap is not None:
        table[WINDOW_COLUMN] = p_in_window(*(table[c] for c in window), *bandgap)
        threshold = default_min_probability(shards) if min_probability is None else min_probability
        keep &= shortlisted(table[WINDOW_COLUMN], table["band_gap"], bandgap, threshold)
    for column, bounds in ranges.items():
        keep &= in_range(table[column], bounds)
    if in_domain_only:
        keep &= table["in_domain"]
    if formula is not None:
        keep &= table["formula"] == formula
    if symbols:
        padded = np.char.add(np.char.add(" ", table["elements"]), " ")
        for symbol, present in symbols:
            keep &= (np.char.find(padded, f" {symbol} ") >= 0) == present
    rows = np.flatnonzero(keep)
    if sort_by is not None:
        rows = rows[_order(table[sort_by][rows], sort.startswith("-"))]
    rows = rows[:limit]
    rest = [c for c in columns if c not in filtered] + (["dos"] if with_dos else [])
    found = {**{c: table[c][rows] for c in table},
             **_read_rows(shards, rest, rows, verify, model_hash)}
    order = [*columns[:5], *([WINDOW_COLUMN] if bandgap is not None else []), *columns[5:], "dos"]
    return {c: found[c] for c in order if c in found}


def default_min_probability(shards: list[tuple[Path, dict]]) -> float:
    """The P(in window) a shortlist needs by default: the model's choice on validation, which
    its prediction shards carry, or 0.5 for shards without one."""
    for path, info in shards[:1]:
        with _open_shard(path, "predictions", info) as f:
            return float(f.attrs.get("min_probability", 0.5))
    return 0.5


def plain_name(column: str) -> str:
    """A column's name without the unit that tables show it with (band_gap_eV -> band_gap)."""
    for name, unit in UNITS.items():
        if column == f"{name}_{unit}":
            return name
    return column


def with_units(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows with each column named with its unit, as tables and CSV files show them."""
    return {f"{c}_{UNITS[c]}" if c in UNITS else c: v for c, v in rows.items()}


def _row_columns(shards: list[tuple[Path, dict]], verify: bool, model_hash: str | None
                 ) -> list[str]:
    """The one-value-per-row columns the shards hold (those of PREDICTION_COLUMNS first, in its
    order; those an older shard lacks are derived, see _DERIVED), read from the first shard, so
    that columns a newer model adds are queried too."""
    names = [c for c in PREDICTION_COLUMNS if c != "dos"]
    if shards:
        path, info = shards[0]
        with _open_shard(path, "predictions", info, verify, model_hash) as f:
            held = sorted(name for name, obj in f.items()
                          if isinstance(obj, h5py.Dataset) and obj.ndim == 1)
        names = ([c for c in names if c in held or c in _DERIVED]
                 + [c for c in held if c not in names])
    return names


def _symbols(elements: Iterable[str]) -> list[str]:
    """Element symbols from a list or one space/comma separated string ("Al O", "Al,O")."""
    if isinstance(elements, str):
        return elements.replace(",", " ").split()
    return list(elements)


def _cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "nan" if np.isnan(value) else f"{value:.4g}"
    return str(value)


def format_table(rows: dict[str, np.ndarray], columns: Sequence[str] | None = None) -> str:
    """Aligned text table of 1-D columns (all of them by default): numbers right, text left."""
    columns = [c for c in rows if np.ndim(rows[c]) == 1] if columns is None else list(columns)
    cells = [[_cell(v) for v in rows[c]] for c in columns]
    widths = [max([len(c), *map(len, col)]) for c, col in zip(columns, cells)]
    numeric = [rows[c].dtype.kind in "iuf" for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    body = [line(row) for row in zip(*cells)]
    return "\n".join([line(columns), line(["-" * w for w in widths]), *body])


def write_csv(rows: dict[str, np.ndarray], path_or_stream: str | Path | IO[str],
              columns: Sequence[str] | None = None) -> None:
    """CSV of the rows; a 2-D column such as dos becomes columns name_0, name_1, ..."""
    columns = list(rows) if columns is None else list(columns)
    header, blocks = [], []
    for c in columns:
        block = np.asarray(rows[c])
        if block.ndim == 2:
            header += [f"{c}_{j}" for j in range(block.shape[1])]
            blocks.append(block)
        else:
            header.append(c)
            blocks.append(block[:, None])
    if isinstance(path_or_stream, (str, Path)):
        with open(path_or_stream, "w", newline="") as fh:
            _write_csv_rows(fh, header, blocks)
    else:
        _write_csv_rows(path_or_stream, header, blocks)


def _write_csv_rows(stream: IO[str], header: list[str], blocks: list[np.ndarray]) -> None:
    writer = csv.writer(stream)
    writer.writerow(header)
    n = len(blocks[0]) if blocks else 0
    for i in range(n):
        writer.writerow([_plain(v) for block in blocks for v in block[i]])


def _plain(value: Any) -> Any:
    """A JSON/CSV-ready Python value; float32 keeps its shortest repr (1.3, not 1.2999999523)."""
    if isinstance(value, np.floating):
        return None if np.isnan(value) else float(str(value))
    return value.item() if isinstance(value, np.generic) else value


def to_json(rows: dict[str, np.ndarray]) -> str:
    """JSON list of row objects (2-D columns as lists), the form jq and pandas read directly."""
    n = len(next(iter(rows.values()))) if rows else 0
    records = [{c: ([_plain(v) for v in col[i]] if np.ndim(col) == 2 else _plain(col[i]))
                for c, col in rows.items()} for i in range(n)]
    return json.dumps(records, indent=1)
