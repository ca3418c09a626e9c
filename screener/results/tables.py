"""Rows of results as people and programs read them: units in column names, text tables, CSV
and JSON."""
from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

# Units of the columns, in the names that tables and CSV files show them under.
UNITS = {"band_gap": "eV", "band_gap_std": "eV", "band_gap_mean": "eV", "dos_band_gap": "eV",
         "vbm": "eV", "cbm": "eV", "dos_at_ef": "per_eV_per_electron"}


def plain_name(column: str) -> str:
    """A column's name without the unit that tables show it with (band_gap_eV -> band_gap)."""
    for name, unit in UNITS.items():
        if column == f"{name}_{unit}":
            return name
    return column


def with_units(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows with each column named with its unit, as tables and CSV files show them."""
    return {f"{c}_{UNITS[c]}" if c in UNITS else c: v for c, v in rows.items()}


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
