"""The learned gap head: P(gap in window), fitting and calibration on real structures, and
its columns in a real screen."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import GPAW_LABELS, TINY

from screener.cli import main
from screener.io import read_records
from screener.model import build_model, load_checkpoint, save_checkpoint
from screener.predict import predict, prediction_columns
from screener.results.query import query
from screener.training import gap_fit
from screener.training.dataset import read_structures, read_training_set, write_training_set
from screener.training.metrics import expected_calibration_error, reliability
from screener.window import p_in_window

N_LABELLED = 160


def test_p_in_window_adds_up_and_matches_the_point_rule():
    p_metal = np.array([0.0, 0.2, 0.7, 1.0])
    mean = np.array([1.5, 0.8, 3.0, 0.1])
    std = np.array([0.3, 0.5, 1.0, 0.2])
    everything = p_in_window(p_metal, mean, std, None, None)
    assert np.allclose(everything, 1.0)
    assert np.allclose(p_in_window(p_metal, mean, std, 0.0, 0.05), p_metal)
    split = p_in_window(p_metal, mean, std, 0.0, 1.0) + p_in_window(p_metal, mean, std, 1.0, None)
    assert np.allclose(split, 1.0, atol=1e-6)
    # without a spread (a model without a gap head) it is the inclusive point rule
    gaps = np.array([0.0, 1.4, 1.5, 1.6, 1.61], np.float32)
    point = p_in_window((gaps == 0).astype(float), gaps, np.zeros(5), 1.4, 1.6)
    assert point.tolist() == [0, 1, 1, 1, 0]


def test_calibration_error_of_a_known_case():
    p = np.array([0.1, 0.1, 0.9, 0.9])
    outcome = np.array([0, 0, 1, 0])
    mean_p, freq, count = reliability(p, outcome, bins=10)
    assert mean_p[9] == pytest.approx(0.9) and count[1] == 2 and count[9] == 2 and freq[9] == 0.5
    assert expected_calibration_error(p, outcome) == pytest.approx((2 * 0.1 + 2 * 0.4) / 4)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory, shared_data):
    """The first labelled structures of the committed GPAW set, and a JARVIS record file of
    other structures with known gaps: a gap set beside them."""
    folder = tmp_path_factory.mktemp("gaps")
    data = read_training_set(GPAW_LABELS, graphs=False)
    rows = np.arange(N_LABELLED)
    path = folder / "labels.h5"
    write_training_set(path, [read_structures(GPAW_LABELS)[i] for i in rows], data.dos[rows],
                       data.ref_gap[rows], data.attrs,
                       extra={name: values[rows] for name, values in data.extra.items()})
    taken = set(data.ids)
    records = [r for r in read_records(shared_data / "jarvis_structures.json.gz")
               if r["jid"] not in taken and r["optb88vdw_bandgap"] != "na"][:60]
    gaps = folder / "gaps.json"
    gaps.write_text(json.dumps(records))
    return path, gaps, [r["jid"] for r in records[:5]]


@pytest.mark.slow
def test_fit_calibrates_and_saves_a_working_head(tmp_path, small_set):
    labels, gaps, held = small_set
    torch.manual_seed(0)
    backbone = tmp_path / "backbone.pt"
    save_checkpoint(backbone, build_model("d-alignn", TINY), {"model_id": "tiny"})
    hold_out = tmp_path / "held.json"
    hold_out.write_text(json.dumps([r for r in json.loads(gaps.read_text())
                                    if r["jid"] in held]))
    out = tmp_path / "with_head.pt"

    report = gap_fit.fit(backbone, labels, gaps, out, hold_out=[hold_out], members=3)

    model, meta = load_checkpoint(out)
    assert json.dumps(meta["gap_head"]) == json.dumps(report) and model.gap_head is not None
    assert report["n_train"] + report["n_val"] < N_LABELLED + 60 - len(held)
    assert 0 < report["min_probability"] < 1 and report["temperature"] > 0
    assert 0 <= report["val_ece_p_metal"] <= 1 and 0 <= report["val_metal_accuracy"] <= 1
    assert float(model.gap_head.min_probability) == report["min_probability"]
    assert meta["domain"]["max_atoms"] > 0 and 8 in meta["domain"]["elements"]  # oxygen
    data = read_training_set(labels)
    prediction = predict(model, data.graphs[:20])
    columns = prediction_columns(model, prediction)
    assert prediction.gaps.shape == (20, 3)
    assert np.all(columns["band_gap_mean"] >= 0.1) and np.all(columns["band_gap_std"] > 0)
    assert np.all((columns["p_metal"] >= 0) & (columns["p_metal"] <= 1))
    metal = columns["p_metal"] >= 0.5
    assert np.all(columns["band_gap"][metal] == 0)
    assert np.all(columns["band_gap"][~metal] == columns["band_gap_mean"][~metal])
    # the backbone is untouched: the same spectra as before the head
    assert np.array_equal(prediction.dos, predict(load_checkpoint(backbone)[0],
                                                  data.graphs[:20]).dos)


def test_without_a_gap_set_the_head_learns_from_the_labelled_gaps_alone(tmp_path, small_set):
    labels, _, _ = small_set
    torch.manual_seed(0)
    backbone = tmp_path / "backbone.pt"
    save_checkpoint(backbone, build_model("d-alignn", TINY), {"model_id": "tiny"})
    report = gap_fit.fit(backbone, labels, None, tmp_path / "head.pt", members=2)
    split = read_training_set(labels, graphs=False).split
    assert (report["n_train"], report["n_val"]) == (split["train"].size, split["val"].size)


@pytest.mark.slow
def test_screen_ranks_the_shortlist_by_probability(tmp_path, shared_data, ray_local):
    torch.manual_seed(1)
    model = tmp_path / "head.pt"
    save_checkpoint(model, build_model("d-alignn", {**TINY, "gap_members": 2}),
                    {"model_id": "tiny-head", "gap_head": {"min_probability": 0.0},
                     "domain": {"elements": [8, 14], "max_atoms": 6}})
    out = tmp_path / "r"
    result = CliRunner().invoke(main, ["run", "--structures", str(shared_data / "poscar"),
                                       "--bandgap", "1:2", "-o", str(out), "--model", str(model),
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    assert "lie outside the model's training domain" in result.output
    header = (out / "shortlist.csv").read_text().splitlines()[0].split(",")
    for column in ("p_in_window", "band_gap_eV", "band_gap_std_eV", "dos_band_gap_eV",
                   "p_metal", "in_domain"):
        assert column in header
    rows = query(out, bandgap=(1.0, 2.0))
    assert len(rows["ids"]) == 201  # min_probability 0 keeps every structure
    assert np.all(np.diff(rows["p_in_window"]) <= 0)
    inside = query(out, bandgap=(1.0, 2.0), in_domain_only=True)
    assert 0 < len(inside["ids"]) < 201 and inside["in_domain"].all()
    strict = query(out, bandgap=(1.0, 2.0), min_probability=0.5)
    point = (strict["band_gap"] >= 1.0) & (strict["band_gap"] <= 2.0)
    assert np.all((strict["p_in_window"] >= 0.5) | point)
    again = CliRunner().invoke(main, ["run", "--structures", str(shared_data / "poscar"),
                                      "--bandgap", "1:2", "-o", str(out), "--model", str(model),
                                      "--quiet", "--strict-domain"])
    assert again.exit_code == 0 and "left off the shortlist" in again.output
    kept = (out / "shortlist.csv").read_text().splitlines()[1:]
    assert len(kept) == len(inside["ids"]) and all(row.endswith("True") for row in kept)
