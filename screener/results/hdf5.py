"""The HDF5 layer that shards and training sets share: every byte a reader uses under a checksum
HDF5 checks on each read, so damage is an error naming the file, never a wrong value."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from screener.errors import ScreenerError

STR = np.str_
# Graph shards are an internal hand-off read back once by this code: lzf writes ~1.6x faster
# than gzip-4 at equal read speed (real JARVIS graphs), and the 1.5x larger file is immaterial.
# Prediction shards are the user-facing result: gzip is in every HDF5 build, lzf only in h5py.
GRAPH_FILTER = {"compression": "lzf"}
# Integrity on every read at the cost of a sum per chunk: each dataset with rows is chunked with
# HDF5's fletcher32 checksum, strings are fixed-length so that their bytes lie in those chunks
# (variable-length strings live in a heap no checksum covers), and files are written in the
# HDF5 1.10 format, whose object headers, and so numeric attributes, carry checksums too.
# Shards keep string attributes as fixed-length bytes in those headers too (read them with
# `attr`): HDF5 loops forever on some damaged variable-length heaps.
CHECKSUM = {"fletcher32": True}
LIBVER = ("v110", "v110")
# String attributes of training sets and label parts lie in a heap that no HDF5 checksum
# covers; a digest of all attributes, kept beside them, covers them instead.
ATTRS_SHA256 = "attrs_sha256"


def attrs_digest(attrs: h5py.AttributeManager) -> str:
    """sha256 of every attribute but the digest itself (ATTRS_SHA256)."""
    values = {key: np.asarray(value).tolist() for key, value in attrs.items()
              if key != ATTRS_SHA256}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=repr).encode()).hexdigest()


class SchemaError(ScreenerError):
    """A file that is not a readable shard of this schema: foreign, damaged or another version."""


def screener_version() -> str:
    try:
        return metadata.version("dos-screener")
    except metadata.PackageNotFoundError:  # running from a source checkout
        return "unknown"


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


def read_dataset(dataset: h5py.Dataset) -> np.ndarray:
    if h5py.check_string_dtype(dataset.dtype) is not None:
        return np.asarray(dataset.asstr()[()], dtype=STR)
    return dataset[()]


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
