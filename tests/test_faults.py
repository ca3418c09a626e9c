"""Faults a long screening run must survive, each ending with every input accounted for exactly
once: killed workers, damaged or foreign shards, repeated ids, structures too big for memory,
and queries while a run writes. (A killed driver is in test_pipeline.py.)"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY, complete_ids, kill_group, ray_workers, screen_cmd

from screener.cli import main
from screener.io import discover, load
from screener.pipeline import RunOptions, build_graph_shard, chunks, run
from screener.results.hdf5 import SchemaError
from screener.results.manifest import MANIFEST, MANIFEST_VERSION, Manifest
from screener.results.query import query, read_failures, read_predictions
from screener.results.shards import KINDS, SCHEMA_VERSION, shard_info, shard_name

N_SMALL = 16


def copy_poscars(shared_data: Path, root: Path, n: int) -> list[str]:
    """The first n real POSCARs into root (made if missing); their file names."""
    root.mkdir(exist_ok=True)
    names = sorted(os.listdir(shared_data / "poscar"))[:n]
    for name in names:
        shutil.copy(shared_data / "poscar" / name, root / name)
    return names


@pytest.fixture(scope="module")
def small_folder(shared_data, tmp_path_factory) -> Path:
    """The first 16 real POSCARs: two chunks of 8."""
    root = tmp_path_factory.mktemp("small")
    copy_poscars(shared_data, root, N_SMALL)
    return root


def kill_worker(proc: subprocess.Popen, title: str) -> None:
    """SIGKILL the first worker of `proc`'s run seen running `title`."""
    while proc.poll() is None:
        for pid in ray_workers(proc.pid, title):
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.05)
    pytest.fail(f"the run ended before any worker ran {title}")


@pytest.mark.slow
def test_killed_graph_worker_and_prediction_actor_are_retried(shared_data, tiny_model, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(screen_cmd("--structures", str(shared_data / "poscar"), "--model",
                                       str(tiny_model), "-o", str(out), "--shard-size", "16",
                                       "--workers", "1"), start_new_session=True)
    try:
        kill_worker(proc, "ray::build_graph_shard")
        kill_worker(proc, "ray::Predictor.predict_shard")
        assert proc.wait(timeout=300) == 0
    finally:
        kill_group(proc)
    ids = complete_ids(out)
    assert len(ids) == len(set(ids)) == 201
    assert read_failures(out) == [], "a killed worker's chunk was given up, not retried"


@pytest.mark.slow
def test_queries_during_a_run_see_complete_shards_only(shared_data, tiny_model, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "growing"
    copy_poscars(shared_data, inputs, 120)
    proc = subprocess.Popen(screen_cmd("--structures", str(inputs), "--model", str(tiny_model),
                                       "-o", str(out), "--shard-size", "4", "--workers", "1"),
                            start_new_session=True)
    counts = []
    try:
        while proc.poll() is None:
            if (out / MANIFEST).exists():
                rows = query(out, sort=None, with_dos=True)
                assert len(rows["ids"]) == len(set(rows["ids"]))
                assert np.isfinite(rows["dos"]).all() and np.isfinite(rows["band_gap"]).all()
                counts.append(len(rows["ids"]))
            time.sleep(0.05)
    finally:
        kill_group(proc)
    assert proc.returncode == 0
    assert counts == sorted(counts), counts
    assert any(0 < c < 120 for c in counts), f"no query saw the run half done: {counts}"
    assert len(complete_ids(out)) == 120


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_shards_are_refused_on_read_and_remade_on_rerun(ray_local, small_folder,
                                                                tiny_model, tmp_path):
    out = tmp_path / "r"
    opts = RunOptions(str(small_folder), out, tiny_model, shard_size=8, workers=1)
    run(opts)
    before = read_predictions(out)
    graphs0 = Manifest.load(out).shards[shard_name("graphs", 0)]
    names = [shard_name("predictions", 0), shard_name("predictions", 1),
             shard_name("graphs", 1)]

    flip_byte(out / names[1])
    flip_byte(out / names[2])
    with pytest.raises(SchemaError, match=f"{names[1]}: sha256 differs"):
        read_predictions(out, verify=True)
    with (out / names[0]).open("r+b") as fh:
        fh.truncate((out / names[0]).stat().st_size // 2)
    with pytest.raises(SchemaError, match=f"{names[0]}: .* truncated"):
        read_predictions(out)

    again = run(opts)
    assert again.damaged == names and again.n_skipped_shards == 0
    assert Manifest.load(out).shards[shard_name("graphs", 0)] == graphs0
    after = read_predictions(out, verify=True)
    assert list(after["ids"]) == list(before["ids"])
    np.testing.assert_allclose(after["dos"], before["dos"], rtol=1e-6)
    assert sorted(complete_ids(out)) == sorted(before["ids"])


def test_shards_of_another_model_or_schema_are_refused(ray_local, small_folder, tiny_model,
                                                       tmp_path):
    import torch

    from screener.model import build_model, checkpoint_info, save_checkpoint

    torch.manual_seed(1)
    other_model = tmp_path / "other.pt"
    save_checkpoint(other_model, build_model("d-alignn", TINY), {"model_id": "other"})
    out, other = tmp_path / "r", tmp_path / "other"
    run(RunOptions(str(small_folder), out, tiny_model, shard_size=8, workers=1))
    run(RunOptions(str(small_folder), other, other_model, shard_size=8, workers=1))

    cli = ["run", "--structures", str(small_folder), "-o", str(out), "--shard-size", "8", "--quiet"]
    result = CliRunner().invoke(main, [*cli, "--model", str(other_model)])
    assert result.exit_code == 1
    assert "made by a run with other settings" in result.output and "model_hash" in result.output

    foreign, newer = shard_name("predictions", 0), shard_name("predictions", 1)
    shutil.copy(other / foreign, out / foreign)
    with h5py.File(out / newer, "r+") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(SchemaError, match=f"{newer}: schema version 2, this screener reads"):
        shard_info(out / newer)
    with pytest.raises(SchemaError, match=foreign):
        read_predictions(out, verify=True)
    again = run(RunOptions(str(small_folder), out, tiny_model, shard_size=8, workers=1))
    assert again.damaged == [foreign, newer]
    model_hash = checkpoint_info(tiny_model)["hash"]
    assert len(read_predictions(out, verify=True, model_hash=model_hash)["ids"]) == N_SMALL

    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "schema_version": 0}))
    for command in ([*cli, "--model", str(tiny_model)], ["query", str(out)]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 1
        assert f"schema version 0, this screener reads version {MANIFEST_VERSION}" in result.output


def test_model_is_a_shipped_name_a_file_or_a_run_folder(ray_local, small_folder, tiny_model,
                                                         tmp_path):
    from screener.model import checkpoint_info
    from screener.shipped import shipped_model

    run_folder = tmp_path / "train_run"
    run_folder.mkdir()
    shutil.copy(tiny_model, run_folder / "model.pt")
    ae = checkpoint_info(shipped_model("ae-alignn"))
    assert ae["arch"] == "ae-alignn"
    for i, (name, model_hash) in enumerate([("ae-alignn", ae["hash"]),
                                             (str(run_folder), checkpoint_info(tiny_model)["hash"])]):
        out = tmp_path / f"out{i}"
        result = CliRunner().invoke(main, ["run", "--structures", str(small_folder), "-o", str(out),
                                           "--quiet", "--workers", "1", "--model", name])
        assert result.exit_code == 0, result.output
        assert len(read_predictions(out, verify=True, model_hash=model_hash)["ids"]) == N_SMALL

    for command in ("run", "evaluate"):
        for bad in ("ae", str(tmp_path)):
            result = CliRunner().invoke(main, [command, "--model", bad])
            assert result.exit_code == 2
            assert (f"{bad!r} is neither a checkpoint file, a run folder holding model.pt, "
                    "nor a shipped model (d-alignn, ae-alignn)") in result.output


def test_repeated_ids_fail_naming_the_first_input(ray_local, shared_data, tiny_model, tmp_path):
    from jarvis.io.vasp.inputs import Poscar

    root, out = tmp_path / "repeats", tmp_path / "r"
    names = copy_poscars(shared_data, root, 5)
    atoms = Poscar.from_file(str(shared_data / "poscar" / names[0])).atoms
    first = names[0].removeprefix("POSCAR-")
    atoms.write_cif(str(root / f"{first}.cif"))  # sorts first: it is the one predicted
    shutil.copy(root / names[0], root / f"{first}.vasp")
    record = {"jid": names[1].removeprefix("POSCAR-"), "atoms": atoms.to_dict()}
    (root / "records.json").write_text(json.dumps([record, record]))

    summary = run(RunOptions(str(root), out, tiny_model, shard_size=2, workers=1))
    predicted = read_predictions(out, columns=["ids", "source"])
    assert sorted(predicted["ids"]) == sorted(n.removeprefix("POSCAR-") for n in names)
    assert str(root / f"{first}.cif") in set(predicted["source"])
    failures = {(f.source, f.reason) for f in read_failures(out)}
    assert failures == {
        (str(root / f"{first}.vasp"), f"duplicate id, also at {root / first}.cif"),
        (str(root / names[0]), f"duplicate id, also at {root / first}.cif"),
        (f"{root / 'records.json'}[0]", f"duplicate id, also at {root / names[1]}"),
        (f"{root / 'records.json'}[1]", f"duplicate id, also at {root / names[1]}"),
    }
    assert summary.n_read == 9 == len(complete_ids(out)) and summary.n_failed == 4
    assert run(RunOptions(str(root), out, tiny_model, shard_size=2, workers=1)).n_skipped_shards == 5


def test_structures_over_the_atom_limit_fail_alone(ray_local, small_folder, tiny_model, tmp_path):
    sizes = {s.id: load(s).n_atoms for s in discover(small_folder)}
    limit = sorted(sizes.values())[N_SMALL // 2]
    out = tmp_path / "r"
    summary = run(RunOptions(str(small_folder), out, tiny_model, shard_size=8, workers=1,
                             max_atoms=limit))
    failures = {f.id: f for f in read_failures(out)}
    assert set(failures) == {i for i, n in sizes.items() if n > limit} != set()
    for f in failures.values():
        assert (f.stage, f.reason) == (
            "validate", f"{sizes[f.id]} atoms, more than this run's limit of {limit} (max_atoms)")
    assert summary.n_predicted == N_SMALL - len(failures)
    assert sorted(complete_ids(out)) == sorted(sizes)


# Predicts one graph shard in a fresh process whose address space is then capped a few MiB
# above what it uses: a real allocation failure, as a worker short of memory meets it.
PREDICT_UNDER_LIMIT = """
import json, resource, sys
from screener.pipeline import Predictor
graphs, out, warm_graphs, warm_out, model, headroom = sys.argv[1:]
attrs = {"model_id": "tiny-test", "model_hash": "tiny"}
predictor = Predictor(model, "cpu", 1)
predictor.predict_shard(warm_graphs, warm_out, 64, attrs)  # lazy imports and pools, unlimited
size = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (size + int(headroom), resource.RLIM_INFINITY))
print(json.dumps(predictor.predict_shard(graphs, out, 64, attrs)))
"""


def test_a_structure_too_big_for_the_memory_left_fails_alone(shared_data, tiny_model, tmp_path):
    from jarvis.io.vasp.inputs import Poscar

    inputs, out, warm = tmp_path / "in", tmp_path / "r", tmp_path / "warm"
    names = copy_poscars(shared_data, inputs, 6)
    big = Poscar.from_file(str(inputs / names[0])).atoms.make_supercell([8, 8, 2])
    big.write_poscar(str(inputs / "POSCAR-big"))
    attrs = {"model_id": "tiny-test", "model_hash": "tiny"}
    manifest = Manifest.create(out, {})
    graphs, predictions = (shard_name(kind, 0) for kind in KINDS)
    manifest.add(graphs, build_graph_shard(next(chunks(discover(inputs), 8)), out / graphs, attrs))
    build_graph_shard(next(chunks(discover(inputs / names[0]), 1)), warm / graphs, attrs)

    args = [out / graphs, out / predictions, warm / graphs, warm / predictions, tiny_model,
            32 << 20]
    result = subprocess.run([sys.executable, "-c", PREDICT_UNDER_LIMIT, *map(str, args)],
                            check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    manifest.add(predictions, json.loads(result.stdout.splitlines()[-1]))
    (failure,) = read_failures(out)
    assert failure.id == "big" and failure.stage == "predict"
    assert failure.reason.startswith(f"prediction failed ({big.num_atoms} atoms): RuntimeError")
    assert "can't allocate memory" in failure.reason
    assert sorted(complete_ids(out)) == sorted(s.id for s in discover(inputs))


def test_a_garbage_manifest_is_rebuilt_and_only_the_rest_recomputed(ray_local, small_folder,
                                                                    tiny_model, tmp_path):
    out = tmp_path / "r"
    opts = RunOptions(str(small_folder), out, tiny_model, shard_size=8, workers=1)
    run(opts)
    before = read_predictions(out, columns=["ids", "band_gap"])
    damaged = out / shard_name("predictions", 1)
    flip_byte(damaged)
    (out / MANIFEST).write_bytes(b"\x00" * 100)
    result = CliRunner().invoke(main, ["query", str(out)])
    assert result.exit_code == 1 and "manifest.json: not valid JSON" in result.output

    again = run(opts)
    assert again.manifest_rebuilt_because.startswith(f"{out / MANIFEST}: not valid JSON")
    assert again.n_skipped_shards == 1 and again.n_read == N_SMALL
    after = read_predictions(out, columns=["ids", "band_gap"], verify=True)
    assert after["ids"].tolist() == before["ids"].tolist()
    np.testing.assert_array_equal(after["band_gap"], before["band_gap"])
    assert sorted(complete_ids(out)) == sorted(before["ids"])


@pytest.mark.parametrize("workers", [2, 4])
def test_more_workers_than_the_cluster_can_place_is_an_error_before_any_work(
        ray_local, small_folder, tiny_model, tmp_path, workers):
    out = tmp_path / "r"
    result = CliRunner().invoke(main, ["run", "--structures", str(small_folder), "--model",
                                       str(tiny_model), "-o", str(out), "--quiet",
                                       "--workers", str(workers)])
    assert result.exit_code == 1
    assert result.output == (f"Error: --workers {workers}: this Ray cluster can run 1 to 1 "
                             "prediction actors (2 CPU(s), of which prediction actors may take "
                             "half)\n")
    assert not list((out / "graphs").iterdir()) and not list((out / "predictions").iterdir())
