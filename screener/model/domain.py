"""A model's applicability domain: the elements and cell sizes of the structures it trained on.

A prediction for a structure with an element the model never saw (its embedding never moved
from the CGCNN vector) or a cell larger than any it trained on is an extrapolation, and the
results say so instead of ranking it beside the rest.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def training_domain(numbers: Iterable[np.ndarray]) -> dict:
    """{"elements": sorted atomic numbers, "max_atoms": largest cell} of the given cells."""
    cells = [np.asarray(z) for z in numbers]
    return {"elements": sorted({int(z) for cell in cells for z in cell}),
            "max_atoms": max((cell.size for cell in cells), default=0)}


def in_domain(domain: dict | None, numbers: Sequence[np.ndarray]) -> np.ndarray:
    """Per cell, whether all its elements and its size lie in `domain` (None: no domain was
    recorded, so every cell counts as inside)."""
    if domain is None:
        return np.ones(len(numbers), np.bool_)
    known = np.zeros(256, np.bool_)
    known[domain["elements"]] = True
    return np.array([bool(known[np.asarray(z)].all()) and len(z) <= domain["max_atoms"]
                     for z in numbers], np.bool_)
