"""VASP POSCAR and CONTCAR files (VASP 5 and later: element symbols on line 6)."""
from __future__ import annotations

import numpy as np

from screener.io.structure import Problem
from screener.io.text import jarvis_message, leading_numbers


def read_poscar(text: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """jarvis parses; the layout check before it names the broken line, and the scale factor is
    applied here because jarvis ignores it for cartesian coordinates and for the negative
    (volume) form. Symbols such as 'Si_pv' or 'Si/<hash>' from VASP 6 CONTCARs become 'Si'."""
    from jarvis.io.vasp.inputs import Poscar

    lines = text.splitlines()
    problem = _poscar_layout_problem(lines)
    if problem:
        raise Problem("validate", f"unparsable POSCAR: {problem}")
    try:
        atoms = Poscar.from_string(text).atoms
    except Exception as error:
        raise Problem("validate", f"unparsable POSCAR: {jarvis_message(error)}") from error
    scale = float(lines[1].split()[0])
    raw = np.asarray(atoms.lattice_mat, dtype=np.float64) / scale
    factor = scale if scale > 0 else (-scale / abs(np.linalg.det(raw))) ** (1 / 3)
    lattice = raw * factor
    coords = np.asarray(atoms.coords, dtype=np.float64).reshape(-1, 3)
    positions = coords * factor if atoms.cartesian else coords @ lattice
    return lattice, positions, [s.split("/")[0].split("_")[0] for s in atoms.elements]


def _poscar_layout_problem(lines: list[str]) -> str | None:
    if len(lines) < 8:
        return f"only {len(lines)} lines, a POSCAR needs at least 8"
    if not leading_numbers(lines[1], 1) or float(lines[1].split()[0]) == 0:
        return f"line 2 should hold a non-zero scale factor, found {lines[1].strip()!r}"
    for i in (2, 3, 4):
        if not leading_numbers(lines[i], 3):
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
        if not leading_numbers(lines[i], 3):
            return f"line {i + 1} should hold 3 coordinates, found {lines[i].strip()!r}"
    return None
