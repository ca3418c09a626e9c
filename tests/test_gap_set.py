"""Known gaps as DOS bounds: the bounds agree with band_gap, the set reads real JARVIS records,
and training on it moves predicted spectra inside the bounds."""
import gzip
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from screener.dos import E_STEP, ENERGY_GRID, GAP_THRESHOLD, N_BINS, band_gap
from screener.io import discover
from screener.training import train as training
from screener.training.config import gap_settings
from screener.training.dataset import SPLIT_SEED, from_json
from screener.training.gap_set import (
    EDGE_MARGIN,
    METAL_FLOOR,
    bounds_excess,
    dos_bounds,
    read_gap_set,
    spectrum_bounds,
)
from screener.training.parts import load_gap_parts, load_parts
from tests.test_train import data_path, local_run, one_epoch, settings_for  # noqa: F401

SMALL = 80


@pytest.fixture(scope="module")
def records(shared_data, tmp_path_factory):
    """The first SMALL real JARVIS records, as a file of their own."""
    with gzip.open(shared_data / "jarvis_structures.json.gz", "rt") as f:
        rows = json.load(f)[:SMALL]
    path = tmp_path_factory.mktemp("gaps") / "records.json"
    path.write_text(json.dumps(rows))
    return path, rows


@pytest.mark.parametrize("gap", [0.6, 1.5, 4.0])
def test_a_spectrum_with_the_gap_keeps_the_bounds_and_band_gap_finds_it(gap):
    vbm = -min(gap / 2, 0.5)
    dos = np.where((ENERGY_GRID < vbm) | (ENERGY_GRID > vbm + gap), 0.05, 0.0)
    bounds = dos_bounds(gap)
    upper = np.isfinite(bounds[1])
    assert upper.any() and not bounds[0].any()
    assert bounds_excess(torch.tensor(dos[None]), torch.tensor(bounds[None])).item() == 0
    inside = ENERGY_GRID[upper]
    assert inside.min() >= vbm + EDGE_MARGIN and inside.max() <= vbm + gap - EDGE_MARGIN
    assert band_gap(dos)[0] == pytest.approx(gap, abs=2 * E_STEP + 1e-9)

    filled = np.full_like(dos, 0.02)
    excess = bounds_excess(torch.tensor(filled[None]), torch.tensor(bounds[None])).item()
    assert excess == pytest.approx(0.02 * upper.sum() / N_BINS)


def test_metals_need_states_around_the_fermi_level_and_narrow_gaps_say_nothing():
    lower, upper = dos_bounds(0.0)
    assert np.isinf(upper).all()
    assert ENERGY_GRID[lower > 0].tolist() == pytest.approx([-0.05, 0.0, 0.05])
    assert (lower[lower > 0] > GAP_THRESHOLD).all()
    empty = torch.zeros(1, N_BINS)
    excess = bounds_excess(empty, torch.tensor(dos_bounds(0.0)[None])).item()
    assert excess == pytest.approx(3 * METAL_FLOOR / N_BINS)
    assert dos_bounds(2 * EDGE_MARGIN) is None


def test_reads_real_records_minus_exclusions_with_a_seeded_split(records):
    path, rows = records
    held_out = rows[0]["jid"]
    gap_set = read_gap_set(path, exclude=[held_out])
    known = {r["jid"]: r["optb88vdw_bandgap"] for r in rows}
    assert held_out not in gap_set.ids and 0 < len(gap_set.ids) < SMALL
    for jid, gap, bounds in zip(gap_set.ids, gap_set.gaps, gap_set.bounds):
        assert gap == known[jid]
        np.testing.assert_array_equal(bounds, dos_bounds(gap))
    unusable = [jid for jid, gap in known.items()
                if jid != held_out and (not isinstance(gap, float) or dos_bounds(gap) is None)]
    assert len(gap_set.ids) == SMALL - 1 - len(unusable)
    assert sorted(np.concatenate(list(gap_set.split.values()))) == list(range(len(gap_set.ids)))
    again = read_gap_set(path, exclude=[held_out])
    assert all(np.array_equal(again.split[k], gap_set.split[k]) for k in gap_set.split)
    fewer = read_gap_set(path, exclude=[held_out, gap_set.ids[0]])
    part = {gap_set.ids[i]: k for k in gap_set.split for i in gap_set.split[k]}
    assert all(part[fewer.ids[i]] == k for k in fewer.split for i in fewer.split[k])


def test_training_with_the_gap_set_lowers_its_bounds_excess(data_path, records):  # noqa: F811
    """Same model, data, seed and steps, with and without the gap term."""
    path, _ = records
    settings = settings_for(data_path, **gap_settings(data_path, path, [], 10.0))
    gap_part, _ = load_gap_parts(settings, 0, 1)
    excess = []
    for with_gaps in (False, True):
        task, train_part, _, optimizer, scheduler = local_run(settings)
        for epoch in range(1, settings.epochs + 1):
            one_epoch(task, train_part, optimizer, scheduler, settings, epoch,
                      gap_part if with_gaps else None)
        excess.append(training.validation_mean(task.trainable, task.decode, gap_part, 16,
                                               torch.device("cpu"), False))
    print(f"bounds excess without the gap term {excess[0]:.4f}, with {excess[1]:.4f}")
    assert excess[1] < 0.75 * excess[0]


def test_hold_out_and_the_training_set_are_left_out(data_path, records, shared_data):  # noqa: F811
    path, _ = records
    held = training.held_out_ids([shared_data / "poscar"])
    fields = gap_settings(data_path, path, held, 2.0)
    poscars = {source.id for source in discover(shared_data / "poscar")}
    assert set(held) == poscars
    assert poscars <= set(fields["gap_exclude"]) and fields["gap_weight"] == 2.0
    assert len(fields["gaps_hash"]) == 64
    gap_set = read_gap_set(path, fields["gap_exclude"])
    assert not set(gap_set.ids) & set(fields["gap_exclude"])


def test_hold_out_leaves_the_training_set_too(data_path):  # noqa: F811
    data = training.read_training_set(data_path, graphs=False)
    held = [str(data.ids[data.split["train"][0]]), str(data.ids[data.split["val"][0]])]
    full = load_parts(str(data_path), 0, 1, lambda dos: dos)
    kept = load_parts(str(data_path), 0, 1, lambda dos: dos, hold_out=held)
    for before, after in zip(full, kept):
        assert len(after.rows) == len(before.rows) - 1
        assert not set(data.ids[after.rows].astype(str)) & set(held)


def test_the_gap_split_does_not_follow_the_training_seed(data_path, records):  # noqa: F811
    path, _ = records
    settings = settings_for(data_path, **gap_settings(data_path, path, [], 10.0))
    first, other = (load_gap_parts(replace(settings, seed=seed), 0, 1) for seed in (0, 5))
    for a, b in zip(first, other, strict=True):
        assert np.array_equal(a.rows, b.rows)
    assert training.gap_meta(replace(settings, seed=5))["seed"] == SPLIT_SEED


def test_labelled_spectra_are_bounded_by_their_own_gap(shared_data):
    sample = from_json(shared_data / "jarvis_edos_sample10.json")
    bounds = spectrum_bounds(sample.dos)
    gap, vbm, cbm = band_gap(sample.dos)
    for spectrum, (lower, upper), g, lo, hi in zip(sample.dos, bounds, gap, vbm, cbm):
        assert not lower.any()
        zero = np.isfinite(upper)
        if g == 0:
            assert not zero.any()
            continue
        assert ENERGY_GRID[zero].min() == pytest.approx(lo + E_STEP)
        assert ENERGY_GRID[zero].max() == pytest.approx(hi - E_STEP)
        assert (spectrum[zero] <= GAP_THRESHOLD).all()
    assert (gap > 0).sum() >= 3
