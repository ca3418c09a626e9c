"""`screen check-labels` on the project's real GPAW labels and the real JARVIS eDOS sample:
every number equals the one computed by hand from the raw arrays of the files."""
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import GPAW_LABELS

from screener.cli import main
from screener.dft.check_labels import DOS_FOLDER, GAP_PARITY, REPORT, check_labels
from screener.training import label_store
from screener.training.dataset import from_json, write_training_set


def _raw(path: Path) -> dict[str, np.ndarray]:
    """The newest record of each id, straight from the parts."""
    found = label_store.newest(path)
    records = [found.parts[p].records for p in found.part]
    return {"ids": found.ids,
            "dos": np.stack([r.dos[i] for r, i in zip(records, found.row)]),
            "ref_gap": np.array([r.ref_gap[i] for r, i in zip(records, found.row)]),
            "gpaw_gap": np.array([r.extra["gpaw_gap"][i] for r, i in zip(records, found.row)])}


@pytest.fixture(scope="module")
def edos_labels(shared_data, tmp_path_factory) -> Path:
    """A label folder of the committed labels of the 10 JARVIS eDOS structures, without their
    reference gaps."""
    jids = [r["jid"] for r in _edos_records(shared_data)]
    found = label_store.newest(GPAW_LABELS)
    keep = [k for k, i in enumerate(found.ids) if i in jids]
    records = [found.parts[found.part[k]].records for k in keep]
    rows = [found.row[k] for k in keep]
    folder = tmp_path_factory.mktemp("edos") / "level"
    label_store.write_part(folder, label_store.Records(
        [r.structures[i] for r, i in zip(records, rows)],
        np.stack([r.dos[i] for r, i in zip(records, rows)]), np.full(len(rows), np.nan),
        {name: np.array([r.extra[name][i] for r, i in zip(records, rows)])
         for name in label_store.EXTRA}), [], found.parts[-1].provenance)
    return folder


def _edos_records(shared_data: Path) -> list[dict]:
    return json.loads((shared_data / "jarvis_edos_sample10.json").read_text())


def test_gap_check_equals_hand_computation(tmp_path):
    raw = _raw(GPAW_LABELS)
    known = np.isfinite(raw["ref_gap"])
    ref = raw["ref_gap"][known].astype(np.float64)
    gpaw = raw["gpaw_gap"][known]
    gapped = ref >= 0.1

    report = check_labels(GPAW_LABELS, tmp_path)

    gap = report["gap"]
    assert gap["n"] == known.sum() > 0
    assert gap["mae"] == pytest.approx(np.mean(np.abs(gpaw - ref)), rel=1e-12)
    assert gap["correlation"] == pytest.approx(np.corrcoef(gpaw, ref)[0, 1], rel=1e-12)
    assert gap["n_gapped"] == gapped.sum()
    assert gap["mae_gapped"] == pytest.approx(np.mean(np.abs(gpaw - ref)[gapped]), rel=1e-12)
    assert gap["class_disagreements"] == np.sum(gapped != (gpaw >= 0.1)) == len(
        gap["disagreements"])
    listed = {d["id"] for d in gap["disagreements"]}
    assert listed == set(raw["ids"][known][gapped != (gpaw >= 0.1)])
    assert json.loads((tmp_path / REPORT).read_text()) == report
    assert (tmp_path / GAP_PARITY).stat().st_size > 0
    assert "dos" not in report


def test_dos_check_equals_hand_computation(tmp_path, shared_data, edos_labels):
    raw = _raw(edos_labels)
    rows = {sid: i for i, sid in enumerate(raw["ids"])}
    records = _edos_records(shared_data)
    assert all(len(r["edos_up"]) == raw["dos"].shape[1] == 300 for r in records)
    expected = {r["jid"]: np.mean(np.abs(raw["dos"][rows[r["jid"]]] - np.array(r["edos_up"])))
                for r in records if r["jid"] in rows}

    report = check_labels(edos_labels, tmp_path, shared_data / "jarvis_edos_sample10.json")

    dos = report["dos"]
    assert dos["n_matched"] == len(expected) >= 1
    assert {s["id"]: s["mae"] for s in dos["structures"]} == pytest.approx(expected, rel=1e-6)
    assert dos["mae_mean"] == pytest.approx(np.mean(list(expected.values())), rel=1e-6)
    assert dos["not_labelled"] == [r["jid"] for r in records if r["jid"] not in rows]
    assert dos["grid"] == {"e_min": -5.0, "e_max": 9.95, "step": 0.05, "n_bins": 300}
    for jid in expected:
        assert (tmp_path / DOS_FOLDER / f"{jid}.png").stat().st_size > 0
    assert report["gap"] == {"n": 0} and not (tmp_path / GAP_PARITY).exists()
    assert report["notes"] == ["no JARVIS reference gaps in the labels: gap parity skipped"]


def test_cli_lists_the_edos_structures_it_has_no_label_for(tmp_path, shared_data, edos_labels):
    records = _edos_records(shared_data)
    unlabelled = {**records[0], "jid": "JVASP-NOT-LABELLED"}
    edos = tmp_path / "edos.json"
    edos.write_text(json.dumps([*records, unlabelled]))
    result = CliRunner().invoke(main, ["check-labels", str(edos_labels), "-o", str(tmp_path / "out"),
                                       "--edos", str(edos)])
    assert result.exit_code == 0, result.output
    assert "DOS vs JARVIS edos_up" in result.output and f"{len(records)} matched" in result.output
    assert "not labelled: JVASP-NOT-LABELLED" in result.output
    saved = json.loads((tmp_path / "out" / REPORT).read_text())
    assert saved["dos"]["not_labelled"] == ["JVASP-NOT-LABELLED"]


def test_files_that_are_not_gpaw_labels_are_refused(tmp_path, shared_data):
    edos = shared_data / "jarvis_edos_sample10.json"
    result = CliRunner().invoke(main, ["check-labels", str(edos), "-o", str(tmp_path)])
    assert result.exit_code == 1
    assert "not a readable HDF5 training set" in result.output

    labelled = from_json(edos)
    jarvis_set = tmp_path / "jarvis.h5"
    write_training_set(jarvis_set, labelled.structures, labelled.dos, labelled.ref_gap,
                       labelled.provenance)
    result = CliRunner().invoke(main, ["check-labels", str(jarvis_set), "-o", str(tmp_path)])
    assert result.exit_code == 1
    assert "not one from `screen label` (no extra/gpaw_gap, extra/vbm, extra/cbm)" in result.output
    assert not (tmp_path / REPORT).exists()
