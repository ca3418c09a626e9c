"""HDF5 shards of graphs and predictions (layout: schemas/shards.json).

A shard is written to ``<name>.h5.tmp`` and renamed when complete, so a file under its final
name is whole; its manifest record holds its size and sha256 so later damage is caught and
names the file."""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from screener.dos import ENERGY_GRID
from screener.io.files import file_sha256, replace_durably, tmp_path
from screener.results.hdf5 import (
    LIBVER,
    STR,
    SchemaError,
    attr,
    create_dataset,
    damage_named,
    read_dataset,
    read_graphs,
    screener_version,
    write_graphs,
)

if TYPE_CHECKING:
    from screener.io import Failure, Structure
SCHEMA_VERSION = 1
KINDS = ("graphs", "predictions")
# A prediction shard's table is its graph shard's table plus the spectral columns.
GRAPH_COLUMNS: dict[str, Any] = {"ids": STR, "source": STR, "formula": STR, "elements": STR,
                                 "n_atoms": np.int32}
PREDICTION_COLUMNS: dict[str, Any] = {
    **GRAPH_COLUMNS, "band_gap": np.float32, "band_gap_std": np.float32, "p_metal": np.float32,
    "dos_band_gap": np.float32, "vbm": np.float32, "cbm": np.float32, "dos_at_ef": np.float32,
    "band_gap_mean": np.float32, "in_domain": np.bool_, "dos": np.float32}
# The columns of a model without a gap head, from its band_gap (read off the spectrum, with
# certainty 1, by a model whose domain was not recorded): what older shards lack.
DERIVED = {"dos_band_gap": lambda gap: gap, "band_gap_mean": lambda gap: gap,
            "band_gap_std": np.zeros_like, "p_metal": lambda gap: (gap == 0).astype(np.float32),
            "in_domain": lambda gap: np.ones(gap.shape, np.bool_)}
FAILURE_FIELDS = ("ids", "sources", "stages", "reasons")
REQUIRED_ATTRS = ("model_id", "model_hash")
PREDICTION_FILTER = {"compression": "gzip", "compression_opts": 4}
DOS_CHUNK_ROWS = 256
CONFIG_ATTR = "run_config"


def shard_name(kind: str, index: int) -> str:
    """Name of chunk `index`'s shard relative to the results dir, so a resumed run finds it."""
    if kind not in KINDS:
        raise ValueError(f"shard kind must be one of {KINDS}, not {kind!r}")
    return f"{kind}/{kind}-{index:05d}.h5"


def ids_digest(ids: Iterable[str]) -> str:
    """Order-free sha256 of a chunk's ids, so a resumed run can tell its input changed."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


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
        self.tmp = tmp_path(self.path)
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
                replace_durably(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)


def read_column(f: h5py.File, name: str) -> np.ndarray:
    """A prediction shard's column; an older shard's missing one derived (DERIVED)."""
    return read_dataset(f[name]) if name in f or name not in DERIVED else DERIVED[name](
        read_dataset(f["band_gap"]))


def write_failures(f: h5py.File, failures: Sequence[Failure]) -> None:
    group = f.create_group("failures")
    for name, field in zip(FAILURE_FIELDS, ("id", "source", "stage", "reason")):
        create_dataset(group, name, np.array([getattr(x, field) for x in failures], dtype=STR), {})


def read_shard_failures(f: h5py.File) -> list[Failure]:
    from screener.io import Failure  # lazily: keeps jarvis-tools out of plain queries

    columns = [read_dataset(f["failures"][name]) for name in FAILURE_FIELDS]
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
        write_failures(f, failures)
    return writer.info


def empty_prediction_table() -> dict[str, np.ndarray]:
    """Zero rows of every prediction column, for a chunk in which nothing was predicted."""
    return {name: np.empty((0, len(ENERGY_GRID)) if name == "dos" else 0, dtype)
            for name, dtype in PREDICTION_COLUMNS.items()}


def write_prediction_shard(path: str | Path, table: dict[str, Any], failures: Sequence[Failure],
                           attrs: dict[str, Any]) -> dict[str, Any]:
    """Write one chunk's predictions (the columns of PREDICTION_COLUMNS; a table without the
    gap head's columns is a model's without one, see DERIVED).

    `attrs` may carry the model's own energy_grid; dos.ENERGY_GRID otherwise.
    Returns the manifest record for Manifest.add.
    """
    attrs = {"energy_grid": ENERGY_GRID, **attrs}
    if "band_gap" in table:
        gap = np.asarray(table["band_gap"], np.float32)
        table = {**{name: derive(gap) for name, derive in DERIVED.items()}, **table}
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
        write_failures(f, failures)
    return writer.info


@contextmanager
def open_shard(path: str | Path, kind: str | None = None, info: dict | None = None,
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


def shard_info(path: str | Path) -> dict[str, Any]:
    """The manifest record of a complete shard, also for registering one found after a crash."""
    with open_shard(path) as f:
        ids = list(read_dataset(f["ids"])) + list(read_dataset(f["failures/ids"]))
        record = {"kind": attr(f, "kind"), "n": len(f["ids"]),
                  "n_failed": len(f["failures/ids"]), "ids_sha256": ids_digest(ids)}
    return {**record, "size": Path(path).stat().st_size, "sha256": file_sha256(path)}


def config_attr(config: dict[str, Any]) -> str:
    """A run's config as its shards keep it (CONFIG_ATTR), so that a lost manifest can be rebuilt."""
    return json.dumps(config, sort_keys=True)


def checked_shard_info(path: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    """shard_info of a shard written with `config`, after reading every dataset in full, which
    checks each of its checksums."""
    with open_shard(path) as f:
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
    with open_shard(path, "graphs", info, verify) as f:
        table = {name: read_dataset(f[name]) for name in GRAPH_COLUMNS}
        return table, read_graphs(f["graphs"]), read_shard_failures(f)
