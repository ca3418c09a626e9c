"""Check the top of a shortlist with DFT, the ALIGNN-DOS workflow: screen by ML, confirm by GPAW.

The chosen structures are labelled by screener.dft.label under the label root `<results>/labels/`,
a training set for `screen train` (its level folder); a rerun, or one with another N or window,
computes only structures it has not seen. `<results>/verify.csv` compares
each predicted gap with the DFT gap; having id and source columns, it is also a shortlist that
`screen label` takes (e.g. to retry failures with a longer --timeout).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from screener.dft.gpaw import Settings
from screener.dft.label import (
    TIMEOUT,
    LabelSummary,
    label_inputs,
    latest_results,
    load_inputs,
    shortlist_sources,
)
from screener.results.query import query
from screener.results.tables import write_csv

LABELS = "labels"
TABLE = "verify.csv"
SHOWN = ("id", "formula", "predicted_gap", "dft_gap", "confirmed", "reason")


@dataclass
class Verification:
    """The compared rows (columns: id, source, SHOWN), best ranked first, and the labelling run."""

    rows: dict[str, np.ndarray]
    labelling: LabelSummary

    @property
    def n_checked(self) -> int:
        return int(np.isfinite(self.rows["dft_gap"]).sum())

    @property
    def n_confirmed(self) -> int:
        return int(self.rows["confirmed"].sum())


def rank(gaps: np.ndarray, ids: np.ndarray, window: tuple[float, float],
         p_in_window: np.ndarray | None = None) -> np.ndarray:
    """Row order for DFT: the likeliest in the window first (P to 0.001), then the predicted
    gap furthest inside it, ties by id.

    "Furthest inside" is the distance to the nearer edge: for LO:HI the gap nearest the centre,
    for LO: the largest. ML gaps miss by tenths of an eV, so these are the structures most
    likely to stay inside. Margins are compared to 1 meV: predicted gaps are float32 multiples
    of the 0.05 eV grid, so 1.45 and 1.55 in 1.4:1.6 tie, and ties must go by id, not rounding.
    """
    lo, hi = window
    gaps = np.asarray(gaps, dtype=float)
    margin = np.round(np.minimum(gaps - lo, hi - gaps), 3)
    p = np.zeros(len(gaps)) if p_in_window is None else np.round(np.asarray(p_in_window, float), 3)
    return np.lexsort((np.asarray(ids, dtype=str), -margin, -p))


def verify(results_dir: str | Path, window: tuple[float, float], n: int,
           settings: Settings | None = None, *, address: str | None = None,
           timeout: float = TIMEOUT, progress: bool = True) -> Verification:
    """DFT-label the top `n` structures of the window's shortlist into labels/; write verify.csv."""
    results_dir = Path(results_dir)
    shortlist = query(results_dir, bandgap=window, sort=None)
    top = rank(shortlist["band_gap"], shortlist["ids"], window, shortlist["p_in_window"])[:n]
    ids, sources = shortlist["ids"][top], shortlist["source"][top]
    labels = results_dir / LABELS
    labelling = label_inputs(load_inputs(shortlist_sources(ids, sources)), labels, settings,
                             address=address, timeout=timeout, progress=progress)
    latest = latest_results(labels)
    done = [latest[str(i)] for i in ids]
    dft_gap = np.array([p["gap"] if p["status"] == "ok" else np.nan for p in done], dtype=float)
    lo, hi = window
    rows = {"id": ids, "source": sources, "formula": shortlist["formula"][top],
            "predicted_gap": shortlist["band_gap"][top], "dft_gap": dft_gap,
            "confirmed": (dft_gap >= lo) & (dft_gap <= hi),
            "reason": np.array([p.get("reason", "") for p in done], dtype=str)}
    write_csv(rows, results_dir / TABLE)
    return Verification(rows, labelling)
