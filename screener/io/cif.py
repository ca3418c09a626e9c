"""CIF files: one ordered structure per file."""
from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

from screener.io.structure import Problem
from screener.io.text import jarvis_message, leading_numbers

_CIF_TOKEN = re.compile(r"'[^']*'(?=\s|$)|\"[^\"]*\"(?=\s|$)|\S+")
_P1_SYMMETRY = "loop_\n_symmetry_equiv_pos_as_xyz\n'x, y, z'\n\n"


def read_cif(text: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """jarvis parses the cell as written (no primitive reduction). It trips over CIFs without a
    symmetry loop, so a P1 loop goes in front; one written later in the file takes precedence.
    Multi-block and partially occupied CIFs are refused before jarvis sees them."""
    from jarvis.core.atoms import Atoms

    lines = text.splitlines()
    blocks = [i + 1 for i, line in enumerate(lines) if line.lower().startswith("data_")]
    if len(blocks) > 1:
        where = ", ".join(map(str, blocks))
        raise Problem("validate", f"CIF holds {len(blocks)} data blocks (lines {where}), "
                                  "expected one structure per file")
    partial = _partial_sites(lines)
    if partial:
        raise Problem("validate", f"partial occupancy on site(s) {', '.join(partial)}: "
                                  "only ordered structures can be screened")
    try:
        atoms = Atoms.from_cif(from_string=_P1_SYMMETRY + text, use_cif2cell=False,
                               get_primitive_atoms=False)
    except Exception as error:
        raise Problem("validate", f"unparsable CIF: {jarvis_message(error)}") from error
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
            if leading_numbers(value, 1) and float(value) != 1.0:
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
