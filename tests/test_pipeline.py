"""The screening job end to end on real structures: complete, exactly-once, resumable, robust."""
import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import all_ids, complete_ids, kill_group, screen_cmd

from screener.cli import main
from screener.io import discover
from screener.model import CheckpointError
from screener.pipeline import RunOptions, run
from screener.results.manifest import MANIFEST, Manifest
from screener.results.query import read_failures, read_predictions


def test_poscar_folder_completes_exactly_once(ray_local, shared_data, tiny_model, tmp_path):
    out = tmp_path / "r1"
    summary = run(RunOptions(str(shared_data / "poscar"), out, tiny_model, shard_size=64, workers=1))
    ids = all_ids(out)
    assert summary.n_read == 201 == len(ids) == len(set(ids))
    assert {f"JVASP-{p.name.split('-')[-1]}" for p in (shared_data / "poscar").iterdir()} == set(ids)
    preds = read_predictions(out)
    assert preds["dos"].shape == (summary.n_predicted, 300)
    assert np.all(preds["dos"] >= 0) and np.all(np.isfinite(preds["band_gap"]))
    again = run(RunOptions(str(shared_data / "poscar"), out, tiny_model, shard_size=64, workers=1))
    assert again.n_skipped_shards == 4 and sorted(all_ids(out)) == sorted(ids)


def test_unreadable_model_fails_naming_it_and_writes_no_results(ray_local, shared_data, tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(bad)):
        run(RunOptions(str(shared_data / "poscar"), tmp_path / "r", bad))
    assert not (tmp_path / "r" / MANIFEST).exists()


def broken_folder(shared_data: Path, root: Path) -> dict[str, str]:
    """Good POSCARs beside broken files; returns broken id -> expected words in the reason."""
    root.mkdir()
    for name in sorted(os.listdir(shared_data / "poscar"))[:6]:
        shutil.copy(shared_data / "poscar" / name, root / name)
    good = (shared_data / "poscar" / min(os.listdir(shared_data / "poscar"))).read_text()
    (root / "empty.vasp").write_text("")
    (root / "junk.vasp").write_bytes(bytes(range(256)) * 8)
    (root / "truncated.vasp").write_text("\n".join(good.splitlines()[:7]))
    (root / "overlap.vasp").write_text(
        "overlap\n1.0\n4 0 0\n0 4 0\n0 0 4\nSi\n2\nCartesian\n0 0 0\n0.1 0 0\n"
    )
    (root / "partial.cif").write_text(
        "data_partial\n_cell_length_a 4\n_cell_length_b 4\n_cell_length_c 4\n"
        "_cell_angle_alpha 90\n_cell_angle_beta 90\n_cell_angle_gamma 90\n"
        "_symmetry_space_group_name_H-M 'P 1'\nloop_\n_symmetry_equiv_pos_as_xyz\n'x, y, z'\n"
        "loop_\n_atom_site_label\n_atom_site_type_symbol\n_atom_site_fract_x\n_atom_site_fract_y\n"
        "_atom_site_fract_z\n_atom_site_occupancy\nFe1 Fe 0 0 0 0.5\nO1 O 0.5 0.5 0.5 1.0\n"
    )
    os.mkfifo(root / "POSCAR-fifo")
    os.symlink(root / "POSCAR-self", root / "POSCAR-self")
    os.symlink(root / "b.vasp", root / "a.vasp")
    os.symlink(root / "a.vasp", root / "b.vasp")
    return {"empty": "empty", "junk": "binary", "truncated": "", "overlap": "0.5", "partial": "occupan",
            "fifo": "a fifo", "self": "symbolic links", "a": "symbolic links", "b": "symbolic links"}


def test_broken_files_become_failures_and_good_ones_survive(ray_local, shared_data, tiny_model, tmp_path):
    expected = broken_folder(shared_data, tmp_path / "mixed")
    out = tmp_path / "r"
    summary = run(RunOptions(str(tmp_path / "mixed"), out, tiny_model, shard_size=4, workers=1))
    failures = {f.id: f for f in read_failures(out)}
    assert set(failures) == set(expected)
    for fid, words in expected.items():
        assert words in failures[fid].reason.lower(), failures[fid]
        assert failures[fid].source.endswith(Path(failures[fid].source).name)
    assert summary.n_predicted == 6 and summary.n_failed == 9
    assert sorted(complete_ids(out)) == sorted([*expected, *(s.id for s in discover(tmp_path / "mixed")
                                                             if s.id not in expected)])
    result = CliRunner().invoke(main, ["run", "--structures", str(tmp_path / "mixed"), "--model",
                                       str(tiny_model), "-o", str(out), "--shard-size", "4", "--strict", "--quiet"])
    assert result.exit_code != 0 and "9 structures failed" in result.output


@pytest.mark.slow
def test_killed_driver_resumes_with_every_id_once(shared_data, tiny_model, tmp_path):
    out = tmp_path / "killed"
    args = screen_cmd("--structures", str(shared_data / "poscar"), "--model", str(tiny_model),
                      "-o", str(out), "--shard-size", "16", "--workers", "1", "--bandgap", "1.4:1.6")
    proc = subprocess.Popen(args, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / MANIFEST).exists() and Manifest.load(out).complete("predictions"):
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the local Ray this driver started, and nothing else
    done_before = len(Manifest.load(out).shards)
    assert 0 < done_before
    subprocess.run(args, check=True, timeout=600)
    ids = complete_ids(out)
    assert len(ids) == len(set(ids)) == 201
    assert (out / "shortlist.csv").exists()


def test_query_and_plot_commands(ray_local, shared_data, tiny_model, tmp_path):
    out = tmp_path / "q"
    run(RunOptions(str(shared_data / "poscar"), out, tiny_model, shard_size=128, workers=1))
    runner = CliRunner()
    csv = runner.invoke(main, ["query", str(out), "--bandgap", "0:100", "--elements", "O", "--format", "csv"])
    assert csv.exit_code == 0, csv.output
    lines = csv.output.strip().splitlines()
    preds = read_predictions(out, columns=["ids", "elements"])
    assert len(lines) - 1 == sum("O" in e.split() for e in preds["elements"])
    first = str(preds["ids"][0])
    png = tmp_path / "dos.png"
    result = runner.invoke(main, ["plot", str(out), first, "-o", str(png)])
    assert result.exit_code == 0, result.output
    assert png.stat().st_size > 5000


@pytest.mark.slow
def test_a_killed_drivers_ray_processes_do_not_outlive_it(shared_data, tiny_model, tmp_path):
    """Only the driver is killed (kill -9), as a user would; `ps` then finds none of the
    processes below it, the Ray agents included, a few seconds later."""
    out = tmp_path / "killed"
    proc = subprocess.Popen(screen_cmd("--structures", str(shared_data / "poscar"), "--model",
                                       str(tiny_model), "-o", str(out), "--shard-size", "16",
                                       "--workers", "1"), start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list((out / "predictions").glob("*.h5")):
            time.sleep(0.5)
        below = below_in_ps(proc.pid)
        assert any(b"ray::DashboardAgent" in cmd or b"ray::RuntimeEnvAgent" in cmd
                   for cmd in below.values()), below
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 30
        while time.time() < deadline and set(below) & set(ps()):
            time.sleep(0.5)
        assert not set(below) & set(ps()), {pid: below[pid] for pid in set(below) & set(ps())}
    finally:
        kill_group(proc)


def ps() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, command) of every process, as `ps` lists them."""
    lines = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,args="], capture_output=True,
                           check=True).stdout.splitlines()
    rows = [(line.split(None, 2) + [b""])[:3] for line in lines]
    return {int(pid): (int(ppid), cmd) for pid, ppid, cmd in rows}


def below_in_ps(root: int) -> dict[int, bytes]:
    """Command of every process below `root`."""
    table = ps()
    found, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, cmd) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = cmd
                todo.append(pid)
    return found
