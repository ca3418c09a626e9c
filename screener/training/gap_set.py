"""Known band gaps as weak DOS targets, for structures that have a gap but no spectrum.

JARVIS lists an optB88vdW gap for 1,581 of the 2,312 structures here and a DOS for none, while
a GPAW DOS costs minutes per structure. A gap still says much about a spectrum: with the
labels' energy zero (dft.GAP_ZERO_OFFSET) it fixes an energy range where the DOS is zero, and
a metal must have states at E_F. Those become per-bin bounds that a predicted spectrum is
pushed inside, so these structures teach the model gaps for the price of a graph.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from screener.dft.gpaw import GAP_ZERO_OFFSET
from screener.dos import E_STEP, ENERGY_GRID, GAP_THRESHOLD, N_BINS, band_gap
from screener.graphs import build_graphs
from screener.io import Structure, load, read_records, record_sources
from screener.io.records import reference_gap
from screener.training.dataset import SPLIT_SEED, split_by_id

# Kept free of the bound at each band edge: the GPAW labels' gaps differ from JARVIS
# optB88vdW by 0.17 eV on average (check-labels), and their 0.1 eV broadening reaches in.
EDGE_MARGIN = 0.2
# The least DOS a JARVIS metal (gap 0) is pushed to in the bins within METAL_WINDOW eV of E_F:
# 3x the gap threshold, still 4x under the smallest metal measured (0.012, dos.GAP_THRESHOLD).
# More than the E_F bin alone, so a model cannot meet it with a spike there.
METAL_FLOOR = 3 * GAP_THRESHOLD
METAL_WINDOW = 0.05


@dataclass
class GapSet:
    """Structures with a known gap: ids, graphs, gaps, (n, 2, 300) lower/upper DOS bounds and
    a train/val/test split of the rows by id (dataset.split_by_id)."""

    ids: list[str]
    graphs: list[dict]
    gaps: np.ndarray
    bounds: np.ndarray
    split: dict[str, np.ndarray]

    @classmethod
    def empty(cls) -> GapSet:
        """No structures: for fits on the labelled set's own gaps alone."""
        return cls([], [], np.empty(0), np.empty((0, 2, N_BINS)),
                   {name: np.empty(0, np.int64) for name in ("train", "val", "test")})


def dos_bounds(gap: float) -> np.ndarray | None:
    """(2, 300) lower and upper bound per bin a spectrum with this gap keeps to; None when the
    gap says nothing sure (a gap narrower than both edge margins)."""
    lower = np.zeros(N_BINS, np.float32)
    upper = np.full(N_BINS, np.inf, np.float32)
    if gap == 0:
        lower[np.abs(ENERGY_GRID) <= METAL_WINDOW + 1e-9] = METAL_FLOOR
        return np.stack([lower, upper])
    vbm = -min(gap / 2, GAP_ZERO_OFFSET)
    inside = ((ENERGY_GRID - E_STEP / 2 >= vbm + EDGE_MARGIN)
              & (ENERGY_GRID + E_STEP / 2 <= vbm + gap - EDGE_MARGIN))
    if not inside.any():
        return None
    upper[inside] = 0.0
    return np.stack([lower, upper])


def spectrum_bounds(dos: np.ndarray) -> np.ndarray:
    """(n, 2, 300) bounds of labelled spectra from their own gaps: zero strictly between VBM
    and CBM. The spectrum loss alone barely feels a gap's few near-zero bins (the model trained
    on CS2's 2.8 eV gap predicted 1.45 eV); these bounds weigh them like a gap-set gap."""
    gap, vbm, cbm = band_gap(np.atleast_2d(dos))
    inside = (gap[:, None] > 0) & (ENERGY_GRID > vbm[:, None]) & (ENERGY_GRID < cbm[:, None])
    upper = np.where(inside, 0.0, np.inf).astype(np.float32)
    return np.stack([np.zeros_like(upper), upper], axis=1)


def read_gap_set(path: str | Path, exclude: Iterable[str] = (), seed: int = SPLIT_SEED
                 ) -> GapSet:
    """Every structure in a JARVIS record file with a usable gap and graph, minus `exclude`.

    The split follows each id (dataset.split_by_id), so every training worker and the
    evaluation afterwards see the same rows, and a structure keeps its part when the
    exclusions change as the labelled set grows. Training uses SPLIT_SEED whatever its own seed,
    so that runs differing only in seed are scored on the same gap-set rows.
    """
    skip = set(exclude)
    kept: list[tuple[Structure, float, np.ndarray]] = []
    records = read_records(path)
    for source, record in zip(record_sources(path, records), records, strict=True):
        if source.id in skip or not isinstance(record, dict):
            continue
        gap = reference_gap(record)
        bounds = dos_bounds(gap) if np.isfinite(gap) else None
        structure = load(source) if bounds is not None else None
        if isinstance(structure, Structure):
            kept.append((structure, gap, bounds))
    graphs = build_graphs([(s.lattice, s.positions, s.numbers) for s, _, _ in kept])
    rows = [(s.id, g, gap, b) for (s, gap, b), g in zip(kept, graphs) if isinstance(g, dict)]
    return GapSet(ids=[r[0] for r in rows], graphs=[r[1] for r in rows],
                  gaps=np.array([r[2] for r in rows], np.float64),
                  bounds=np.stack([r[3] for r in rows]) if rows else np.zeros((0, 2, N_BINS)),
                  split=split_by_id([r[0] for r in rows], seed))


def bounds_excess(dos: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """(B,): per structure, how far its DOS lies outside its bounds, summed over bins and
    divided by N_BINS: the spectrum L1 of an ordinary target, counting only the bins the gap
    knows. Every bin weighs the same whichever structure it belongs to; a mean over each
    structure's own bounded bins made a metal's few E_F bins outweigh a gap's many, and the
    model answered with a DOS spike at E_F for every structure (measured: 49 of 50 gapped
    test structures predicted metallic)."""
    excess = torch.relu(bounds[:, 0] - dos) + torch.relu(dos - bounds[:, 1])
    return excess.sum(1) / N_BINS
