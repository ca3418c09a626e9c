"""Which gap predictor to ship, decided on validation: gaps read off the D-ALIGNN spectrum,
the gap head on D-ALIGNN's pooled features and spectrum, and the same head on pretrained
CHGNet atom features (frozen, mean over atoms; made by a CHGNet install of its own, see
--chgnet) with and without the spectrum.

    python benchmarks/gap_ablation.py --model RUN/model.pt --data data/labels/gpaw-pbe-lcao-dzp \
        --gaps ../shared/data/jarvis_structures.json.gz --hold-out ../shared/data/poscar \
        [--chgnet chgnet_features.npz] [--json ablation.json]

Every variant is fitted and calibrated by the same code (screener.training.gap_fit) on the same
training and validation structures; the table is what the model card shows.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from screener.model import load_checkpoint
from screener.training import gap_fit
from screener.training.metrics import gap_metrics
from screener.training.train import held_out_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="D-ALIGNN without a gap head")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--gaps", type=Path, required=True)
    parser.add_argument("--hold-out", type=Path, action="append", default=[])
    parser.add_argument("--chgnet", type=Path, help="npz of ids and per-structure mean features")
    parser.add_argument("--members", type=int, default=gap_fit.MEMBERS)
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args()

    model, _ = load_checkpoint(args.model)
    known = gap_fit.known_gaps(model, args.data, args.gaps, held_out_ids(args.hold_out), 64)
    truth = known.gaps[known.val]
    rows = [_row("D-ALIGNN, gap read off the predicted DOS", known.dos_gaps[known.val], truth)]
    variants = {"D-ALIGNN + gap head (pooled features, DOS)": known}
    if args.chgnet:
        saved = np.load(args.chgnet)
        where = {str(i): k for k, i in enumerate(saved["ids"])}
        have = np.array([str(i) in where for i in known.ids])
        chgnet = saved["mean"][[where.get(str(i), 0) for i in known.ids]]
        have &= np.isfinite(chgnet).all(1)
        dos_part = known.inputs[:, model.config.hidden:]
        for name, inputs in (("CHGNet frozen features + gap head", chgnet),
                             ("CHGNet frozen features and D-ALIGNN DOS + gap head",
                              np.concatenate([chgnet, dos_part], 1))):
            variants[name] = replace(known, inputs=inputs.astype(np.float32),
                                     train=known.train[have[known.train]],
                                     val=known.val[have[known.val]])
        print(f"CHGNet features for {have.sum()} of {have.size} structures")
    for name, variant in variants.items():
        head = gap_fit.fit_members(variant, args.members, seed=0)
        report = gap_fit.calibrate(head, variant)
        rows.append({"variant": name, "n_val": report["n_val"],
                     "gap_mae": report["val_gap_mae"], "accuracy": report["val_metal_accuracy"],
                     "ece_p_metal": report["val_ece_p_metal"],
                     "ece_p_in_window": report["val_ece_p_in_window"],
                     "window_precision": report["val_window_precision"],
                     "window_recall": report["val_window_recall"]})
    print("| variant | n val | gap MAE (eV) | metal/non-metal accuracy | ECE P(metal) |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        ece = "n/a" if row["ece_p_metal"] is None else f"{row['ece_p_metal']:.3f}"
        print(f"| {row['variant']} | {row['n_val']} | {row['gap_mae']:.3f} | "
              f"{row['accuracy']:.3f} | {ece} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def _row(name: str, pred: np.ndarray, truth: np.ndarray) -> dict:
    """A variant without probabilities: its gaps only."""
    scored = gap_metrics(pred, truth)
    (mm, _), (_, nn) = scored["confusion"]
    return {"variant": name, "n_val": int(truth.size), "gap_mae": scored["gap_mae"],
            "accuracy": (mm + nn) / truth.size, "ece_p_metal": None}


if __name__ == "__main__":
    main()
