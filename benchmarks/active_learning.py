"""Does labelling by `--order uncertainty` teach more than labelling at random? A retrospective
run on labels already made: the labelled set stands in for the structures DFT would label.

    python benchmarks/active_learning.py --model screener/data/default_model.pt \
        --data data/labels/gpaw-pbe-lcao-dzp --seed-size 300 --add 500 -o runs/active [--epochs 40]

A first model (the recipe of --model, read from its checkpoint) is trained on `seed-size`
training structures and given a gap head fitted on their gaps alone. From the rest of the
training split it picks `add` structures by its ensemble disagreement (screener.dft.acquire,
element coverage breaking near-ties), and a seeded random draw picks as many. Each choice is
added to the seed set, a model trained on it and given a gap head the same way. All three are
scored on the same validation split (splits follow ids): the spectrum MAE, the learned gap's
MAE and its metal/non-metal accuracy. No gap set joins any run, so only the labelled
structures teach. The held-out inputs (the README's demo POSCARs) are in no split.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from screener.dft import acquire
from screener.model import checkpoint_info
from screener.training import gap_fit, train
from screener.training.dataset import read_structures, read_training_set, write_subset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RECIPE = ("arch", "batch_size", "lr", "epochs", "patience", "loss", "amp", "seed", "config")


def fit_and_score(data: Path, rows: np.ndarray, name: str, out: Path, recipe: dict,
                  hold_out: list[Path]) -> dict:
    """Train on `rows` of the training split, fit the gap head, return the validation figures."""
    path = out / f"{name}.h5"
    write_subset(data, rows, path, {"active_learning_arm": name})
    metrics = train.train(path, out / name, hold_out=hold_out, **recipe)
    head = gap_fit.fit(out / name / "model.pt", path, None, out / f"{name}_gap.pt",
                       hold_out=hold_out)
    return {"arm": name, "n_train": len(rows), "best_epoch": metrics["best_epoch"],
            "val_dos_mae": metrics["val_mae"], "val_gap_mae": head["val_gap_mae"],
            "val_metal_accuracy": head["val_metal_accuracy"], "n_val": head["n_val"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--seed-size", type=int, default=300)
    parser.add_argument("--add", type=int, default=500)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--hold-out", type=Path, nargs="*", default=[SHARED / "poscar"])
    parser.add_argument("--epochs", type=int, help="override the recipe's (for a quick check)")
    args = parser.parse_args()

    training = checkpoint_info(args.model)["training"]
    recipe = {k: training[k] for k in RECIPE} | ({"epochs": args.epochs} if args.epochs else {})
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve()
    ts = read_training_set(data, graphs=False)
    held = set(train.held_out_ids(args.hold_out))
    rows = np.random.default_rng(0).permutation(
        [r for r in ts.split["train"] if ts.ids[r] not in held])
    if args.seed_size + args.add > len(rows):
        raise SystemExit(f"{len(rows)} training rows: too few for {args.seed_size} + {args.add}")
    first, pool = np.sort(rows[:args.seed_size]), rows[args.seed_size:]
    results = [fit_and_score(data, first, "seed", args.out, recipe, args.hold_out)]

    structures = read_structures(data)
    scores = acquire.ensemble_disagreement(args.out / "seed_gap.pt", [structures[r] for r in pool])
    order = acquire.uncertainty_order(scores, [structures[r].numbers for r in pool],
                                      acquire.element_counts(structures[r].numbers for r in first))
    arms = {"uncertainty": pool[order[:args.add]],
            "random": np.random.default_rng(1).permutation(pool)[:args.add]}
    for name, chosen in arms.items():
        results.append(fit_and_score(data, np.sort(np.concatenate([first, chosen])), name,
                                     args.out, recipe, args.hold_out))
        gapped = np.isfinite(ts.ref_gap[chosen]) & (ts.ref_gap[chosen] > 0.1)
        results[-1]["added_gapped_share"] = float(gapped.mean())

    print(f"{'arm':>12} {'n_train':>7} {'epoch':>5} {'val DOS MAE':>11} {'val gap MAE':>11} "
          f"{'metal acc':>9} {'added gapped':>12}")
    for r in results:
        print(f"{r['arm']:>12} {r['n_train']:7d} {r['best_epoch']:5d} {r['val_dos_mae']:11.4f} "
              f"{r['val_gap_mae']:11.3f} {r['val_metal_accuracy']:9.3f} "
              f"{r.get('added_gapped_share', float('nan')):12.2f}")
    (args.out / "active_learning.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
