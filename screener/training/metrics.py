"""Evaluation metrics of predicted DOS spectra, as in the ALIGNN-DOS paper, on plain arrays."""
from collections import defaultdict
from collections.abc import Iterable, Sequence
from itertools import pairwise

import numpy as np

from screener.dos import METAL_BELOW_EV

MAE_GOOD = 0.02
RE_GOOD = 0.2
ENERGY_WINDOWS = (-5.0, -3.0, -1.0, 0.0, 1.0, 3.0, 6.0, 10.0)


def spectrum_mae(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per-structure mean |p - a| over the energy bins (paper eq. 5)."""
    return np.abs(np.asarray(pred, np.float64) - np.asarray(ref, np.float64)).mean(axis=-1)


def relative_error(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """|mean(p) - mean(a)| / mean(a) (paper eq. 7); NaN where the reference spectrum is all zero."""
    p = np.asarray(pred, np.float64).mean(axis=-1)
    a = np.asarray(ref, np.float64).mean(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > 0, np.abs(p - a) / a, np.nan)


def baseline_spectrum(train_dos: np.ndarray) -> np.ndarray:
    """The mean training spectrum: the trivial predictor a model must beat."""
    return np.asarray(train_dos, np.float64).mean(axis=0)


def summarize(mae: np.ndarray, re: np.ndarray, baseline_mae: np.ndarray) -> dict[str, float]:
    """Headline numbers of paper Fig. 4: MAE distribution, gain over the baseline, RE share."""
    mae = np.asarray(mae, np.float64)
    re = np.asarray(re, np.float64)
    q25, q50, q75 = np.quantile(mae, [0.25, 0.5, 0.75])
    finite_re = re[np.isfinite(re)]
    mae_mean = float(mae.mean())
    baseline_mean = float(np.mean(baseline_mae))
    return {
        "n": int(mae.size),
        "mae_mean": mae_mean,
        "mae_median": float(q50),
        "mae_q25": float(q25),
        "mae_q75": float(q75),
        "baseline_mae_mean": baseline_mean,
        "baseline_over_model": _gain(baseline_mean, mae_mean),
        "share_mae_below_0.02": float(np.mean(mae < MAE_GOOD)),
        "re_mean": float(finite_re.mean()) if finite_re.size else float("nan"),
        "re_median": float(np.median(finite_re)) if finite_re.size else float("nan"),
        "share_re_below_0.2": float(np.mean(finite_re < RE_GOOD)) if finite_re.size else float("nan"),
        "n_re_undefined": int(re.size - finite_re.size),
    }


def grouped_mae(mae: np.ndarray, labels: Sequence[Iterable[str]]) -> dict[str, dict[str, float]]:
    """Mean MAE per label; a structure counts once for every distinct label it carries."""
    members: dict[str, list[float]] = defaultdict(list)
    for value, structure_labels in zip(np.asarray(mae, np.float64), labels, strict=True):
        for label in set(structure_labels):
            members[label].append(float(value))
    return {
        label: {"n": len(values), "mae_mean": float(np.mean(values))}
        for label, values in sorted(members.items())
    }


def windowed_mae(pred: np.ndarray, ref: np.ndarray, baseline: np.ndarray, energies: np.ndarray,
                 edges: Sequence[float] = ENERGY_WINDOWS) -> dict[str, dict[str, float]]:
    """Model and baseline MAE over the bins of each energy window [lo, hi): where on the
    axis a model gains over the mean spectrum, which one overall ratio hides."""
    model_err = np.abs(np.asarray(pred, np.float64) - np.asarray(ref, np.float64))
    base_err = np.abs(np.asarray(baseline, np.float64) - np.asarray(ref, np.float64))
    windows = {}
    for lo, hi in pairwise(edges):
        bins = (energies >= lo) & (energies < hi)
        model, base = float(model_err[:, bins].mean()), float(base_err[:, bins].mean())
        windows[f"{lo:g} to {hi:g} eV"] = {
            "bins": int(bins.sum()), "mae_mean": model, "baseline_mae_mean": base,
            "baseline_over_model": _gain(base, model)}
    return windows


def _gain(baseline_mae: float, model_mae: float) -> float:
    """How many times the model's MAE fits into the baseline's; inf for a perfect model."""
    return baseline_mae / model_mae if model_mae > 0 else float("inf")


def gap_metrics(
    pred_gap: np.ndarray, ref_gap: np.ndarray, metal_below: float = METAL_BELOW_EV
) -> dict:
    """Gap MAE and metal/non-metal confusion over structures with a known (finite) reference.

    A structure is a metal when its gap is below `metal_below` eV. 0.1 eV is two grid steps: the
    smallest gap a DOS on the 0.05 eV grid can show (a gap from it is 0 or >= 0.1 eV), so smaller
    reference gaps cannot be told from metals by any spectrum.
    """
    pred_gap = np.asarray(pred_gap, np.float64)
    ref_gap = np.asarray(ref_gap, np.float64)
    known = np.isfinite(ref_gap)
    p, a = pred_gap[known], ref_gap[known]
    ref_metal, pred_metal = a < metal_below, p < metal_below
    return {
        "n_known": int(known.sum()),
        "metal_below_ev": metal_below,
        "gap_mae": float(np.abs(p - a).mean()) if known.any() else float("nan"),
        "confusion_rows_reference_cols_predicted": ["metal", "non-metal"],
        "confusion": [
            [int(np.sum(ref_metal & pred_metal)), int(np.sum(ref_metal & ~pred_metal))],
            [int(np.sum(~ref_metal & pred_metal)), int(np.sum(~ref_metal & ~pred_metal))],
        ],
    }


def reliability(p: np.ndarray, outcome: np.ndarray, bins: int = 10
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean predicted probability, observed frequency, count) in each of `bins` equal-width
    probability bins; empty bins give NaN."""
    p, outcome = np.asarray(p, np.float64), np.asarray(outcome, np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(which, p, bins) / count
        freq = np.bincount(which, outcome, bins) / count
    return mean_p, freq, count


def expected_calibration_error(p: np.ndarray, outcome: np.ndarray, bins: int = 10) -> float:
    """Count-weighted mean |predicted probability - observed frequency| over the bins."""
    mean_p, freq, count = reliability(p, outcome, bins)
    used = count > 0
    return float(np.sum(np.abs(mean_p[used] - freq[used]) * count[used]) / max(count.sum(), 1))
