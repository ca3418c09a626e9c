"""HDF5 shards, manifest and queries on real files in tmp_path; real JARVIS spectra."""
import csv
import io
import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, repo_env

from screener.dos import ENERGY_GRID, band_gap, dos_at_ef
from screener.errors import ScreenerError
from screener.io import Failure, Structure, discover, load
from screener.io.files import file_sha256
from screener.results.hdf5 import SchemaError, attr, create_dataset, read_graphs, write_graphs
from screener.results.manifest import MANIFEST, Manifest, complete_shards, run_lock
from screener.results.query import UnknownColumn, query, read_failures, read_predictions
from screener.results.shards import (
    CONFIG_ATTR,
    PREDICTION_COLUMNS,
    SCHEMA_VERSION,
    ShardWriter,
    config_attr,
    elements_of,
    empty_prediction_table,
    ids_digest,
    read_graph_shard,
    shard_info,
    shard_name,
    write_graph_shard,
    write_prediction_shard,
)
from screener.results.tables import format_table, to_json, write_csv

K = 16
ATTRS = {"model_id": "test-model", "model_hash": "a" * 64}


def named(path: Path, pattern: str) -> str:
    """A regex for an error message that names `path` and then matches `pattern`."""
    return re.escape(str(path)) + pattern


def random_graph(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """A graph shaped by the screener.graphs contract, with random contents."""
    return {
        "numbers": rng.integers(1, 95, n).astype(np.int64),
        "neighbors": rng.integers(0, n, n * K).astype(np.int64),
        "edge_vec": rng.normal(size=(n * K, 3)).astype(np.float32),
        "angle_cos": rng.uniform(-1, 1, n * K * (K - 1)).astype(np.float32),
    }


def structure_for(graph: dict, i: int) -> Structure:
    n = len(graph["numbers"])
    return Structure(f"S-{i}", f"in.json[{i}]", 5 * np.eye(3), np.zeros((n, 3)), graph["numbers"])


def graph_chunk(seed: int = 0, n: int = 7):
    rng = np.random.default_rng(seed)
    graphs = [random_graph(rng, int(m)) for m in rng.integers(1, 12, n)]
    return [structure_for(g, i) for i, g in enumerate(graphs)], graphs


FAILURES = [Failure("bad-1", "dir/POSCAR-bad-1", "read", "line 3: expected 3 lattice numbers"),
            Failure("bad-2", "in.json[9]", "graph", "fewer than 16 neighbours within 8 A")]


def prediction_table(**columns) -> dict[str, np.ndarray]:
    """A full prediction table from a few given columns; dos row i is filled with i."""
    n = len(columns["ids"])
    table = {"source": [f"src-{i}" for i in columns["ids"]], "formula": ["X"] * n,
             "elements": ["X"] * n, "n_atoms": np.ones(n), "band_gap": np.zeros(n),
             "vbm": np.zeros(n), "cbm": np.zeros(n), "dos_at_ef": np.zeros(n),
             "dos": np.repeat(np.arange(n, dtype=np.float32)[:, None], len(ENERGY_GRID), 1)}
    return {**table, **columns}


def add_predictions(results: Path, index: int, table: dict, failures=()) -> Path:
    path = results / shard_name("predictions", index)
    info = write_prediction_shard(path, table, list(failures), ATTRS)
    Manifest.load(results).add(shard_name("predictions", index), info)
    return path


def test_graphs_round_trip_and_selection(tmp_path):
    _, graphs = graph_chunk(n=9)
    with h5py.File(tmp_path / "g.h5", "w") as f:
        write_graphs(f.create_group("graphs"), graphs)
    with h5py.File(tmp_path / "g.h5", "r") as f:
        back = read_graphs(f["graphs"])
        picked = read_graphs(f["graphs"], [5, 1, 5])
        assert read_graphs(f["graphs"], []) == []
    for want, got in zip(graphs + [graphs[5], graphs[1], graphs[5]], back + picked):
        assert set(got) == set(want)
        for key in want:
            assert got[key].dtype == want[key].dtype, key
            np.testing.assert_array_equal(got[key], want[key])


def test_write_graphs_refuses_graph_not_shaped_for_k(tmp_path):
    _, graphs = graph_chunk(n=3)
    graphs[2]["angle_cos"] = graphs[2]["angle_cos"][:-1]
    with h5py.File(tmp_path / "g.h5", "w") as f, pytest.raises(ValueError, match="graph 2"):
        write_graphs(f.create_group("graphs"), graphs)


def test_graph_shard_round_trip_with_attrs_and_record(tmp_path):
    structures, graphs = graph_chunk()
    path = tmp_path / shard_name("graphs", 3)
    info = write_graph_shard(path, structures, graphs, FAILURES, {**ATTRS, "k": K})

    table, back, failures = read_graph_shard(path, info, verify=True)
    assert list(table["ids"]) == [s.id for s in structures]
    assert list(table["source"]) == [s.source for s in structures]
    assert list(table["formula"]) == [s.formula for s in structures]
    assert list(table["elements"]) == [elements_of(s.formula) for s in structures]
    np.testing.assert_array_equal(table["n_atoms"], [s.n_atoms for s in structures])
    for want, got in zip(graphs, back):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    assert failures == FAILURES

    ids = [s.id for s in structures] + [f.id for f in FAILURES]
    assert info == {"kind": "graphs", "n": len(graphs), "n_failed": 2,
                    "ids_sha256": ids_digest(ids), "size": path.stat().st_size,
                    "sha256": file_sha256(path)}
    assert shard_info(path) == info
    with h5py.File(path, "r") as f:
        attrs = {key: attr(f, key) for key in f.attrs}
    assert attrs["schema_version"] == SCHEMA_VERSION and attrs["kind"] == "graphs"
    assert attrs["model_id"] == ATTRS["model_id"] and attrs["model_hash"] == ATTRS["model_hash"]
    assert attrs["k"] == K and attrs["screener_version"]
    assert datetime.fromisoformat(attrs["created"]).tzinfo is not None


def test_shard_of_a_chunk_where_everything_failed(tmp_path):
    path = tmp_path / shard_name("graphs", 0)
    info = write_graph_shard(path, [], [], FAILURES, ATTRS)
    table, graphs, failures = read_graph_shard(path)
    assert len(table["ids"]) == 0 and graphs == [] and failures == FAILURES
    assert (info["n"], info["n_failed"]) == (0, 2)

    Manifest.create(tmp_path, {})
    add_predictions(tmp_path, 0, empty_prediction_table(), FAILURES)
    rows = read_predictions(tmp_path)
    assert len(rows["ids"]) == 0 and rows["dos"].shape == (0, len(ENERGY_GRID))


def test_prediction_shards_round_trip_real_spectra(tmp_path, shared_data):
    """Real JARVIS structures and spectra in two shards come back in chunk order."""
    path = shared_data / "jarvis_edos_sample10.json"
    structures = [load(source) for source in discover(path)]
    dos = np.array([r["edos_up"] for r in json.loads(path.read_text())], dtype=np.float32)
    gap, vbm, cbm = band_gap(dos)
    table = {"ids": [s.id for s in structures], "source": [s.source for s in structures],
             "formula": [s.formula for s in structures],
             "elements": [elements_of(s.formula) for s in structures],
             "n_atoms": [s.n_atoms for s in structures], "band_gap": gap, "vbm": vbm, "cbm": cbm,
             "dos_at_ef": dos_at_ef(dos), "dos": dos}
    Manifest.create(tmp_path, {"model_hash": ATTRS["model_hash"]})
    for index, part in ((1, slice(6, None)), (0, slice(0, 6))):
        add_predictions(tmp_path, index, {k: np.asarray(v)[part] for k, v in table.items()})

    rows = read_predictions(tmp_path, verify=True, model_hash=ATTRS["model_hash"])
    assert list(rows) == list(PREDICTION_COLUMNS)
    for key, want in table.items():
        np.testing.assert_array_equal(rows[key], np.asarray(want, dtype=rows[key].dtype))
    assert rows["dos"].dtype == np.float32 and rows["n_atoms"].dtype == np.int32
    assert rows["ids"].dtype.kind == "U" and rows["elements"][0] == "Al As"
    subset = ["formula", "band_gap"]
    assert list(read_predictions(tmp_path, subset)) == subset
    with h5py.File(tmp_path / shard_name("predictions", 0), "r") as f:
        np.testing.assert_array_equal(f.attrs["energy_grid"], ENERGY_GRID)
        assert f["dos"].compression == "gzip" and f["dos"].chunks == (6, len(ENERGY_GRID))
    with pytest.raises(ValueError, match="unknown prediction columns"):
        read_predictions(tmp_path, ["gap"])


def test_prediction_shard_refuses_bad_tables(tmp_path):
    path = tmp_path / "p.h5"
    table = prediction_table(ids=["a", "b"])
    with pytest.raises(ValueError, match="differ from the schema"):
        write_prediction_shard(path, {**table, "extra": [1, 2]}, [], ATTRS)
    with pytest.raises(ValueError, match="different lengths"):
        write_prediction_shard(path, {**table, "band_gap": [1.0]}, [], ATTRS)
    with pytest.raises(ValueError, match="dos has shape"):
        write_prediction_shard(path, {**table, "dos": np.zeros((2, 3))}, [], ATTRS)
    with pytest.raises(ValueError, match="model_hash"):
        write_prediction_shard(path, table, [], {"model_id": "m"})
    assert list(tmp_path.iterdir()) == []


def test_reader_sees_only_complete_listed_shards_while_a_run_writes(tmp_path):
    Manifest.create(tmp_path, {"input": "x"})
    add_predictions(tmp_path, 0, prediction_table(ids=["a", "b"]))
    write_prediction_shard(tmp_path / shard_name("predictions", 1),
                           prediction_table(ids=["unlisted"]), [], ATTRS)
    (tmp_path / (shard_name("predictions", 2) + ".tmp")).write_bytes(b"half a shard")
    with ShardWriter(tmp_path / shard_name("predictions", 3), "predictions", ATTRS) as f:
        f.create_dataset("ids", data=["being written"])
        f.create_dataset("failures/ids", data=[""], dtype=h5py.string_dtype())
        assert list(read_predictions(tmp_path)["ids"]) == ["a", "b"]
    assert (tmp_path / shard_name("predictions", 3)).exists()
    assert list(read_predictions(tmp_path)["ids"]) == ["a", "b"]
    assert list(query(tmp_path)["ids"]) == ["a", "b"]

    on_disk = Manifest.load(tmp_path)
    assert on_disk.config == {"input": "x"}
    assert list(on_disk.shards) == [shard_name("predictions", 0)]
    assert not (tmp_path / "manifest.json.tmp").exists()


def record(i: int) -> dict:
    return {"kind": "graphs", "n": i, "n_failed": 0, "ids_sha256": str(i), "size": 1, "sha256": "x"}


def test_manifest_bookkeeping_stays_linear_and_survives_a_torn_line(tmp_path):
    manifest = Manifest.create(tmp_path, {"input": "x"})
    for i in range(2000):
        manifest.add(shard_name("graphs", i), record(i))
    manifest.discard(shard_name("graphs", 7))
    # snapshots double in size between rewrites: a handful for 2,000 shards, not 2,000
    assert manifest.generation <= 8
    assert Manifest.load(tmp_path).shards == manifest.shards
    assert len(list(tmp_path.glob("manifest.*.jsonl"))) == 1

    journal = next(tmp_path.glob("manifest.*.jsonl"))
    with open(journal, "ab") as f:
        f.write(b'{"add": "graphs/graphs-99999.h5", "inf')
    assert Manifest.load(tmp_path).shards == manifest.shards
    resumed = Manifest.open(tmp_path, {"input": "x"})
    resumed.add(shard_name("graphs", 5000), record(5000))
    assert Manifest.load(tmp_path).shards == {**manifest.shards,
                                              shard_name("graphs", 5000): record(5000)}


def test_damaged_journal_line_is_a_schema_error(tmp_path):
    manifest = Manifest.create(tmp_path, {"input": "x"})
    manifest.add(shard_name("graphs", 0), record(0))
    journal = next(tmp_path.glob("manifest.*.jsonl"))
    journal.write_bytes(b"not json\n" + journal.read_bytes())
    with pytest.raises(SchemaError, match="damaged line"):
        Manifest.load(tmp_path)


def test_manifest_orders_chunks_and_resumes_with_the_same_config(tmp_path):
    config = {"model_hash": ATTRS["model_hash"], "input": "/data", "bandgap": (1.4, 1.6)}
    manifest = Manifest.open(tmp_path, config)
    path = tmp_path / shard_name("graphs", 0)
    info = write_graph_shard(path, *graph_chunk(n=2), FAILURES, ATTRS)
    for index in (100000, 99999, 0):
        manifest.add(shard_name("graphs", index), info)
    manifest.add(shard_name("predictions", 5), {**info, "kind": "predictions", "seconds": 1.5})
    assert manifest.complete("graphs") == [shard_name("graphs", i) for i in (0, 99999, 100000)]

    resumed = Manifest.open(tmp_path, config)
    assert resumed.shards == manifest.shards and resumed.config == {**config, "bandgap": [1.4, 1.6]}
    assert resumed.shards[shard_name("predictions", 5)]["seconds"] == 1.5
    assert resumed.has(shard_name("graphs", 0), info["ids_sha256"])
    assert not resumed.has(shard_name("graphs", 0), ids_digest(["other"]))
    assert not resumed.has(shard_name("graphs", 1))
    with pytest.raises(SchemaError, match=r"manifest\.json.*model_hash"):
        Manifest.open(tmp_path, {**config, "model_hash": "b" * 64})
    with pytest.raises(ValueError, match="lacks"):
        manifest.add(shard_name("graphs", 1), {"kind": "graphs", "n": 3})
    with pytest.raises(SchemaError, match="not a results directory"):
        Manifest.load(tmp_path / "elsewhere")


def test_writer_that_raises_leaves_no_file(tmp_path):
    path = tmp_path / shard_name("graphs", 0)
    with pytest.raises(RuntimeError, match="worker died"), ShardWriter(path, "graphs", ATTRS) as f:
        f.create_dataset("ids", data=["a"])
        assert path.with_name(path.name + ".tmp").exists()
        raise RuntimeError("worker died")
    assert list(path.parent.iterdir()) == []
    with pytest.raises(SchemaError, match="incomplete shard"), ShardWriter(path, "graphs", ATTRS):
        pass
    assert list(path.parent.iterdir()) == []


def test_killed_writer_leaves_only_a_tmp_file_readers_ignore(tmp_path):
    Manifest.create(tmp_path, {})
    path = tmp_path / shard_name("predictions", 0)
    script = ("import os, signal, sys\nfrom screener.results.shards import ShardWriter\n"
              "with ShardWriter(sys.argv[1], 'predictions', {'model_id': 'm', 'model_hash': 'h'})"
              " as f:\n    f.create_dataset('ids', data=['a'])\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", script, str(path)], check=False, cwd=REPO,
                          env=repo_env())
    assert done.returncode == -9
    assert not path.exists() and path.with_name(path.name + ".tmp").exists()
    assert len(read_predictions(tmp_path)["ids"]) == 0


def test_truncated_shard_is_refused_naming_its_path(tmp_path):
    Manifest.create(tmp_path, {})
    path = add_predictions(tmp_path, 0, prediction_table(ids=["a", "b"]))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SchemaError, match=named(path, r".*truncated")):
        read_predictions(tmp_path)

    graph_path = tmp_path / "g.h5"
    write_graph_shard(graph_path, *graph_chunk(), [], ATTRS)
    graph_path.write_bytes(graph_path.read_bytes()[:4000])
    with pytest.raises(SchemaError, match=named(graph_path, r": unreadable HDF5.*truncated")):
        read_graph_shard(graph_path)


def test_flipped_bytes_are_found_by_verify(tmp_path):
    Manifest.create(tmp_path, {})
    path = add_predictions(tmp_path, 0, prediction_table(ids=["a", "b"]))
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))
    with pytest.raises(SchemaError, match=named(path, r": sha256 differs")):
        read_predictions(tmp_path, verify=True)
    with pytest.raises(SchemaError, match=named(path, r": sha256 differs")):
        query(tmp_path, verify=True)


def test_foreign_files_and_other_versions_are_refused(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.create_dataset("ids", data=["x"])
    with pytest.raises(SchemaError, match=named(foreign, r": .*not a dos-screener shard")):
        read_graph_shard(foreign)

    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(SchemaError, match=named(text, r": not an HDF5 file")):
        read_graph_shard(text)
    with pytest.raises(SchemaError, match="no such shard file"):
        read_graph_shard(tmp_path / "missing.h5")

    path = tmp_path / "g.h5"
    write_graph_shard(path, *graph_chunk(n=2), [], ATTRS)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 2
    with pytest.raises(SchemaError, match=named(path, r": schema version 2, .* reads version 1")):
        read_graph_shard(path)


def test_wrong_kind_and_wrong_model_are_refused(tmp_path):
    Manifest.create(tmp_path, {})
    path = add_predictions(tmp_path, 0, prediction_table(ids=["a"]))
    with pytest.raises(SchemaError, match=named(path, r": a 'predictions' shard where a 'graphs'")):
        read_graph_shard(path)
    wrong_model = ": written by model hash 'a+', expected 'b'"
    with pytest.raises(SchemaError, match=named(path, wrong_model)):
        read_predictions(tmp_path, model_hash="b")
    path.unlink()
    with pytest.raises(SchemaError, match=named(path, r": no such shard file")):
        read_predictions(tmp_path)


def test_read_failures_from_graph_and_prediction_shards(tmp_path):
    manifest = Manifest.create(tmp_path, {})
    structures, graphs = graph_chunk(n=2)
    info = write_graph_shard(tmp_path / shard_name("graphs", 0), structures, graphs,
                             FAILURES, ATTRS)
    manifest.add(shard_name("graphs", 0), info)
    predict = Failure("S-1", "in.json[1]", "predict", "out of memory on 11 atoms")
    add_predictions(tmp_path, 0, prediction_table(ids=["S-0"]), FAILURES + [predict])
    write_graph_shard(tmp_path / shard_name("graphs", 1), [], [],
                      [Failure("unlisted", "-", "read", "-")], ATTRS)
    assert read_failures(tmp_path, verify=True) == FAILURES + [predict]


# Hand-made table; the expected rows of each query below are worked out from it by hand.
QUERY_TABLE = {
    "ids": ["A", "B", "C", "D", "E", "F"],
    "formula": ["Al2O3", "GaAs", "ZnO", "Cu", "TiO2", "Al"],
    "elements": ["Al O", "As Ga", "O Zn", "Cu", "O Ti", "Al"],
    "n_atoms": [10, 2, 4, 1, 6, 1],
    "band_gap": [1.5, 1.4, 3.3, 0.0, 1.6, 0.0],
    "dos_at_ef": [0.0, 0.0, 0.0, 0.8, 0.01, 0.5],
}


@pytest.fixture
def results(tmp_path) -> Path:
    """QUERY_TABLE as rows A-C in chunk 0 and D-F in chunk 1; dos rows filled with 10 * row."""
    Manifest.create(tmp_path, {})
    for index, part in ((0, slice(0, 3)), (1, slice(3, 6))):
        columns = {key: np.asarray(col)[part] for key, col in QUERY_TABLE.items()}
        table = prediction_table(**columns)
        table["dos"] = table["dos"] * 10 + 10 * part.start
        add_predictions(tmp_path, index, table)
    return tmp_path


@pytest.mark.parametrize("criteria, expected", [
    ({}, "DFBAEC"),
    ({"bandgap": (1.4, 1.6)}, "ABE"),  # by P(in window), here 1 for each: stored order
    ({"bandgap": (1.4, 1.6), "sort": "band_gap"}, "BAE"),
    ({"bandgap": (1.4, 1.6), "sort": "-band_gap_eV"}, "EAB"),
    ({"bandgap": (1.5, None)}, "ACE"),
    ({"elements": ["O"]}, "AEC"),
    ({"elements": ("Al", "O")}, "A"),
    ({"elements": "Al O"}, "A"),
    ({"elements": ["S"]}, ""),
    ({"exclude": ["O"]}, "DFB"),
    ({"elements": ["Al"], "exclude": ["O"]}, "F"),
    ({"formula": "GaAs"}, "B"),
    ({"formula": "Ga"}, ""),
    ({"dos_at_ef": (0.4, None)}, "DF"),
    ({"dos_at_ef": (0.01, 0.5)}, "FE"),
    ({"n_atoms": (2, 6)}, "BEC"),
    ({"n_atoms": (5, float("inf"))}, "AE"),
    ({"n_atoms": (1.5, 4.5)}, "BC"),
    ({"bandgap": (1, 2), "elements": ["O"], "n_atoms": (None, 8)}, "E"),
    ({"sort": "-band_gap"}, "CEABDF"),
    ({"sort": "formula"}, "FADBEC"),
    ({"sort": "-n_atoms", "limit": 3}, "AEC"),
    ({"sort": None}, "ABCDEF"),
    ({"limit": 2}, "DF"),
])
def test_query_filters(results, criteria, expected):
    rows = query(results, **criteria)
    assert "".join(rows["ids"]) == expected
    assert "dos" not in rows and len(rows["band_gap"]) == len(expected)


def test_query_reads_dos_rows_of_the_hits_only_when_asked(results):
    rows = query(results, bandgap=(1.4, 1.6), with_dos=True, sort="band_gap")
    assert "".join(rows["ids"]) == "BAE"
    np.testing.assert_array_equal(rows["dos"][:, 0], [10, 0, 40])
    assert rows["dos"].shape == (3, len(ENERGY_GRID))
    assert query(results, formula="none", with_dos=True)["dos"].shape == (0, 300)
    with pytest.raises(ValueError, match="cannot sort by 'gap'"):
        query(results, sort="gap")


def test_output_helpers(tmp_path):
    rows = {"ids": np.array(["a", "bbb"]), "band_gap": np.array([1.3, np.nan], np.float32),
            "n_atoms": np.array([2, 12], np.int32), "dos": np.array([[0.5, 1], [2, 3]], np.float32)}
    assert format_table(rows) == ("ids  band_gap  n_atoms\n"
                                        "---  --------  -------\n"
                                        "a         1.3        2\n"
                                        "bbb       nan       12")
    stream = io.StringIO()
    write_csv(rows, stream)
    assert list(csv.reader(io.StringIO(stream.getvalue()))) == [
        ["ids", "band_gap", "n_atoms", "dos_0", "dos_1"], ["a", "1.3", "2", "0.5", "1.0"],
        ["bbb", "", "12", "2.0", "3.0"]]
    write_csv(rows, tmp_path / "rows.csv")
    assert (tmp_path / "rows.csv").read_bytes().decode() == stream.getvalue()
    assert json.loads(to_json(rows)) == [
        {"ids": "a", "band_gap": 1.3, "n_atoms": 2, "dos": [0.5, 1.0]},
        {"ids": "bbb", "band_gap": None, "n_atoms": 12, "dos": [2.0, 3.0]}]


def datasets(f: h5py.File) -> dict[str, h5py.Dataset]:
    found = {}
    f.visititems(lambda name, obj: found.update({name: obj} if hasattr(obj, "dtype") else {}))
    return found


def test_files_match_the_documented_layout(tmp_path):
    """schemas/shards.json describes exactly the datasets and attributes the writers produce."""
    layout = json.loads((REPO / "schemas" / "shards.json").read_text())
    assert layout["schema_version"] == SCHEMA_VERSION
    structures, graphs = graph_chunk(n=3)
    paths = {"graphs": tmp_path / "g.h5", "predictions": tmp_path / "p.h5"}
    write_graph_shard(paths["graphs"], structures, graphs, FAILURES, ATTRS)
    write_prediction_shard(paths["predictions"], prediction_table(ids=["a", "b"]),
                           FAILURES, ATTRS)
    for kind, path in paths.items():
        documented = layout["shards"][kind]["datasets"]
        with h5py.File(path, "r") as f:
            found = datasets(f)
            assert set(found) == set(documented), kind
            for name, spec in documented.items():
                ds = found[name]
                if spec["dtype"] == "str":
                    assert h5py.check_string_dtype(ds.dtype) is not None, name
                else:
                    assert ds.dtype == np.dtype(spec["dtype"]), name
                assert ds.ndim == len(spec["shape"]), name
                assert ds.compression == spec.get("compression"), name
                assert ds.fletcher32 == (ds.size > 0), name
            wanted = {key for key, spec in layout["attrs"].items() if isinstance(spec, dict)
                      and kind in spec.get("kinds", [kind]) and not spec.get("optional")}
            assert wanted <= set(f.attrs), kind


def test_query_sorts_by_any_column_the_shards_hold(tmp_path):
    """A newer model's extra column (a learned gap, say) is a column like the others."""
    Manifest.create(tmp_path, {})
    table = {name: np.asarray(col) for name, col in prediction_table(ids=["a", "b", "c"]).items()}
    table["learned_gap"] = np.array([0.5, 2.0, 1.0], dtype=np.float32)
    path = tmp_path / shard_name("predictions", 0)
    with ShardWriter(path, "predictions", ATTRS) as f:
        for name, column in table.items():
            create_dataset(f, name, column, {})
        create_dataset(f.create_group("failures"), "ids", np.array([], dtype=str), {})
    Manifest.load(tmp_path).add(shard_name("predictions", 0), shard_info(path))
    rows = query(tmp_path, sort="-learned_gap")
    assert list(rows["ids"]) == ["b", "c", "a"] and list(rows)[-1] == "learned_gap"
    with pytest.raises(UnknownColumn, match="cannot sort by 'nonexistent'; columns: ids, "
                                                  ".*, learned_gap$"):
        query(tmp_path, sort="nonexistent")


def flip(path: Path, offset: int, mask: int = 0x01, length: int = 1) -> bytes:
    """Flip bits of `length` bytes at `offset`; returns the file's bytes before."""
    data = path.read_bytes()
    damaged = bytearray(data)
    for i in range(offset, offset + length):
        damaged[i] ^= mask
    path.write_bytes(bytes(damaged))
    return data


def everything(results: Path) -> tuple:
    """All a reader can get from a results dir: every column, failure and attribute."""
    ((path, _),) = complete_shards(results, "predictions")
    table = read_predictions(results, model_hash=ATTRS["model_hash"])
    with h5py.File(path, "r") as f:
        attrs = {key: np.asarray(value).tolist() for key, value in f.attrs.items()}
    return ({k: v.tolist() for k, v in table.items()}, read_failures(results), attrs)


FLIPS = 700


def test_any_flipped_byte_is_an_error_naming_the_file_or_changes_nothing(tmp_path, shared_data):
    """Without verify=True: checksums on every dataset, the metadata and the attributes. Bytes
    spread over the whole file are flipped one at a time, plus the two the issue found: a byte
    of an id string and 16 bytes of the dos data."""
    Manifest.create(tmp_path, {})
    rng = np.random.default_rng(0)
    ids = [f"JVASP-{50780 + i}" for i in range(12)]
    table = prediction_table(ids=ids, band_gap=rng.uniform(0, 3, 12),
                             dos=rng.uniform(0, 1, (12, len(ENERGY_GRID))).astype(np.float32))
    path = add_predictions(tmp_path, 0, table, [Failure("JVASP-50791", "x", "read", "why")])
    before = everything(tmp_path)
    size = path.stat().st_size
    id_byte = path.read_bytes().index(b"JVASP-50791") + 10
    dos_bytes = size // 2
    outcomes = {"error": 0, "unchanged": 0}
    for offset in [id_byte, *np.linspace(0, size - 1, FLIPS, dtype=int)]:
        data = flip(path, offset, mask=0x08)  # '1' -> '9' at the id byte
        try:
            after = everything(tmp_path)
        except SchemaError as error:
            assert str(error).startswith(str(path)), error
            outcomes["error"] += 1
        else:
            assert offset != id_byte, "the id's flipped byte was read as JVASP-50799"
            assert repr(after) == repr(before), f"byte {offset} changed what was read"
            outcomes["unchanged"] += 1
        path.write_bytes(data)
    flip(path, dos_bytes, mask=0xFF, length=16)
    with pytest.raises(SchemaError, match=named(path, ": damaged")):
        query(tmp_path, with_dos=True)
    assert outcomes["error"] > FLIPS / 2, outcomes


def legacy_copy(source: Path, target: Path) -> None:
    """`source` as the writers made shards before checksums: variable-length strings (string
    attributes too), no filters but gzip, the earliest HDF5 format."""
    with h5py.File(source, "r") as old, h5py.File(target, "w") as new:
        for key in old.attrs:
            new.attrs[key] = attr(old, key)

        def copy(name, obj):
            if isinstance(obj, h5py.Dataset):
                if h5py.check_string_dtype(obj.dtype) is not None:
                    new.create_dataset(name, data=obj.asstr()[()].astype(object),
                                       dtype=h5py.string_dtype())
                else:
                    new.create_dataset(name, data=obj[()], compression=obj.compression)
        old.visititems(copy)


def test_shards_written_before_checksums_still_read(tmp_path):
    Manifest.create(tmp_path, {})
    path = add_predictions(tmp_path, 0, prediction_table(ids=["a", "b"]), FAILURES)
    before = everything(tmp_path)
    legacy_copy(path, tmp_path / "legacy.h5")
    with h5py.File(tmp_path / "legacy.h5", "r") as f:
        assert not f["band_gap"].fletcher32 and h5py.check_string_dtype(f["ids"].dtype).length is None
    (tmp_path / "legacy.h5").replace(path)
    Manifest.load(tmp_path).add(shard_name("predictions", 0), shard_info(path))
    after = everything(tmp_path)
    assert after[:2] == before[:2]
    assert list(query(tmp_path, sort="ids")["ids"]) == ["a", "b"]


def run_config(index: int) -> dict:
    return {"input": "/data", "model_hash": ATTRS["model_hash"], "shard_size": index}


def written_with(results: Path, index: int, config: dict) -> dict:
    attrs = {**ATTRS, CONFIG_ATTR: config_attr(config)}
    path = results / shard_name("predictions", index)
    failure = Failure(f"failed-in-chunk-{index}", "x", "read", "why")
    return write_prediction_shard(path, prediction_table(ids=[f"s{index}"]), [failure], attrs)


@pytest.mark.parametrize("damage", [b"\x00garbage{", b'{"schema_version": 2}', b"[]",
                                    (b'{"schema_version": 2, "config": {}, "generation": 1, '
                                     b'"shards": {"graphs/graphs-00000.h5": {"kind": "graphs"}}}'),
                                    "journal"])
def test_a_damaged_manifest_is_rebuilt_from_the_intact_shards(tmp_path, damage):
    config = run_config(2)
    manifest = Manifest.open(tmp_path, config)
    infos = {i: written_with(tmp_path, i, config) for i in range(3)}
    for i, info in infos.items():
        manifest.add(shard_name("predictions", i), info)
    written_with(tmp_path, 3, run_config(5))  # a shard of another run's settings
    damaged = tmp_path / shard_name("predictions", 1)
    flip(damaged, damaged.read_bytes().index(b"failed-in-chunk-1"))
    if damage == "journal":
        next(tmp_path.glob("manifest.*.jsonl")).write_bytes(b"\x00\x01 torn\n")
    else:
        (tmp_path / MANIFEST).write_bytes(damage)
    with pytest.raises(SchemaError):
        query(tmp_path)

    rebuilt = Manifest.open(tmp_path, config)
    assert rebuilt.rebuilt_because and "damaged" in rebuilt.rebuilt_because
    assert rebuilt.shards == {shard_name("predictions", i): infos[i] for i in (0, 2)}
    assert Manifest.load(tmp_path).shards == rebuilt.shards
    assert [p.name for p in tmp_path.glob("manifest.*.jsonl")] == [f"manifest.{rebuilt.generation}.jsonl"]
    assert list(query(tmp_path, sort="ids")["ids"]) == ["s0", "s2"]
    assert [f.id for f in read_failures(tmp_path)] == ["failed-in-chunk-0", "failed-in-chunk-2"]


def test_a_manifest_of_another_version_is_refused_not_rebuilt(tmp_path):
    Manifest.open(tmp_path, run_config(1))
    (tmp_path / MANIFEST).write_text(json.dumps({"schema_version": 3}))
    with pytest.raises(SchemaError, match="schema version 3, this screener reads version 2"):
        Manifest.open(tmp_path, run_config(1))


HOLD_LOCK = """
import sys, time
from screener.results.shards import CONFIG_ATTR, PREDICTION_COLUMNS, SCHEMA_VERSION, config_attr, elements_of, empty_prediction_table, ids_digest, read_graph_shard, shard_info, write_graph_shard, write_prediction_shard
from screener.results.manifest import MANIFEST, complete_shards, run_lock
from screener.errors import ScreenerError
from screener.results.query import UnknownColumn, query, read_failures, read_predictions
from screener.results.hdf5 import attr, create_dataset, read_graphs, write_graphs
from screener.io.files import file_sha256
from screener.results.tables import format_table, to_json, write_csv
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_one_run_at_a_time_and_a_dead_runs_lock_is_taken_over(tmp_path):
    Manifest.create(tmp_path, {})
    add_predictions(tmp_path, 0, prediction_table(ids=["a"]))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True, env=repo_env())
    try:
        assert holder.stdout.readline() == "held\n"
        refused = f"^{re.escape(str(tmp_path))}: another `screen run` is writing here"
        with pytest.raises(ScreenerError, match=refused), run_lock(tmp_path):
            pass
        assert list(query(tmp_path)["ids"]) == ["a"]  # readers take no lock
    finally:
        holder.kill()
        holder.wait()
    with run_lock(tmp_path):
        pass
