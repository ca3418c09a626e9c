"""Metrics against numbers worked out by hand."""
import math

import numpy as np
import pytest

from screener.training.metrics import (
    baseline_spectrum,
    gap_metrics,
    grouped_mae,
    relative_error,
    spectrum_mae,
    summarize,
    windowed_mae,
)


def test_mae_and_re_per_structure():
    pred = np.array([[0.1, 0.2, 0.3, 0.4], [0.0, 0.1, 0.0, 0.0]])
    ref = np.array([[0.2, 0.2, 0.1, 0.4], [0.0, 0.0, 0.0, 0.0]])
    # row 0: |-.1|+0+.2+0 = .3 over 4 bins; row 1: .1 over 4 bins
    np.testing.assert_allclose(spectrum_mae(pred, ref), [0.075, 0.025])
    re = relative_error(pred, ref)
    # row 0: mean p = .25, mean a = .225 -> .025 / .225; row 1: mean a = 0 -> undefined
    assert re[0] == pytest.approx(0.025 / 0.225)
    assert math.isnan(re[1])


def test_full_grid_constant_spectra():
    pred = np.full((3, 300), 0.02, dtype=np.float32)
    ref = np.full((3, 300), 0.01, dtype=np.float32)
    np.testing.assert_allclose(spectrum_mae(pred, ref), [0.01] * 3, rtol=1e-6)
    np.testing.assert_allclose(relative_error(pred, ref), [1.0] * 3, rtol=1e-6)


def test_baseline_is_mean_training_spectrum():
    train = np.array([[0.0, 0.2, 0.4], [0.2, 0.2, 0.0]])
    np.testing.assert_allclose(baseline_spectrum(train), [0.1, 0.2, 0.2])


def test_summary():
    mae = np.array([0.01, 0.03, 0.02, 0.04])
    re = np.array([0.1, 0.3, np.nan, 0.19])
    baseline_mae = np.array([0.1, 0.1, 0.05, 0.05])
    s = summarize(mae, re, baseline_mae)
    assert s["n"] == 4
    assert s["mae_mean"] == pytest.approx(0.025)
    # sorted .01 .02 .03 .04, linear interpolation: q25 at position .75, q75 at 2.25
    assert s["mae_q25"] == pytest.approx(0.0175)
    assert s["mae_median"] == pytest.approx(0.025)
    assert s["mae_q75"] == pytest.approx(0.0325)
    assert s["baseline_mae_mean"] == pytest.approx(0.075)
    assert s["baseline_over_model"] == pytest.approx(3.0)
    assert s["share_mae_below_0.02"] == pytest.approx(0.25)
    # RE over the three defined values .1 .3 .19
    assert s["re_mean"] == pytest.approx(0.59 / 3)
    assert s["re_median"] == pytest.approx(0.19)
    assert s["share_re_below_0.2"] == pytest.approx(2 / 3)
    assert s["n_re_undefined"] == 1


def test_grouped_mae_counts_each_label_once_per_structure():
    mae = np.array([0.01, 0.03, 0.02])
    groups = grouped_mae(mae, [["Al", "O", "O"], ["O"], ["Fe"]])
    assert list(groups) == ["Al", "Fe", "O"]
    assert groups["Al"] == {"n": 1, "mae_mean": pytest.approx(0.01)}
    assert groups["Fe"] == {"n": 1, "mae_mean": pytest.approx(0.02)}
    assert groups["O"] == {"n": 2, "mae_mean": pytest.approx(0.02)}


def test_windowed_mae_splits_the_axis_at_the_edges():
    energies = np.array([-2.0, -1.0, 0.0, 0.5])
    ref = np.zeros((2, 4))
    pred = np.array([[0.1, 0.3, 0.2, 0.4], [0.1, 0.1, 0.0, 0.0]])
    baseline = np.array([0.2, 0.2, 0.4, 0.4])
    w = windowed_mae(pred, ref, baseline, energies, edges=(-2.0, 0.0, 1.0))
    assert list(w) == ["-2 to 0 eV", "0 to 1 eV"]
    assert w["-2 to 0 eV"] == {"bins": 2, "mae_mean": pytest.approx(0.15),
                               "baseline_mae_mean": pytest.approx(0.2),
                               "baseline_over_model": pytest.approx(0.2 / 0.15)}
    assert w["0 to 1 eV"]["mae_mean"] == pytest.approx(0.15)
    assert w["0 to 1 eV"]["baseline_over_model"] == pytest.approx(0.4 / 0.15)


def test_gap_metrics():
    pred = np.array([0.0, 1.5, 0.05, 2.0, 3.0, 0.0, 2.2, 0.0])
    ref = np.array([0.0, 1.0, 0.5, np.nan, 0.02, 0.08, 2.0, 1.2])
    g = gap_metrics(pred, ref)
    assert g["n_known"] == 7
    # |errors| over the 7 known: 0 .5 .45 2.98 .08 .2 1.2
    assert g["gap_mae"] == pytest.approx(5.41 / 7)
    # reference metals (< .1 eV): items 0 4 5, predicted metal: 0 5; non-metals 1 2 6 7, predicted metal: 2 7
    assert g["confusion"] == [[2, 1], [2, 2]]
    assert g["confusion_rows_reference_cols_predicted"] == ["metal", "non-metal"]


def test_gap_metrics_without_references():
    g = gap_metrics(np.array([0.0, 1.0]), np.array([np.nan, np.nan]))
    assert g["n_known"] == 0
    assert math.isnan(g["gap_mae"])
    assert g["confusion"] == [[0, 0], [0, 0]]
