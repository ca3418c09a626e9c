"""Training sets from the real JARVIS eDOS records and VASP runs: sources, layout, round trip."""
import json
import zipfile

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO

from screener.cli import main
from screener.dos import N_BINS, band_gap, dos_at_ef
from screener.graphs import build_graph
from screener.results.hdf5 import SchemaError
from screener.training.dataset import (
    FRACTIONS,
    SPLITS,
    from_jarvis_edos,
    from_json,
    from_vasprun,
    merge_ref_gaps,
    read_set_graphs,
    read_structures,
    read_training_set,
    skipped_summary,
    split_by_id,
    write_subset,
    write_training_set,
)

SCHEMA = json.loads((REPO / "schemas" / "training_set.json").read_text())
SAMPLE = "jarvis_edos_sample10.json"


@pytest.fixture(scope="module")
def records(shared_data) -> list[dict]:
    return json.loads((shared_data / SAMPLE).read_text())


@pytest.fixture(scope="module")
def sample(shared_data):
    return from_json(shared_data / SAMPLE)


@pytest.fixture(scope="module")
def written(sample, tmp_path_factory):
    path = tmp_path_factory.mktemp("set") / "sample10.h5"
    write_training_set(path, sample.structures, sample.dos, sample.ref_gap, sample.provenance,
                       extra={"n_atoms": np.array([s.n_atoms for s in sample.structures])}, seed=3)
    return path


def test_split_follows_ids_and_keeps_them_as_the_set_grows():
    ids = [f"JVASP-{i}" for i in range(5000)]
    split = split_by_id(ids, seed=1)
    assert np.array_equal(np.sort(np.concatenate(list(split.values()))), np.arange(5000))
    assert all(np.array_equal(split[k], split_by_id(ids, seed=1)[k]) for k in SPLITS)
    assert not np.array_equal(split["train"], split_by_id(ids, seed=2)["train"])
    sizes = np.array([len(split[k]) for k in SPLITS]) / len(ids)
    np.testing.assert_allclose(sizes, FRACTIONS, atol=0.02)
    grown_ids = ids[::-1] + ["mp-1", "mp-2"]
    grown = split_by_id(grown_ids, seed=1)
    part_of = {grown_ids[i]: k for k in SPLITS for i in grown[k]}
    assert all(part_of[ids[i]] == k for k in SPLITS for i in split[k])
    assert [len(split_by_id(ids[:3])[k]) for k in SPLITS] == [1, 1, 1]
    assert all(len(split_by_id(ids[:n], seed)[k]) for n in (3, 4, 6) for seed in range(20)
               for k in SPLITS)
    with pytest.raises(ValueError):
        split_by_id(ids, fractions=(0.5, 0.2, 0.2))


def test_json_source_reads_all_ten_records(sample, records):
    assert [s.id for s in sample.structures] == [r["jid"] for r in records]
    assert sample.skipped == []
    assert sample.dos.shape == (10, N_BINS) and sample.dos.dtype == np.float32
    np.testing.assert_allclose(sample.dos, np.array([r["edos_up"] for r in records]), rtol=1e-6)
    assert np.isnan(sample.ref_gap).all()
    assert sample.structures[0].formula == "AlAs"


def test_bad_targets_are_reported_not_dropped(records, tmp_path):
    bad = [dict(r) for r in records[:6]]
    bad[0]["edos_up"] = "na"
    bad[1]["edos_up"] = bad[1]["edos_up"][:299]
    bad[2]["edos_up"] = [float("nan")] + bad[2]["edos_up"][1:]
    bad[3]["edos_up"] = [-0.1] + bad[3]["edos_up"][1:]
    del bad[4]["atoms"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    labelled = from_json(path)
    assert [s.id for s in labelled.structures] == [records[5]["jid"]]
    reasons = {f.id: f.reason for f in labelled.skipped}
    assert list(reasons) == [r["jid"] for r in records[:5]]
    assert "'na'" in reasons[records[0]["jid"]]
    assert "(299,)" in reasons[records[1]["jid"]]
    assert "NaN" in reasons[records[2]["jid"]]
    assert "negative" in reasons[records[3]["jid"]]
    assert "atoms" in reasons[records[4]["jid"]]
    assert all(f.source.startswith(str(path)) for f in labelled.skipped)
    summary = skipped_summary(labelled.skipped)
    assert summary.startswith("skipped 5 record(s)") and records[3]["jid"] in summary


def test_jarvis_download_path_reads_its_cached_zip(shared_data, records, tmp_path):
    """The real jarvis-tools loader, offline: the cache holds the sample in the figshare form."""
    from jarvis.db.figshare import get_db_info

    member = get_db_info()["edos_pdos"][1]
    with zipfile.ZipFile(tmp_path / f"{member}.zip", "w") as z:
        z.writestr(member, json.dumps(records))
    labelled = from_jarvis_edos(tmp_path)
    assert [s.id for s in labelled.structures] == [r["jid"] for r in records]
    assert labelled.provenance["level_of_theory"].startswith("DFT, VASP, OptB88vdW")


def test_partial_jarvis_download_names_the_file(tmp_path):
    from jarvis.db.figshare import get_db_info

    partial = tmp_path / f"{get_db_info()['edos_pdos'][1]}.zip"
    partial.write_bytes(b"PK\x03\x04 cut off")
    with pytest.raises(RuntimeError, match="delete a partial one"):
        from_jarvis_edos(tmp_path)


def test_reference_gaps_merge_by_id(shared_data):
    labelled = from_json(shared_data / SAMPLE)
    assert merge_ref_gaps(labelled, shared_data / "jarvis_structures.json.gz") == 2
    gaps = dict(zip([s.id for s in labelled.structures], labelled.ref_gap))
    assert gaps["JVASP-15345"] == 0.0 and gaps["JVASP-89265"] == 0.0
    assert np.isnan(gaps["JVASP-1372"])


def test_vasprun_source_gz_runs(shared_data):
    labelled = from_vasprun(shared_data / "vasprun")
    assert [s.id for s in labelled.structures] == ["JVASP-39", "JVASP-42538", "JVASP-667"]
    assert labelled.skipped == []
    assert [s.formula for s in labelled.structures] == ["AlN", "Ta2CrNO5", "C"]
    np.testing.assert_allclose(labelled.ref_gap, [4.197, 0.0, 0.0], atol=1e-4)
    gap, _, _ = band_gap(labelled.dos[0])
    assert abs(gap - 4.197) <= 0.1
    assert dos_at_ef(labelled.dos[1]) > 0.01
    assert labelled.dos.max() < 1.0


def test_unreadable_vasprun_is_reported(tmp_path):
    run = tmp_path / "broken" / "vasprun.xml"
    run.parent.mkdir()
    run.write_text("<modeling><generator>")
    labelled = from_vasprun(tmp_path)
    assert labelled.structures == []
    assert [(f.id, f.stage) for f in labelled.skipped] == [("broken", "read")]


def test_round_trip(written, sample):
    data = read_training_set(written)
    assert list(data.ids) == [s.id for s in sample.structures]
    assert list(data.formula) == [s.formula for s in sample.structures]
    np.testing.assert_array_equal(data.dos, sample.dos)
    assert np.isnan(data.ref_gap).all()
    for name in SPLITS:
        np.testing.assert_array_equal(data.split[name], split_by_id(data.ids, seed=3)[name])
    assert data.attrs["kind"] == "training_set" and data.attrs["schema_version"] == 1
    assert data.attrs["split_seed"] == 3 and data.attrs["split_method"] == "id-hash" and data.attrs["source"] == sample.provenance["source"]
    np.testing.assert_array_equal(data.extra["n_atoms"], [s.n_atoms for s in sample.structures])
    s = sample.structures[4]
    expected = build_graph(s.lattice, s.positions, s.numbers)
    for key, value in expected.items():
        np.testing.assert_array_equal(data.graphs[4][key], value)
    subset = read_set_graphs(written, [7, 4])
    np.testing.assert_array_equal(subset[1]["angle_cos"], expected["angle_cos"])
    again = read_structures(written)[4]
    assert again.id == s.id
    np.testing.assert_array_equal(again.lattice, s.lattice)
    np.testing.assert_array_equal(again.positions, s.positions)
    np.testing.assert_array_equal(again.numbers, s.numbers)


def test_layout_matches_schema(written, sample):
    n = len(sample.structures)
    sizes = {"n": n, "N": sum(s.n_atoms for s in sample.structures), "n+1": n + 1}
    with h5py.File(written) as f:
        sizes.update({f"n_{k}": len(f["split"][k]) for k in SPLITS})
        assert {k: f.attrs[k] for k in ("kind", "schema_version")} == {
            k: SCHEMA["attrs"][k]["value"] for k in ("kind", "schema_version")}
        assert set(SCHEMA["attrs"]) <= set(f.attrs)
        for name, spec in SCHEMA["datasets"].items():
            dataset = f[name]
            assert dataset.shape == tuple(sizes.get(d, d) for d in spec["shape"]), name
            if spec["dtype"] == "str":
                assert h5py.check_string_dtype(dataset.dtype) is not None, name
            else:
                assert dataset.dtype == np.dtype(spec["dtype"]), name
        assert set(SCHEMA["groups"]) <= set(f)


def test_a_subset_keeps_the_chosen_training_rows_and_all_of_validation_and_test(written, tmp_path):
    full = read_training_set(written, graphs=False)
    chosen = full.split["train"][:2]
    write_subset(written, chosen, tmp_path / "sub.h5", {"why": "test"})
    sub = read_training_set(tmp_path / "sub.h5", graphs=False)
    for name in ("val", "test"):
        assert sorted(sub.ids[sub.split[name]]) == sorted(full.ids[full.split[name]])
    assert sorted(sub.ids[sub.split["train"]]) == sorted(full.ids[chosen])
    with pytest.raises(ValueError, match="training split"):
        write_subset(written, full.split["val"][:1], tmp_path / "bad.h5", {})


def test_foreign_files_are_refused(written, tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs.update(kind="graphs", schema_version=1)
    with pytest.raises(SchemaError, match="kind is 'graphs'"):
        read_training_set(other)
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(SchemaError, match="notes.h5"):
        read_training_set(text)


def test_write_refuses_inconsistent_inputs(sample, tmp_path):
    path = tmp_path / "x.h5"
    with pytest.raises(ValueError, match="dos has shape"):
        write_training_set(path, sample.structures, sample.dos[:5], sample.ref_gap, {})
    twice = sample.structures[:2] * 2
    with pytest.raises(ValueError, match="duplicate"):
        write_training_set(path, twice, sample.dos[:4], sample.ref_gap[:4], {})
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_training_sets(shared_data, tmp_path):
    runner = CliRunner()
    out = tmp_path / "sample.h5"
    result = runner.invoke(main, ["data", "json", str(shared_data / SAMPLE), "-o", str(out),
                                  "--ref-gaps", str(shared_data / "jarvis_structures.json.gz")])
    assert result.exit_code == 0, result.output
    assert "10 structures (2 with a reference gap), 0 skipped" in result.output
    assert len(read_training_set(out, graphs=False).ids) == 10
    out = tmp_path / "vasp.h5"
    result = runner.invoke(main, ["data", "vasprun", str(shared_data / "vasprun"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert read_training_set(out, graphs=False).attrs["level_of_theory"].startswith("VASP")


@pytest.mark.parametrize(("name", "content", "reason"), [
    ("broken.json", b'[{"jid": ', "invalid JSON: Expecting value: line 1 column 10 (char 9)"),
    ("empty.json", b"[]", "JSON holds no records"),
    ("cut.json.gz", b"not gzip", "not readable gzip data: "),
])
@pytest.mark.parametrize("broken_as", ["source", "--ref-gaps"])
def test_broken_record_file_is_one_error_line_naming_it(shared_data, tmp_path, name, content,
                                                         reason, broken_as):
    broken = tmp_path / name
    broken.write_bytes(content)
    sample = shared_data / SAMPLE
    source, ref_gaps = (broken, sample) if broken_as == "source" else (sample, broken)
    out = tmp_path / "x.h5"
    result = CliRunner().invoke(main, ["data", "json", str(source), "-o", str(out),
                                       "--ref-gaps", str(ref_gaps)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.splitlines()[-1].startswith(f"Error: {broken}: {reason}")
    assert not out.exists()


def test_a_lone_record_is_a_list_of_one(shared_data, records, tmp_path):
    lone = tmp_path / "lone.json"
    lone.write_text(json.dumps({**records[0], "optb88vdw_bandgap": 1.5}))
    labelled = from_json(lone)
    assert [s.id for s in labelled.structures] == [records[0]["jid"]]
    assert merge_ref_gaps(from_json(shared_data / SAMPLE), lone) == 1
