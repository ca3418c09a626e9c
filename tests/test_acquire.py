"""The active-learning order: the gap ensemble's disagreement, ties broken by element coverage."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import spearmanr

from screener.cli import main
from screener.dft import acquire, label
from screener.io import read_records
from screener.io.records import reference_gap

DEFAULT_MODEL = "screener/data/default_model.pt"


def test_confident_metals_score_zero_whatever_gaps_the_members_give_them():
    gaps = np.array([[0.5, 3.0, 6.0], [1.0, 2.0, 3.0], [1.5, 1.5, 1.5]])
    logits = np.array([[30.0, 30.0, 30.0], [-30.0, -30.0, -30.0], [-30.0, 30.0, -30.0]])
    scores = acquire.disagreement(gaps, logits)
    assert scores[0] < 1e-9
    assert scores[1] == pytest.approx(np.std([1.0, 2.0, 3.0]))
    assert scores[2] == pytest.approx(np.std([1.5, 0.0, 1.5]))  # members split on metal


def test_near_ties_go_to_the_rarest_element_and_structures_without_a_graph_last():
    scores = np.array([0.31, np.nan, 0.32, 0.90, 0.33])
    numbers = [np.array([8, 12]), np.array([8]), np.array([8, 26]), np.array([1]),
               np.array([8, 12, 12])]
    counts = Counter({8: 50, 12: 20, 26: 1, 1: 90})
    assert acquire.uncertainty_order(scores, numbers, counts).tolist() == [3, 2, 0, 4, 1]


@pytest.fixture(scope="module")
def poscars(shared_data):
    items = label.read_inputs(shared_data / "poscar")
    return [item for item in items if not isinstance(item[0], label.Failure)]


@pytest.fixture(scope="module")
def scores(poscars):
    return acquire.ensemble_disagreement(DEFAULT_MODEL, [s for s, _ in poscars])


def test_the_disagreement_ranks_the_larger_errors_first_on_unseen_structures(poscars, scores,
                                                                             shared_data):
    """On the held-out POSCARs the shipped model is least sure where it is most wrong."""
    from screener.graphs import build_graphs
    from screener.model import load_checkpoint
    from screener.predict import predict, prediction_columns

    gaps = {r["jid"]: reference_gap(r)
            for r in read_records(shared_data / "jarvis_structures.json.gz")}
    structures = [s for s, _ in poscars]
    reference = np.array([gaps[s.id.removeprefix("POSCAR-")] for s in structures])
    model, _ = load_checkpoint(DEFAULT_MODEL)
    found = predict(model, build_graphs([(s.lattice, s.positions, s.numbers) for s in structures]))
    errors = np.abs(prediction_columns(model, found)["band_gap"] - reference)
    assert spearmanr(scores, errors).statistic > 0.3
    first = np.argsort(-scores)[: len(scores) // 2]
    assert errors[first].mean() > 1.5 * np.delete(errors, first).mean()


def test_select_puts_the_most_uncertain_first_and_labelled_elements_break_ties(poscars, scores):
    chosen = {s.id for s, _ in label.select(poscars, "uncertainty", 5, DEFAULT_MODEL)}
    picked = np.array([s.id in chosen for s, _ in poscars])
    assert picked.sum() == 5
    assert scores[picked].min() > scores[~picked].max() - acquire.TIE_EV
    low = [i for i in range(len(poscars)) if scores[i] < acquire.TIE_EV]
    common = [np.array([z]) for i in low for z in poscars[i][0].numbers]
    tied = label.select([poscars[i] for i in low], "uncertainty", None, DEFAULT_MODEL, common)
    counts = acquire.element_counts(common)
    rarity = [min(counts[int(z)] for z in s.numbers) for s, _ in tied]
    assert len(set(rarity)) > 3 and rarity == sorted(rarity)


def test_the_order_needs_a_model_with_a_gap_head(tmp_path, tiny_model, shared_data):
    with pytest.raises(ValueError, match="needs a model with a gap head"):
        acquire.ensemble_disagreement(tiny_model, [])
    label_args = ["label", "--structures", str(shared_data / "poscar"), "-o", str(tmp_path / "l.h5")]
    for args in (["--order", "uncertainty"], ["--model", DEFAULT_MODEL],
                 ["--order", "uncertainty", "--model", str(tiny_model)]):
        result = CliRunner().invoke(main, [*label_args, *args])
        assert result.exit_code == 1, result.output
        assert result.output.count("\n") == 1 and "Error:" in result.output
    assert not (tmp_path / "l.h5.parts").exists()
