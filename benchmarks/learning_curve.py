"""How the spectrum MAE falls with the number of training spectra: a model's recipe retrained
on nested fractions of its training split, every run scored on the same test split.

    python benchmarks/learning_curve.py --model screener/data/default_model.pt \
        --data data/labels/gpaw-pbe-lcao-dzp --fractions 0.25 0.5 1 -o runs/curve \
        [--gaps ../shared/data/jarvis_structures.json.gz] [--hold-out ../shared/data/poscar]

The recipe (architecture, sizes, loss, epochs, seed, gap weight) is read from the model's
checkpoint. A subset file keeps the whole validation and test splits: splits follow ids
(dataset.split_by_id), so they are the same structures in every subset, and the test MAE is
comparable down the rows. Fraction 1 trains on the data file itself, so its model.pt is the
recipe retrained on that file. With --gaps, a training structure left out of a subset's
spectra joins the gap set when JARVIS has its gap, as any unlabelled structure would.
Prints a row per fraction, then the power law MAE ~ N^-b fitted to the rows and, from it,
the number of spectra at which the test MAE would reach baseline / 2.5: an extrapolation.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from screener.model import checkpoint_info
from screener.training import train
from screener.training.dataset import read_training_set, write_subset
from screener.training.evaluate import evaluate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GOAL = 2.5
RECIPE = ("arch", "latent", "batch_size", "lr", "epochs", "patience", "loss", "amp", "seed",
          "ae_epochs", "gap_weight", "config")


def subset_file(data: Path, fraction: float, out: Path) -> tuple[Path, int]:
    """`data` with the first `fraction` of its training rows (in a seeded order), all of
    validation and test; and how many training rows it holds."""
    split = read_training_set(data, graphs=False).split
    if fraction == 1:
        return data, split["train"].size
    train_rows = np.random.default_rng(0).permutation(split["train"])
    n_train = round(fraction * train_rows.size)
    path = out / f"subset_{fraction:g}.h5"
    write_subset(data, train_rows[:n_train], path, {"train_fraction": fraction})
    return path, n_train


def run(data: Path, recipe: dict, fraction: float, out: Path, gaps, hold_out) -> dict:
    run_dir = out / f"f{fraction:g}"
    path, n_train = subset_file(data, fraction, out)
    metrics = train.train(path, run_dir, gaps=gaps, hold_out=hold_out,
                          **{k: v for k, v in recipe.items() if v is not None})
    report = evaluate(run_dir / "model.pt", path, "test", run_dir / "report", gap_file=gaps)
    summary = report["summary"]
    return {"fraction": fraction, "n_train": int(n_train),
            "best_epoch": metrics["best_epoch"], "val_mae": metrics["val_mae"],
            "test_mae": summary["mae_mean"], "baseline": summary["baseline_mae_mean"],
            "ratio": summary["baseline_over_model"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--gaps", type=Path)
    parser.add_argument("--hold-out", type=Path, nargs="*", default=[SHARED / "poscar"])
    parser.add_argument("--epochs", type=int, help="override the recipe's (for a quick check)")
    args = parser.parse_args()

    training = checkpoint_info(args.model)["training"]
    recipe = {k: training.get(k) for k in RECIPE} | ({"epochs": args.epochs} if args.epochs else {})
    gaps = args.gaps if training.get("gaps") else None
    print(f"recipe of {args.model}: {json.dumps(recipe)}; gap set: {gaps}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run(args.data.resolve(), recipe, f, args.out, gaps, args.hold_out)
            for f in sorted(args.fractions)]
    print(f"{'fraction':>8} {'n_train':>7} {'epoch':>5} {'val MAE':>8} {'test MAE':>8} "
          f"{'baseline':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['fraction']:8g} {r['n_train']:7d} {r['best_epoch']:5d} {r['val_mae']:8.4f} "
              f"{r['test_mae']:8.4f} {r['baseline']:8.4f} {r['ratio']:6.2f}")
    (args.out / "learning_curve.json").write_text(json.dumps(rows, indent=2))
    if len(rows) >= 2:
        n = np.array([r["n_train"] for r in rows], float)
        mae = np.array([r["test_mae"] for r in rows])
        slope, intercept = np.polyfit(np.log(n), np.log(mae), 1)
        target = rows[-1]["baseline"] / GOAL
        need = np.exp((np.log(target) - intercept) / slope) if slope < 0 else np.inf
        print(f"SUMMARY learning_curve: test MAE ~ N^{slope:.3f} over N = {n[0]:.0f}..{n[-1]:.0f}; "
              f"baseline / {GOAL:g} = {target:.4f} would take N ~ {need:,.0f} training spectra "
              f"(extrapolated)")


if __name__ == "__main__":
    main()
