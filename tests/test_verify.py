"""`screen run --verify N`: the top of the shortlist checked with GPAW, on real POSCARs and Ray."""
import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from screener.cli import main
from screener.dft.gpaw import Settings
from screener.dft.label import level_dir
from screener.dft.verify import LABELS, TABLE, rank, verify
from screener.pipeline import RunOptions, run
from screener.results.query import query
from screener.training.dataset import read_training_set
from screener.training.label_store import part_paths

FAST = Settings(kpt_density=1.0)
# The two smallest cells of the POSCAR set (18 and 11 A^3), GPAW seconds each: a hexagonal
# 2-atom carbon (gap 2.7 eV at FAST's coarse k-points) and diamond (4.5 eV). The tiny model
# calls both metals (gap 0), so they tie for the top and go by id.
SMALLEST = ("JVASP-30458", "JVASP-91")
WIDE = (0.0, 100.0)


@pytest.fixture(scope="module")
def cells(shared_data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cells")
    for jid in SMALLEST:
        shutil.copy(shared_data / "poscar" / f"POSCAR-{jid}", folder)
    return folder


@pytest.fixture(scope="module")
def screened(cells, tiny_model, ray_local, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("screened")
    run(RunOptions(str(cells), out, tiny_model, workers=1))
    assert len(query(out, bandgap=WIDE)["ids"]) == 2
    return out


@pytest.fixture(scope="module")
def verified(screened):
    pytest.importorskip("gpaw")
    return verify(screened, WIDE, 2, FAST, progress=False)


def _table(results: Path) -> list[dict]:
    with open(results / TABLE, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.dft
@pytest.mark.slow
def test_top_n_gets_dft_gaps_in_a_table_and_a_training_set(verified, screened):
    assert (verified.labelling.n_labelled, verified.n_checked, verified.n_confirmed) == (2, 2, 2)
    rows = _table(screened)
    assert [r["id"] for r in rows] == list(SMALLEST)
    assert [r["confirmed"] for r in rows] == ["True", "True"] and not any(r["reason"] for r in rows)
    predicted = query(screened, bandgap=WIDE)
    assert [float(r["predicted_gap"]) for r in rows] == [float(g) for g in predicted["band_gap"]]
    dft_gap = {r["id"]: float(r["dft_gap"]) for r in rows}
    assert 2.0 < dft_gap["JVASP-30458"] < 3.5 and 4.0 < dft_gap["JVASP-91"] < 5.0
    labels = read_training_set(level_dir(screened / LABELS))
    assert list(labels.ids) == sorted(SMALLEST) and labels.dos.shape == (2, 300)
    assert dict(zip(labels.ids, labels.extra["gpaw_gap"])) == pytest.approx(dft_gap)


@pytest.mark.dft
@pytest.mark.slow
def test_rerun_and_other_windows_compute_nothing(verified, screened):
    parts = part_paths(level_dir(screened / LABELS))
    stamps = [p.stat().st_mtime_ns for p in parts]
    assert len(parts) == 1
    again = verify(screened, WIDE, 2, FAST, progress=False)
    assert (again.labelling.n_already, again.labelling.n_labelled) == (2, 0)
    narrow = verify(screened, (0.0, 3.0), 1, FAST, progress=False)
    assert narrow.labelling.n_labelled == 0
    assert [r["id"] for r in _table(screened)] == ["JVASP-30458"]
    below = verify(screened, (0.0, 2.0), 2, FAST, progress=False)
    assert (below.n_checked, below.n_confirmed) == (2, 0)
    assert part_paths(level_dir(screened / LABELS)) == parts
    assert [p.stat().st_mtime_ns for p in parts] == stamps


@pytest.mark.dft
def test_a_failed_calculation_is_a_row_with_its_reason(screened, tmp_path):
    pytest.importorskip("gpaw")
    results = tmp_path / "results"
    shutil.copytree(screened, results, ignore=shutil.ignore_patterns("verify*", LABELS))
    failed = verify(results, WIDE, 1, FAST, timeout=1, progress=False)
    assert (failed.n_checked, failed.n_confirmed, failed.labelling.n_failed) == (0, 0, 1)
    [row] = _table(results)
    assert (row["id"], row["dft_gap"], row["confirmed"]) == ("JVASP-30458", "", "False")
    assert row["reason"].startswith("timed out after 1 s")
    assert read_training_set(level_dir(results / LABELS), graphs=False).ids.size == 0


@pytest.mark.dft
@pytest.mark.slow
def test_cli_verifies_and_prints_a_summary(shared_data, tiny_model, ray_local, tmp_path):
    """The wiring, at the real (default) settings: one diamond cell, about half a minute."""
    pytest.importorskip("gpaw")
    (tmp_path / "in").mkdir()
    shutil.copy(shared_data / "poscar" / "POSCAR-JVASP-91", tmp_path / "in")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", "--structures", str(tmp_path / "in"), "--model",
                                       str(tiny_model), "-o", str(out), "--bandgap", "0:4",
                                       "--verify", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert ("verified 1 of 1: 0 confirmed inside 0:4 eV (1 calculated in this run) -> "
            f"{out / TABLE}") in result.output
    [row] = _table(out)
    assert row["id"] == "JVASP-91" and 4.0 < float(row["dft_gap"]) < 4.5
    assert read_training_set(level_dir(out / LABELS), graphs=False).attrs["settings"] == {
        "kpt_density": 2.5, "smearing": 0.01, "broadening": 0.1, "grid_spacing": 0.25,
        "valence": "jarvis", "spin": "magnetic-elements"}


def test_verify_needs_a_window(tmp_path):
    result = CliRunner().invoke(main, ["run", "--structures", str(tmp_path), "--verify", "2"])
    assert result.exit_code == 2
    assert "--verify checks the top of the --bandgap shortlist" in result.output


def test_missing_gpaw_is_one_line_before_screening(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gpaw", None)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", "--structures", str(tmp_path), "-o", str(out),
                                       "--bandgap", "1:2", "--verify", "2"])
    assert result.exit_code == 1 and not out.exists()
    assert result.output.strip().splitlines()[-1].endswith("pip install -e '.[dft]'")


def test_rank_puts_the_gap_furthest_inside_first_ties_by_id():
    ids = np.array(["e", "d", "c", "b", "a"])
    gaps = np.array([1.4, 1.45, 1.55, 1.5, 1.6], dtype=np.float32)
    assert list(ids[rank(gaps, ids, (1.4, 1.6))]) == ["b", "c", "d", "a", "e"]
    assert list(ids[rank(gaps, ids, (1.4, np.inf))]) == ["a", "c", "b", "d", "e"]
    assert list(ids[rank(gaps, ids, (-np.inf, np.inf))]) == ["a", "b", "c", "d", "e"]
