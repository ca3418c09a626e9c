"""The evaluation report end to end: a real training set, a tiny untrained model, every output."""
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import GPAW_LABELS

from screener.cli import main
from screener.io.files import file_sha256
from screener.model.checkpoint import build_model, save_checkpoint
from screener.training.dataset import (
    from_json,
    merge_ref_gaps,
    read_structures,
    read_training_set,
    write_training_set,
)
from screener.training.evaluate import (
    FIGURES,
    binary_gap_matrix,
    crystal_systems,
    evaluate,
    gap_set_report,
    split_rows,
)

TINY = {"hidden": 16, "embedding": 8, "edge_rbf": 8, "angle_rbf": 8, "alignn_layers": 1,
        "gcn_layers": 1}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, build_model("d-alignn", {**TINY, "gap_members": 2}),
                    {"arch": "d-alignn", "config": TINY})
    return str(path)


def _training_set(path, shared_data, with_gaps: bool) -> str:
    labelled = from_json(shared_data / "jarvis_edos_sample10.json")
    if with_gaps:
        assert merge_ref_gaps(labelled, shared_data / "jarvis_structures.json.gz") == 2
    write_training_set(path, labelled.structures, labelled.dos, labelled.ref_gap,
                       labelled.provenance)
    return str(path)


@pytest.mark.slow
def test_report_on_all_structures(tmp_path, shared_data, model):
    data = _training_set(tmp_path / "edos.h5", shared_data, with_gaps=True)
    out = tmp_path / "report"
    report = evaluate(model, data, split="all", out_dir=out, batch_size=4)

    assert set(report["figures"]) == set(FIGURES)
    for file in [*FIGURES.values(), "metrics.json", "index.html"]:
        assert (out / file).stat().st_size > 0, file
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["summary"]["n"] == saved["split"]["n"] == 10
    assert saved["band_gap"]["n_known"] == 2
    assert sum(map(sum, saved["band_gap"]["confusion"])) == 2
    windows = saved["by_energy"].values()
    assert sum(w["bins"] for w in windows) == 300
    for key in ("mae_mean", "baseline_mae_mean"):
        whole = sum(w["bins"] * w[key] for w in windows) / 300
        assert whole == pytest.approx(saved["summary"][key], rel=1e-6)
    assert saved["by_element"]["Na"]["n"] == 2
    assert saved["by_crystal_system"]["cubic"]["n"] >= 2
    page = (out / "index.html").read_text()
    assert "MAE by energy window" in page
    assert all(f"src='{file}'" in page for file in FIGURES.values())


@pytest.mark.slow
def test_cli_without_reference_gaps(tmp_path, shared_data, model):
    data = _training_set(tmp_path / "edos.h5", shared_data, with_gaps=False)
    out = tmp_path / "report"
    run_folder = str(Path(model).parent)
    result = CliRunner().invoke(main, ["evaluate", "--model", run_folder, "--data", data,
                                       "--split", "test", "-o", str(out),
                                       "--gaps", str(shared_data / "jarvis_edos_sample10.json")])
    assert result.exit_code == 0, result.output
    assert "no reference band gaps among these structures" in result.output
    assert "ignored: the model was trained without a gap set" in result.output
    assert "baseline / model by energy window: -5 to -3 eV " in result.output
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["split"] == {"name": "test", "from": "data file", "n": 2}
    assert "gap_parity" not in saved["figures"]
    for file in [*saved["figures"].values(), "metrics.json", "index.html"]:
        assert (out / file).stat().st_size > 0, file


def test_checkpoint_split_wins_on_its_own_data_only(tmp_path, shared_data):
    data = _training_set(tmp_path / "edos.h5", shared_data, False)
    ts = read_training_set(data, graphs=False)
    meta = {"split": {"train": list(range(8)), "val": [8], "test": [9]},
            "data_hash": file_sha256(data)}
    rows, train_rows, origin = split_rows(ts, meta, "test", file_sha256(data))
    assert (rows.tolist(), train_rows.tolist(), origin) == ([9], list(range(8)), "checkpoint")
    rows, train_rows, origin = split_rows(ts, meta, "test", "another file's hash")
    assert origin.startswith("data file (the model was trained on another file")
    assert (rows.tolist(), train_rows.tolist()) == (ts.split["test"].tolist(),
                                                    ts.split["train"].tolist())
    assert split_rows(ts, {}, "all", "")[0].tolist() == list(range(10))


def test_crystal_systems_of_rock_salt_and_zinc_blende(tmp_path, shared_data):
    structures = read_structures(_training_set(tmp_path / "edos.h5", shared_data, False))
    by_id = dict(zip([s.id for s in structures], crystal_systems(structures)[0]))
    assert by_id["JVASP-1996"] == "cubic"  # NaI, rock salt
    assert by_id["JVASP-1372"] == "cubic"  # AlAs, zinc blende


def test_binary_gap_matrix():
    numbers = [np.array([13, 33]), np.array([13, 33, 33]), np.array([11, 53]),
               np.array([8, 1, 26])]
    present, matrix = binary_gap_matrix(numbers, np.array([1.0, 3.0, 2.0, 5.0]))
    assert present.tolist() == [11, 13, 33, 53]
    expected = np.full((4, 4), np.nan)
    expected[1, 2] = expected[2, 1] = 2.0  # AlAs: mean of 1 and 3
    expected[0, 3] = expected[3, 0] = 2.0  # NaI; FeHO is ternary and left out
    np.testing.assert_array_equal(matrix, expected)


@pytest.mark.slow
def test_the_shipped_model_scores_its_gap_set_from_a_file_given_here(tmp_path, shared_data):
    """The checkpoint names the gap file where it was trained; --gaps points to a copy here,
    accepted only when its sha256 is the one the model trained with."""
    from screener.shipped import shipped_model

    args = ["evaluate", "--model", str(shipped_model()), "--data", str(GPAW_LABELS), "--split", "test"]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "a"),
                                       "--gaps", str(shared_data / "jarvis_structures.json.gz")])
    assert result.exit_code == 0, result.output
    assert "gap set (test split, " in result.output
    wrong = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "b"),
                                      "--gaps", str(shared_data / "jarvis_edos_sample10.json")])
    assert wrong.exit_code == 0 and "gap set (" not in wrong.output
    assert "not the file the model trained with" in wrong.output


def test_a_gap_set_split_by_row_position_is_not_scored(shared_data):
    """Checkpoints from before split_by_id name no split method; rebuilding their gap set's
    split by id would score them on structures they trained on."""
    path = shared_data / "jarvis_structures.json.gz"
    meta = {"gap_set": {"path": str(path), "hash": file_sha256(path), "seed": 0, "exclude": []}}
    report, notes = gap_set_report(None, meta, "test", 64, "cpu")
    assert report is None and "split by row position" in notes[0]
