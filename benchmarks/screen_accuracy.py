"""How right a finished screen is: its predicted gaps against the JARVIS optB88vdW gaps.

    python benchmarks/screen_accuracy.py results/ --bandgap 1.4:1.6 \
        [--reference ../shared/data/jarvis_structures.json.gz] [--labelled data/labels/gpaw-pbe-lcao-dzp]

Prints the gap MAE, metal/non-metal accuracy and confusion over every screened structure with
a reference gap (the screen's gap: the learned one where the model has a gap head; the gap read
off the predicted DOS beside it), then the window: how many the screen shortlisted (gap inside,
or P(gap in window) at least the model's threshold: `screener.window.shortlisted`), how many of
those JARVIS puts inside it (precision) or within 0.5 eV of it, and how many of JARVIS's
in-window structures it found (recall). `--labelled` flags shortlisted structures whose DOS
the model may have trained on and scores the structures outside that set again on their own, so an in-sample hit is not
mistaken for a discovery.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from screener.io import read_records
from screener.io.records import reference_gaps
from screener.results.query import query, read_predictions
from screener.training.dataset import read_training_set
from screener.training.metrics import gap_metrics

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NEAR_EV = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--bandgap", required=True, help="LO:HI in eV")
    parser.add_argument("--reference", type=Path, default=SHARED / "jarvis_structures.json.gz")
    parser.add_argument("--labelled", type=Path, help="training set whose ids to flag")
    parser.add_argument("--json", type=Path, help="also write the figures of each scope here")
    args = parser.parse_args()
    lo, hi = (float(v) for v in args.bandgap.split(":"))

    known = reference_gaps(read_records(args.reference), args.reference)
    rows = read_predictions(args.results, ["ids", "formula", "band_gap", "dos_band_gap"])
    ids = rows["ids"].astype(str)
    ref = np.array([known.get(i, np.nan) for i in ids])
    pred = rows["band_gap"].astype(np.float64)
    from_dos = rows["dos_band_gap"].astype(np.float64)
    labelled = (set(read_training_set(args.labelled, graphs=False).ids.astype(str))
                if args.labelled else set())
    picked = np.isin(ids, query(args.results, bandgap=(lo, hi))["ids"].astype(str))
    scopes = {"all": np.ones(ids.size, bool)}
    if labelled:
        scopes["not GPAW-labelled"] = ~np.isin(ids, list(labelled))
    scores = {}
    for scope, mask in scopes.items():
        print(f"{scope}:")
        scores[scope] = _score(pred[mask], from_dos[mask], ref[mask], picked[mask], lo, hi)
    if args.json:
        args.json.write_text(json.dumps({"window": [lo, hi], "scopes": scores}, indent=1))
    for i in np.flatnonzero(picked):
        flag = "  (GPAW-labelled)" if ids[i] in labelled else ""
        print(f"  {ids[i]:14s} {rows['formula'][i]:12s} predicted {pred[i]:.2f}  "
              f"JARVIS {ref[i]:.2f}{flag}")


def _score(pred: np.ndarray, from_dos: np.ndarray, ref: np.ndarray, picked: np.ndarray,
           lo: float, hi: float) -> dict:
    scored, dos_scored = gap_metrics(pred, ref), gap_metrics(from_dos, ref)
    (mm, _), (_, nn) = scored["confusion"]
    print(f"{pred.size} screened, {scored['n_known']} with a JARVIS gap: gap MAE "
          f"{scored['gap_mae']:.3f} eV, metal/non-metal accuracy "
          f"{(mm + nn) / max(scored['n_known'], 1):.3f}, confusion [ref metal, non-metal] x "
          f"[pred metal, non-metal] {scored['confusion']} (gap off the predicted DOS: MAE "
          f"{dos_scored['gap_mae']:.3f} eV, {dos_scored['confusion']})")
    inside = (ref >= lo) & (ref <= hi)
    near = (ref >= lo - NEAR_EV) & (ref <= hi + NEAR_EV)
    print(f"window {lo}:{hi} eV: shortlisted {picked.sum()}, JARVIS inside {(picked & inside).sum()}"
          f" (precision {_share(picked & inside, picked)}), within {NEAR_EV} eV "
          f"{(picked & near).sum()}; JARVIS has {inside.sum()} inside, found "
          f"{(picked & inside).sum()} (recall {_share(picked & inside, inside)})")
    return {"n": int(pred.size), "n_known": scored["n_known"], "gap_mae": scored["gap_mae"],
            "accuracy": (mm + nn) / max(scored["n_known"], 1), "confusion": scored["confusion"],
            "dos_gap_mae": dos_scored["gap_mae"], "dos_confusion": dos_scored["confusion"],
            "shortlisted": int(picked.sum()), "inside": int(inside.sum()),
            "hits": int((picked & inside).sum()), "near": int((picked & near).sum())}


def _share(hit: np.ndarray, of: np.ndarray) -> str:
    return f"{hit.sum() / of.sum():.2f}" if of.sum() else "n/a"


if __name__ == "__main__":
    main()
