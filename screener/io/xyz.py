"""Extended XYZ files: one frame with a periodic cell per file."""
from __future__ import annotations

import re

import numpy as np

from screener.io.structure import Problem
from screener.io.text import leading_numbers

_XYZ_KEY_VALUE = re.compile(r'(\w+)=("[^"]*"|\S+)')


def read_xyz(text: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Extended XYZ (Lattice="..." and Properties= in the comment line), one frame per file.
    The comma-separated 9-number cell line that jarvis' `write_xyz` writes is read too."""
    lines = text.splitlines()
    if not lines[0].strip().isdigit():
        raise Problem("validate", f"line 1 should hold the atom count, found {lines[0].strip()!r}")
    n_atoms = int(lines[0])
    header = lines[1] if len(lines) > 1 else ""
    lattice = _xyz_lattice(header)
    species, position = _xyz_columns(header)
    rows = [line.split() for line in lines[2:2 + n_atoms]]
    if len(rows) < n_atoms:
        raise Problem("validate", f"line 1 declares {n_atoms} atoms but only {len(rows)} follow")
    extra = next((i for i in range(2 + n_atoms, len(lines)) if lines[i].strip()), None)
    if extra is not None:
        raise Problem("validate", f"more than one frame: line {extra + 1} continues after the "
                                  f"{n_atoms} atoms, expected one structure per file")
    try:
        symbols = [row[species] for row in rows]
        positions = np.array([row[position:position + 3] for row in rows], dtype=np.float64)
        positions = positions.reshape(n_atoms, 3)
    except (IndexError, ValueError):
        i = next(i for i, row in enumerate(rows) if len(row) <= species
                 or not leading_numbers(" ".join(row[position:position + 3]), 3))
        raise Problem("validate", f"line {i + 3} should hold a symbol and 3 coordinates, "
                                  f"found {lines[i + 2].strip()!r}") from None
    return lattice, positions, symbols


def _xyz_lattice(header: str) -> np.ndarray:
    fields = {key.lower(): value.strip('"') for key, value in _XYZ_KEY_VALUE.findall(header)}
    values = fields["lattice"].split() if "lattice" in fields else header.split(",")
    try:
        return np.array(values, dtype=np.float64).reshape(3, 3)
    except ValueError:
        if "lattice" in fields:
            raise Problem("validate", f"Lattice on line 2 should hold 9 numbers, "
                                      f"found {fields['lattice']!r}") from None
        raise Problem("validate", 'no cell: line 2 has no Lattice="..." (extended XYZ); '
                                  "a periodic cell is required") from None


def _xyz_columns(header: str) -> tuple[int, int]:
    """Columns of the species and of the first position value, from Properties=."""
    fields = {key.lower(): value for key, value in _XYZ_KEY_VALUE.findall(header)}
    spec = fields.get("properties", "species:S:1:pos:R:3").split(":")
    columns, start = {}, 0
    for name, count in zip(spec[0::3], spec[2::3]):
        if not count.isdigit():
            raise Problem("validate", f"Properties on line 2 gives {name} {count!r} columns, "
                                      "not a whole number")
        columns[name] = start
        start += int(count)
    if "species" not in columns or "pos" not in columns:
        raise Problem("validate", f"Properties on line 2 lacks species or pos: {':'.join(spec)!r}")
    return columns["species"], columns["pos"]
