"""DFT labelling on real JARVIS cells: physical DOS, gaps, failures, timeouts, exact resume."""
import gzip
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import GPAW_LABELS

from screener.cli import main
from screener.dft.gpaw import Settings, initial_moments, spin_mode
from screener.dft.label import (
    GAPPED_ABOVE,
    LOST,
    _failure_result,
    _needs_label,
    element_cover,
    gap_balanced,
    label,
    latest_results,
    level_dir,
    read_inputs,
    read_results,
    select,
    small_first,
    work_dir,
    write_result,
)
from screener.dos import E_STEP, ENERGY_GRID, band_gap, valence_electrons
from screener.io import Failure
from screener.io.files import file_sha256
from screener.training import label_store
from screener.training.dataset import read_structures, read_training_set

FAST = Settings(kpt_density=1.0)
CELLS = ("JVASP-816", "JVASP-1014", "JVASP-116", "JVASP-1130", "JVASP-7577")  # Al Ta MgO LiF Si
# JVASP-7577 is one Si atom in a 20 A box: its 3p shell is half filled, so it has no gap.
# Ta, a 5d metal, is calculated spin-polarized and stays all but non-magnetic (0.16 muB per
# cell on FAST's coarse k-points).
MNCL2 = "JVASP-2038"  # high-spin Mn2+ (5 muB), gapped: JARVIS optB88vdW 1.55 eV


def _records(shared_data: Path) -> list[dict]:
    with gzip.open(shared_data / "jarvis_structures.json.gz", "rt") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def inputs(shared_data, tmp_path_factory) -> Path:
    """The cells as JARVIS records, plus a record with two atoms 0.1 A apart."""
    records = {r["jid"]: r for r in _records(shared_data)}
    chosen = [records[jid] for jid in CELLS]
    bad = json.loads(json.dumps(records["JVASP-116"]))
    bad["jid"] = "overlapping-atoms"
    bad["atoms"]["coords"][1] = [0.1, 0.0, 0.0]
    path = tmp_path_factory.mktemp("inputs") / "cells.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(chosen + [bad], f)
    return path


@pytest.fixture(scope="module")
def labelled(inputs, tmp_path_factory, ray_local):
    """(label root, summary) of one run over the cells."""
    pytest.importorskip("gpaw")
    out = tmp_path_factory.mktemp("labels") / "labels"
    return out, label(inputs, out, FAST, workers=2, timeout=300, progress=False)


@pytest.mark.dft
@pytest.mark.slow
def test_labels_are_real_normalized_spectra(labelled):
    out, summary = labelled
    assert (summary.n_selected, summary.n_labelled, summary.n_failed) == (6, 5, 1)
    data = read_training_set(level_dir(out))
    assert list(data.ids) == sorted(CELLS)
    assert data.dos.shape == (5, 300) and np.isfinite(data.dos).all() and (data.dos >= 0).all()
    row = dict(zip(data.ids, range(5)))
    lif = data.dos[row["JVASP-1130"]]
    # F 2p holds 6 electrons and lies wholly inside the window. Labels count valence electrons
    # as JARVIS does (Li_sv 3 + F 7 = 10, where GPAW's setups have 8): per spin and per electron
    # that is 6 / 20, so grid, broadening and normalization lose nothing and the scale is edos_up's.
    assert lif[ENERGY_GRID < 0].sum() * E_STEP == pytest.approx(6 / 20, abs=1e-3)
    assert data.extra["n_electrons"][row["JVASP-1130"]] == 8
    assert valence_electrons(np.array([3, 9])) == 10
    assert data.attrs["code"].startswith("GPAW ") and data.attrs["spin"].startswith("polarized")
    spin = dict(zip(data.ids, data.extra["spin"]))
    assert spin.pop("JVASP-1014") == "polarized" and set(spin.values()) == {"unpolarized"}
    assert np.abs(data.extra["magmom"]).max() < 0.3
    kpts = data.extra["kpts"]
    assert ((kpts % 2 == 0) | (kpts == 1)).all() and (data.extra["wall_time"] > 0).all()
    assert (data.extra["cpu_time"] > 0).all()


@pytest.mark.dft
@pytest.mark.slow
def test_gaps_from_eigenvalues_and_reference(labelled):
    out, _ = labelled
    data = read_training_set(level_dir(out))
    gap = dict(zip(data.ids, data.extra["gpaw_gap"]))
    ref = dict(zip(data.ids, data.ref_gap))
    assert gap["JVASP-816"] == gap["JVASP-1014"] == gap["JVASP-7577"] == 0
    assert 3.5 < gap["JVASP-116"] < 6.5 and 7.0 < gap["JVASP-1130"] < 11.0  # PBE MgO 4.5, LiF 9
    assert ref["JVASP-1130"] == pytest.approx(9.479) and ref["JVASP-816"] == 0
    for i, jid in enumerate(data.ids):
        vbm, cbm = data.extra["vbm"][i], data.extra["cbm"][i]
        assert cbm - vbm == pytest.approx(gap[jid])
        if gap[jid] > 0:
            assert vbm == pytest.approx(-0.5) and band_gap(data.dos[i])[0] == pytest.approx(
                gap[jid], abs=0.5)


@pytest.mark.dft
@pytest.mark.slow
def test_bad_structure_is_a_recorded_failure(labelled):
    out, summary = labelled
    [failure] = summary.failures
    assert failure.id == "overlapping-atoms" and failure.stage == "validate"
    [part] = label_store.part_paths(level_dir(out))
    assert label_store.read_part(part).failures == [failure]


@pytest.mark.dft
@pytest.mark.slow
def test_rerun_computes_nothing_and_adds_no_part(labelled, inputs):
    out, _ = labelled
    [part] = label_store.part_paths(level_dir(out))
    digest = file_sha256(part)
    result = CliRunner().invoke(main, ["label", "--structures", str(inputs), "-o", str(out),
                                       "--kpt-density", "1.0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "6 already done, 0 labelled, 0 failed" in result.output
    assert label_store.part_paths(level_dir(out)) == [part] and file_sha256(part) == digest
    export = CliRunner().invoke(main, ["label", "-o", str(out), "--export-only"])
    assert export.exit_code != 0 and "no finished structure to export" in export.output
    other = CliRunner().invoke(main, ["label", "--structures", str(inputs), "-o", str(out)])
    assert other.exit_code != 0 and "was labelled with {'kpt_density': 1.0" in other.output


@pytest.mark.dft
@pytest.mark.slow
def test_a_fresh_clone_of_the_parts_resumes_without_recomputing(labelled, inputs, tmp_path):
    """Committed parts without the work folder: labelled and failed structures are skipped."""
    out, _ = labelled
    clone = tmp_path / "labels"
    shutil.copytree(level_dir(out), level_dir(clone))
    result = CliRunner().invoke(main, ["label", "--structures", str(inputs), "-o", str(clone),
                                       "--kpt-density", "1.0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "6 already done, 0 labelled, 0 failed" in result.output
    assert [p.name for p in label_store.part_paths(level_dir(clone))] == ["part-0000.h5"]
    assert latest_results(clone)["overlapping-atoms"]["stage"] == "validate"


@pytest.mark.dft
@pytest.mark.slow
def test_spin_polarized_relabel_is_a_new_part(shared_data, tmp_path, ray_local):
    """Labels made unpolarized stay valid for cells without magnetic elements; MnCl2's is
    redone polarized, into a new part that supersedes it, the first part untouched."""
    pytest.importorskip("gpaw")
    records = {r["jid"]: r for r in _records(shared_data)}
    inputs = tmp_path / "cells.json"
    inputs.write_text(json.dumps([records[CELLS[0]], records[MNCL2]]))
    out = tmp_path / "labels"
    before = label(inputs, out, Settings(kpt_density=1.0, spin="unpolarized"), workers=1,
                   timeout=300, progress=False)
    assert before.n_labelled == 2
    [first] = label_store.part_paths(level_dir(out))
    digest = file_sha256(first)
    unpolarized = read_training_set(level_dir(out), graphs=False)

    after = label(inputs, out, FAST, workers=1, timeout=300, progress=False)
    assert (after.n_already, after.n_labelled) == (1, 1)
    assert [p.name for p in label_store.part_paths(level_dir(out))] == ["part-0000.h5",
                                                                         "part-0001.h5"]
    assert file_sha256(first) == digest
    data = read_training_set(level_dir(out), graphs=False)
    row = {i: k for k, i in enumerate(data.ids)}
    al, mn = row[CELLS[0]], row[MNCL2]
    assert list(data.extra["spin"][[al, mn]]) == ["unpolarized", "polarized"]
    assert np.array_equal(data.dos[al], unpolarized.dos[al])
    assert data.extra["magmom"][mn] == pytest.approx(5.0, abs=0.1)
    assert 1.0 < data.extra["gpaw_gap"][mn] < 2.5 and unpolarized.extra["gpaw_gap"][mn] < 1.0
    # Below E_F the up channel holds Mn 3d's 5 electrons and at most Cl 3p's 6 of one spin;
    # the spin average would hold 2.5 + at most 6. Per JARVIS valence electron (Mn 13 +
    # 2 Cl 7 = 27), only the up channel can exceed 8.5 / 27 in the window.
    up = data.dos[mn][ENERGY_GRID < 0].sum() * E_STEP
    assert 8.5 / 27 < up <= 11 / 27
    assert label(inputs, out, FAST, workers=1, progress=False).n_already == 2


@pytest.mark.dft
@pytest.mark.slow
def test_timeout_fails_the_structure_and_the_run_goes_on(inputs, tmp_path, ray_local):
    pytest.importorskip("gpaw")
    out = tmp_path / "slow"
    summary = label(inputs, out, FAST, workers=1, timeout=1, limit=3, progress=False)
    timed_out = [f for f in summary.failures if f.stage == "label"]
    assert len(timed_out) == 2 and summary.n_labelled == 0
    assert (summary.exported.n_labelled, summary.exported.n_failed) == (0, 3)
    assert all(re.match(r"timed out after 1 s \(\d+ s CPU\)", f.reason) for f in timed_out)


@pytest.mark.dft
@pytest.mark.slow
def test_a_lost_task_is_tried_again_by_the_next_run(inputs, tmp_path, ray_local):
    """A dead worker is not the structure's fault: unlike other failures, its part is redone."""
    pytest.importorskip("gpaw")
    out = tmp_path / "lost"
    lost = Failure(CELLS[0], str(inputs), "label", f"{LOST}: the worker died")
    write_result(work_dir(level_dir(out)), _failure_result(lost, float("nan"), 0.0))
    summary = label(inputs, out, FAST, workers=1, timeout=300, limit=2, progress=False)
    assert (summary.n_already, summary.n_labelled) == (0, 1)  # and the bad record, failed
    assert latest_results(out)[CELLS[0]]["status"] == "ok"


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@pytest.mark.dft
@pytest.mark.slow
def test_when_its_raylet_dies_the_run_stops_and_keeps_its_finished_work(inputs, tmp_path):
    """The queue is not marked lost: the run in flight is collected, the rest waits for a rerun."""
    pytest.importorskip("gpaw")
    out = tmp_path / "died"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.Popen([sys.executable, "-m", "screener.cli", "label", "--structures",
                            str(inputs), "-o", str(out), "--workers", "1", "--limit", "3",
                            "--kpt-density", "1.0", "--quiet"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (work_dir(level_dir(out)) / "logs").exists() and time.monotonic() < deadline:
            assert run.poll() is None, run.communicate()[1][-2000:]
            time.sleep(0.2)
        [raylet] = [pid for pid in _descendants(run.pid) if _process_name(pid) == "raylet"]
        os.kill(raylet, signal.SIGKILL)
        _, stderr = run.communicate(timeout=300)
    finally:
        run.kill()
    assert run.returncode == 1 and "Ray node stopped" in stderr, stderr[-2000:]
    results = [(r["id"], r["status"]) for r in read_results(work_dir(level_dir(out)))]
    assert results == [(CELLS[0], "ok"), ("overlapping-atoms", "failed")]
    assert not label_store.part_paths(level_dir(out))


@pytest.mark.dft
@pytest.mark.slow
def test_a_cell_too_skewed_for_gpaw_is_labelled_in_its_niggli_form(shared_data, tmp_path,
                                                                    ray_local):
    """JVASP-46446 (AlCrO4) has a 146 degree cell angle, which GPAW's stencils refuse."""
    pytest.importorskip("gpaw")
    [record] = [r for r in _records(shared_data) if r["jid"] == "JVASP-46446"]
    inputs = tmp_path / "skewed.json"
    inputs.write_text(json.dumps([record]))
    out = tmp_path / "skewed"
    summary = label(inputs, out, Settings(kpt_density=0.3), workers=1, timeout=300,
                    progress=False)
    assert (summary.n_labelled, summary.n_failed) == (1, 0), summary.failures
    [cell] = read_structures(level_dir(out))
    assert np.allclose(cell.lattice, record["atoms"]["lattice_mat"])
    data = read_training_set(level_dir(out), graphs=False)
    assert np.isfinite(data.dos).all() and data.extra["n_electrons"][0] == 33


def _jarvis_items(shared_data) -> list:
    return [(s, g) for s, g in read_inputs(shared_data / "jarvis_structures.json.gz")
            if not isinstance(s, Failure)]


def _elements(structures) -> set:
    return {z for s in structures for z in s.numbers.tolist()}


def test_small_first_takes_every_element_early(shared_data):
    """Dy first comes in a 9-atom cell and Cs in one of 36 or more: each element's smallest
    structure goes ahead of the thousands of smaller cells that bring nothing new."""
    items = _jarvis_items(shared_data)
    ordered = [s for s, _ in small_first(items)]
    cover_items, rest = element_cover(items)
    cover = [s for s, _ in cover_items]
    assert ordered[:len(cover)] == cover and len(ordered) == len(items)
    assert _elements(cover) == _elements(ordered) and len(cover) < 100
    for part in (cover, [s for s, _ in rest]):
        sizes = [s.n_atoms for s in part]
        assert sizes == sorted(sizes)
    for i, structure in enumerate(cover):
        assert set(structure.numbers.tolist()) - _elements(cover[:i])
    dysprosium, caesium = 66, 55
    for z in (dysprosium, caesium):
        first = next(i for i, s in enumerate(ordered) if z in s.numbers)
        assert first < len(cover) and ordered[first].n_atoms == min(
            s.n_atoms for s in ordered if z in s.numbers)
    assert max(s.n_atoms for s in cover) >= 36


def test_spin_mode_follows_the_elements():
    """Open d or f shells are calculated polarized; closed-shell ions (Sc, Zn, Lu) are not."""
    mode = Settings()
    assert spin_mode(mode, [25, 8]) == spin_mode(mode, [58, 1]) == "polarized"  # MnO, CeH
    assert spin_mode(mode, [11, 17]) == spin_mode(mode, [30, 21, 71, 8]) == "unpolarized"
    assert spin_mode(Settings(spin="unpolarized"), [25, 8]) == "unpolarized"
    assert initial_moments(np.array([26, 25, 8, 4, 58])).tolist() == [4, 5, 0, 0, 1]
    with pytest.raises(ValueError, match="spin"):
        Settings(spin="antiferromagnetic")


def test_unpolarized_labels_are_redone_only_where_elements_are_magnetic(tmp_path):
    """The committed labels, all unpolarized: those of cells with magnetic elements are what
    `screen label` now redoes, the others stay done."""
    out = tmp_path / "labels"
    part = label_store.read_part(GPAW_LABELS / "part-0000.h5")
    label_store.write_part(level_dir(out), part.records, part.failures, part.provenance)
    latest = latest_results(out)
    todo = {i for i, result in latest.items() if _needs_label(result, Settings(), False)}
    magnetic = {s.id for s in part.records.structures
                if spin_mode(Settings(), s.numbers.tolist()) == "polarized"}
    assert todo == magnetic and 0 < len(todo) < len(part.records)
    assert not any(_needs_label(r, Settings(spin="unpolarized"), False) for r in latest.values())
    assert all(_needs_label(latest[f.id], Settings(), True) for f in part.failures)


def test_a_structure_without_a_gpaw_basis_fails_before_any_task(shared_data):
    """gpaw-data has no dzp basis for Tc, Th and U: those structures fail as they are read,
    and the element cover takes Cs from its next structure (49 atoms, no U)."""
    pytest.importorskip("gpaw")
    items = read_inputs(shared_data / "jarvis_structures.json.gz")
    failed = {item.id: item.reason for item, _ in items if isinstance(item, Failure)}
    assert failed["mp-562513"] == "no dzp basis in GPAW's data for U"
    assert failed["JVASP-1169"] == "no dzp basis in GPAW's data for Th"
    assert all(reason.startswith("no dzp basis") for reason in failed.values())
    cover = [s for s, _ in element_cover([i for i in items if not isinstance(i[0], Failure)])[0]]
    caesium = 55
    assert [s.id for s in cover if caesium in s.numbers] == ["mp-540725"]


def test_gap_balanced_alternates_classes_after_the_element_cover(shared_data):
    items = _jarvis_items(shared_data)
    ordered = gap_balanced(items)
    n_cover = len(element_cover(items)[0])
    assert sorted(s.id for s, _ in ordered) == sorted(s.id for s, _ in items)
    assert ordered[:n_cover] == small_first(items)[:n_cover]
    gapped = [g > GAPPED_ABOVE for _, g in ordered[n_cover:]]
    n_gapped = sum(gapped)
    assert gapped[:2 * n_gapped:2] == [True] * n_gapped and not any(gapped[1:2 * n_gapped:2])
    for flag in (True, False):
        sizes = [s.n_atoms for (s, _), g in zip(ordered[n_cover:], gapped) if g is flag]
        assert sizes == sorted(sizes)


def test_shortlist_csv_rereads_records_with_their_gaps(shared_data, tmp_path):
    source = shared_data / "jarvis_structures.json.gz"
    shortlist = tmp_path / "shortlist.csv"
    shortlist.write_text(f"id,source,band_gap\nJVASP-A,{source}[0],1.5\nJVASP-B,{source}[5],1.4\n"
                         f"missing,{tmp_path / 'POSCAR-nothing'},1.5\n")
    records = _records(shared_data)
    [(a, gap_a), (b, _), (missing, gap_missing)] = read_inputs(shortlist)
    assert a.id == "JVASP-A" and a.n_atoms == len(records[0]["atoms"]["elements"])
    assert gap_a == records[0]["optb88vdw_bandgap"] and b.source == f"{source}[5]"
    assert isinstance(missing, Failure) and math.isnan(gap_missing)
    assert [s.id for s, _ in select(read_inputs(shortlist), "input", 2)] == ["missing", "JVASP-A"]


@pytest.mark.parametrize(("source", "message"), [
    ("moved.json", "[Errno 2] No such file or directory: "),
    ("broken.json", "invalid JSON: Expecting value: line 1 column 10 (char 9)"),
])
def test_shortlist_of_a_moved_or_broken_input_is_one_error_line(tmp_path, source, message):
    (tmp_path / "broken.json").write_text('[{"jid": ')
    shortlist = tmp_path / "shortlist.csv"
    shortlist.write_text(f"id,source\nX,{tmp_path / source}[0]\n")
    result = CliRunner().invoke(main, ["label", "--structures", str(shortlist),
                                       "-o", str(tmp_path / "labels.h5")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.startswith(f"Error: {message}")
