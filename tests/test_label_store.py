"""Label parts on the project's real labels: append-only, newest record wins, graphs cached
outside git and rebuilt when their part or builder changes, and the same set as the file."""
import csv
import hashlib

import h5py
import numpy as np
import pytest
from conftest import GPAW_LABELS

from screener.dft.label import import_training_set, level_dir
from screener.io import Failure
from screener.results.hdf5 import SchemaError
from screener.results.shards import ids_digest
from screener.training import label_store
from screener.training.dataset import (
    read_set_graphs,
    read_structures,
    read_training_set,
    split_by_id,
    training_set_sha256,
    write_training_set,
)

FIRST = GPAW_LABELS / "part-0000.h5"
# data/gpaw_labels.h5 as it was before the parts (commit 325db4f): ids_digest of its 1,936
# ids and sha256 of its float32 spectra; part-0000 is that file, converted.
OLD_IDS = "98d1985bfd39c7a1c98820d8e3b921a0ce9d2489c9861ae1cb94a1b2ec19ecc1"
OLD_DOS = "d05a7df371d1bada2222f597bdba2263a9ea5c8e5b6281781ffd4521eab2648e"
OLD_SPLIT = (1327, 207, 402)
N = 40


@pytest.fixture(scope="module")
def real() -> label_store.Part:
    return label_store.read_part(FIRST)


def _subset(part: label_store.Part, rows, dos_shift: float = 0.0) -> label_store.Records:
    records = part.records
    return label_store.Records([records.structures[i] for i in rows],
                               records.dos[rows] + np.float32(dos_shift), records.ref_gap[rows],
                               {name: values[rows] for name, values in records.extra.items()})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(label_store.CACHE_ENV, str(folder))
    return folder / "graphs"


def test_the_first_part_is_the_old_file(real):
    ids = [s.id for s in real.records.structures]
    assert ids_digest(ids) == OLD_IDS and ids == sorted(ids)
    assert hashlib.sha256(real.records.dos.astype(np.float32).tobytes()).hexdigest() == OLD_DOS
    assert tuple(len(rows) for rows in split_by_id(ids).values()) == OLD_SPLIT
    assert len(real.failures) == 91 and set(real.records.extra["spin"]) == {"unpolarized"}
    assert real.provenance["settings"]["spin"] == "unpolarized"


def test_committed_parts_are_small():
    """Spectra and cells only: the 1,936 converted labels take 2.4 MB, graphs none."""
    for path in label_store.part_paths(GPAW_LABELS):
        with h5py.File(path, "r") as f:
            assert "graphs" not in f
    assert FIRST.stat().st_size / 1936 * 1000 < 3e6


def test_reading_parts_equals_reading_the_file(real, tmp_path, cache):
    """A file in the old layout (with its failures csv) imported as a part reads back as the
    same training set: ids, spectra, gaps, extras, split, cells and graphs."""
    rows = np.arange(N)
    records = _subset(real, rows)
    old = tmp_path / "old.h5"
    old_extra = {k: v for k, v in records.extra.items() if k not in ("cpu_time", "magmom", "spin",
                                                                      "finished")}
    write_training_set(old, records.structures, records.dos, records.ref_gap,
                       {**real.provenance, "settings": {k: v for k, v in
                                                        real.provenance["settings"].items()
                                                        if k != "spin"}}, extra=old_extra)
    with open(tmp_path / "old.failures.csv", "w", newline="") as f:
        csv.writer(f).writerows([("id", "source", "stage", "reason"),
                                 ("JVASP-X", "x.json[0]", "label", "timed out")])
    summary = import_training_set(old, tmp_path / "labels")
    assert (summary.n_labelled, summary.n_failed) == (N, 1)
    a, b = read_training_set(old), read_training_set(level_dir(tmp_path / "labels"))
    assert list(a.ids) == list(b.ids)
    assert np.array_equal(a.dos, b.dos) and np.array_equal(a.ref_gap, b.ref_gap, equal_nan=True)
    assert all(np.array_equal(a.split[k], b.split[k]) for k in a.split)
    assert all(np.array_equal(a.extra[k], b.extra[k]) for k in a.extra)
    assert list(a.formula) == list(b.formula)
    for x, y in zip(a.graphs, b.graphs):
        assert np.array_equal(x["neighbors"], y["neighbors"])
        np.testing.assert_allclose(x["edge_vec"], y["edge_vec"], atol=1e-6)
    cells = read_structures(level_dir(tmp_path / "labels"))
    assert all(np.array_equal(s.positions, t.positions) for s, t in
               zip(cells, read_structures(old)))
    assert read_set_graphs(level_dir(tmp_path / "labels"), [3])[0]["numbers"].tolist() == \
        a.graphs[3]["numbers"].tolist()


def test_parts_are_append_only(real, tmp_path):
    folder = tmp_path / "level"
    first = label_store.write_part(folder, _subset(real, np.arange(5)), [], real.provenance)
    digest, stamp = training_set_sha256(folder), first.stat().st_mtime_ns
    second = label_store.write_part(folder, _subset(real, np.arange(5, 8)),
                                    [Failure("JVASP-X", "x", "label", "timed out")],
                                    real.provenance)
    assert [p.name for p in label_store.part_paths(folder)] == ["part-0000.h5", "part-0001.h5"]
    assert second != first and first.stat().st_mtime_ns == stamp
    assert first.stat().st_mode & 0o222 == 0
    assert training_set_sha256(folder) != digest
    assert not list(folder.glob("*.tmp"))
    assert len(read_training_set(folder, graphs=False).ids) == 8
    with pytest.raises(ValueError, match="each structure id once"):
        label_store.write_part(folder, _subset(real, np.array([1, 1])), [], real.provenance)


def test_a_part_of_failures_only_is_an_empty_set(real, tmp_path):
    folder = tmp_path / "level"
    label_store.write_part(folder, _subset(real, np.arange(0)), real.failures[:2],
                           real.provenance)
    assert read_training_set(folder, graphs=False).ids.size == 0
    assert list(label_store.newest(folder).failed) == [f.id for f in real.failures[:2]]


def test_the_newest_record_of_an_id_wins(real, tmp_path):
    """A relabel is a new record in a later part; a later failure does not hide a label."""
    folder = tmp_path / "level"
    label_store.write_part(folder, _subset(real, np.arange(6)), [], real.provenance)
    relabel = _subset(real, np.array([2, 4]), dos_shift=1.0)
    relabel.extra["spin"] = np.array(["polarized", "polarized"])
    label_store.write_part(folder, relabel, [], real.provenance)
    failed_id = real.records.structures[5].id
    label_store.write_part(folder, _subset(real, np.array([6])),
                           [Failure(failed_id, "x", "label", "SCF did not converge")],
                           real.provenance)
    data = read_training_set(folder, graphs=False)
    assert list(data.ids) == sorted(s.id for s in real.records.structures[:7])
    row = {i: k for k, i in enumerate(data.ids)}
    for i in range(7):
        shifted = 1.0 if i in (2, 4) else 0.0
        np.testing.assert_array_equal(data.dos[row[real.records.structures[i].id]],
                                      real.records.dos[i] + np.float32(shifted))
    assert sorted(data.extra["spin"]).count("polarized") == 2
    assert list(label_store.newest(folder).failed) == [failed_id]
    assert data.attrs["parts"] == ["part-0000.h5", "part-0001.h5", "part-0002.h5"]


def test_parts_of_another_level_of_theory_are_refused(real, tmp_path):
    folder = tmp_path / "level"
    label_store.write_part(folder, _subset(real, np.arange(2)), [], real.provenance)
    other = {**real.provenance, "settings": {**real.provenance["settings"], "kpt_density": 1.0}}
    label_store.write_part(folder, _subset(real, np.arange(2, 4)), [], other)
    with pytest.raises(SchemaError, match="different levels of theory"):
        read_training_set(folder, graphs=False)


def test_graph_cache_follows_part_and_builder(real, tmp_path, cache, monkeypatch):
    folder = tmp_path / "level"
    label_store.write_part(folder, _subset(real, np.arange(4)), [], real.provenance)
    graphs = read_set_graphs(folder, [0, 3])
    [first] = list(cache.glob("*.h5"))
    assert first.name.startswith(label_store.file_sha256(folder / "part-0000.h5"))
    stamp = first.stat().st_mtime_ns
    read_set_graphs(folder, [1])
    assert first.stat().st_mtime_ns == stamp  # reused, not rebuilt

    label_store.write_part(folder, _subset(real, np.arange(4, 6)), [], real.provenance)
    read_training_set(folder)
    assert len(list(cache.glob("*.h5"))) == 2 and first.stat().st_mtime_ns == stamp

    with h5py.File(first, "r+") as f:  # a cache that is not this part's: rebuilt
        f.attrs["key"] = "something else"
    again = read_set_graphs(folder, [0, 3])
    assert first.stat().st_mtime_ns != stamp
    assert all(np.array_equal(g["neighbors"], h["neighbors"]) for g, h in zip(graphs, again))

    monkeypatch.setattr(label_store, "builder_sha256", lambda: "f" * 64)
    read_set_graphs(folder, [0])
    assert len(list(cache.glob(f"*-{'f' * 16}.h5"))) == 1
