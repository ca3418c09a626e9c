"""Reading a results directory: predictions, failures, and queries over them. Only the shards
the manifest lists are read, so all of it is safe while a run still writes."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from screener.errors import ScreenerError
from screener.results.hdf5 import read_dataset
from screener.results.manifest import complete_shards
from screener.results.shards import (
    DERIVED,
    KINDS,
    PREDICTION_COLUMNS,
    empty_prediction_table,
    open_shard,
    read_column,
    read_shard_failures,
)
from screener.results.tables import plain_name
from screener.window import in_range, p_in_window, shortlisted

if TYPE_CHECKING:
    from screener.io import Failure
WINDOW_COLUMN = "p_in_window"


class UnknownColumn(ValueError):
    """A column name the prediction shards do not hold."""


def _concat(shards: list[tuple[Path, dict]], names: list[str], verify: bool,
            model_hash: str | None) -> dict[str, np.ndarray]:
    parts = []
    for path, info in shards:
        with open_shard(path, "predictions", info, verify, model_hash) as f:
            parts.append({name: read_column(f, name) for name in names})
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
        with open_shard(path, "predictions", info) as f:
            hits = np.flatnonzero(read_dataset(f["ids"]) == structure_id)
            if hits.size:
                row = {name: read_column(f, name)[hits[0]] for name in PREDICTION_COLUMNS
                       if name != "dos"}
                return {**row, "dos": f["dos"][hits[0]]}
    raise ScreenerError(f"{structure_id!r} has no prediction in {results_dir}")


def read_failures(results_dir: str | Path, verify: bool = False) -> list[Failure]:
    """Failure records of all complete shards, graph shards first; exact repeats dropped."""
    failures: list[Failure] = []
    for kind in KINDS:
        for path, info in complete_shards(results_dir, kind):
            with open_shard(path, kind, info, verify) as f:
                failures += read_shard_failures(f)
    return list(dict.fromkeys(failures))


def _read_rows(shards: list[tuple[Path, dict]], names: list[str], rows: np.ndarray,
               verify: bool, model_hash: str | None) -> dict[str, np.ndarray]:
    """Columns at global row numbers (any order), opening only the shards that hold some."""
    parts, found, start = [], [], 0
    for path, info in shards:
        local = np.sort(rows[(rows >= start) & (rows < start + info["n"])] - start)
        if len(local):
            with open_shard(path, "predictions", info, verify, model_hash) as f:
                parts.append({name: read_column(f, name)[local] for name in names})
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
        with open_shard(path, "predictions", info) as f:
            return float(f.attrs.get("min_probability", 0.5))
    return 0.5


def _row_columns(shards: list[tuple[Path, dict]], verify: bool, model_hash: str | None
                 ) -> list[str]:
    """The one-value-per-row columns the shards hold (those of PREDICTION_COLUMNS first, in its
    order; those an older shard lacks are derived, see DERIVED), read from the first shard, so
    that columns a newer model adds are queried too."""
    names = [c for c in PREDICTION_COLUMNS if c != "dos"]
    if shards:
        path, info = shards[0]
        with open_shard(path, "predictions", info, verify, model_hash) as f:
            held = sorted(name for name, obj in f.items()
                          if isinstance(obj, h5py.Dataset) and obj.ndim == 1)
        names = ([c for c in names if c in held or c in DERIVED]
                 + [c for c in held if c not in names])
    return names


def _symbols(elements: Iterable[str]) -> list[str]:
    """Element symbols from a list or one space/comma separated string ("Al O", "Al,O")."""
    if isinstance(elements, str):
        return elements.replace(",", " ").split()
    return list(elements)
