"""Training on the 10 real JARVIS eDOS records: steps, checkpoints, DDP on Ray, kill + resume."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import GPAW_LABELS, TINY, ray_workers, repo_env

from screener.cli import main
from screener.model import build_model, load_checkpoint
from screener.training import train as training
from screener.training.config import TrainConfig
from screener.training.dataset import from_json, read_training_set, write_training_set
from screener.training.parts import load_parts, shard
from screener.training.task import fit_autoencoder, make_task, target_scale


@pytest.fixture(scope="module")
def data_path(shared_data, tmp_path_factory) -> Path:
    sample = from_json(shared_data / "jarvis_edos_sample10.json")
    path = tmp_path_factory.mktemp("data") / "sample10.h5"
    write_training_set(path, sample.structures, sample.dos, sample.ref_gap, sample.provenance)
    return path


def settings_for(data_path: Path, **changes) -> TrainConfig:
    return TrainConfig(**{
        "data": str(data_path), "data_hash": "test", "arch": "d-alignn", "latent": None,
        "config": TINY, "batch_size": 4, "lr": 1e-2, "epochs": 20, "patience": 20, "loss": "mse",
        "amp": False, "workers": 1, "seed": 0, "ae_epochs": 40, "hold_out": [], **changes})


def local_run(settings: TrainConfig):
    """What one worker holds, built without Ray: model, parts, optimizer, scheduler."""
    torch.manual_seed(settings.seed)
    task = make_task(settings)
    train_part, val_part = load_parts(settings.data, 0, 1, task.targets_of)
    steps = -(-len(train_part.rows) // settings.batch_size)
    optimizer, scheduler = training.optimizers(task.trainable, settings, steps)
    return task, train_part, val_part, optimizer, scheduler


def one_epoch(task, part, optimizer, scheduler, settings, epoch: int, gap_part=None) -> float:
    order = np.random.default_rng([settings.seed, epoch, 0]).permutation(len(part.rows))
    gap_order = np.arange(len(gap_part.rows)) if gap_part else order[:0]
    return training.train_epoch(task.trainable, task, part, gap_part, optimizer, scheduler,
                                settings, order, gap_order, torch.device("cpu"))


def test_shards_have_equal_steps_and_cover_the_split():
    rows = np.arange(7)
    train = [shard(rows, r, 2, pad=True) for r in range(2)]
    assert [len(s) for s in train] == [4, 4]
    assert set(np.concatenate(train)) == set(rows)
    val = [shard(rows[:1], r, 2, pad=False) for r in range(2)]
    assert [len(s) for s in val] == [1, 0]


def test_optimizer_steps_lower_the_loss(data_path):
    settings = settings_for(data_path)
    task, train_part, _, optimizer, scheduler = local_run(settings)
    cpu = torch.device("cpu")
    before = training.validation_mean(task.trainable, task.decode, train_part, 4, cpu, False)
    losses = [one_epoch(task, train_part, optimizer, scheduler, settings, e) for e in range(1, 11)]
    after = training.validation_mean(task.trainable, task.decode, train_part, 4, cpu, False)
    assert losses[-1] < 0.2 * losses[0]
    assert after < 0.5 * before


def test_checkpoint_resume_gives_identical_weights(data_path, tmp_path):
    """Two epochs straight equal one epoch, checkpoint, restore into a new worker, one epoch."""
    settings = settings_for(data_path, epochs=2)
    straight = local_run(settings)
    for epoch in (1, 2):
        one_epoch(*straight[:2], *straight[3:], settings, epoch)

    first = local_run(settings)
    state = training.new_state(settings)
    loss = one_epoch(*first[:2], *first[3:], settings, 1)
    training.advance(state, {"epoch": 1, "train_loss": loss, "val_mae": 0.1, "val_score": 0.1}, first[0].model, 5)
    training.write_checkpoint(tmp_path, state, first[0].model, first[3], first[4])

    resumed = local_run(replace(settings, seed=99))
    saved = training.restore(resumed[0].model, tmp_path)
    resumed[3].load_state_dict(saved["optimizer"])
    resumed[4].load_state_dict(saved["scheduler"])
    assert saved["epoch"] == 1 and saved["resumed_at"] == [2]
    one_epoch(*resumed[:2], *resumed[3:], settings, 2)
    for key, value in straight[0].model.state_dict().items():
        torch.testing.assert_close(resumed[0].model.state_dict()[key], value, rtol=0, atol=0)


def test_resuming_another_run_is_refused(data_path, tmp_path):
    settings = settings_for(data_path)
    state = training.new_state(settings)
    task, _, _, optimizer, scheduler = local_run(settings)
    training.advance(state, {"epoch": 1, "train_loss": 1.0, "val_mae": 0.1, "val_score": 0.1}, task.model, 5)
    folder = tmp_path / training.RUN_NAME / "checkpoint_0"
    folder.mkdir(parents=True)
    training.write_checkpoint(folder, state, task.model, optimizer, scheduler)
    assert training.latest_checkpoint(tmp_path) == folder
    with pytest.raises(ValueError, match="lr"):
        training.resumable_state(folder, replace(settings, lr=0.5))


def test_autoencoder_learns_the_spectra_and_is_reused(tmp_path):
    """On the project's GPAW spectra: the kept autoencoder reconstructs unseen validation
    spectra better than the mean training spectrum describes them."""
    settings = settings_for(GPAW_LABELS, arch="ae-alignn", latent=12, data_hash="abc")
    path = fit_autoencoder(settings, tmp_path)
    saved = torch.load(path, weights_only=True)
    data = read_training_set(GPAW_LABELS, graphs=False)
    mean_spectrum = data.dos[data.split["train"]].mean(0)
    baseline = float(np.abs(mean_spectrum - data.dos[data.split["val"]]).mean())
    assert saved["val_mae"] < baseline
    stamp = path.stat().st_mtime_ns
    assert fit_autoencoder(settings, tmp_path) == path
    assert path.stat().st_mtime_ns == stamp
    task = make_task(replace(settings, autoencoder=str(path)))
    assert task.targets_of(data.dos[:5]).shape == (5, 12)
    train_dos = data.dos[data.split["train"]]
    assert task.target_scale == pytest.approx(
        target_scale(task.targets_of(train_dos), train_dos, "mse"), rel=1e-5)
    assert not any(p.requires_grad for p in task.model.decoder.parameters())


def test_gap_term_follows_the_units_of_the_spectrum_loss(data_path):
    """AE-ALIGNN's spectrum loss is on latent codes: the gap term, on decoded spectra, is
    scaled by how the mean target's loss compares with the mean spectrum's."""
    dos = read_training_set(data_path, graphs=False).dos
    assert target_scale(10 * dos, dos, "l1") == pytest.approx(10, rel=1e-5)
    assert target_scale(10 * dos, dos, "mse") == pytest.approx(100, rel=1e-5)
    assert make_task(settings_for(data_path)).target_scale == 1


@pytest.mark.slow
def test_two_worker_ddp_from_the_cli(ray_local, data_path, shared_data, tmp_path):
    """With a gap set: both ranks take gap structures into their one forward pass per step."""
    out = tmp_path / "run"
    with gzip.open(shared_data / "jarvis_structures.json.gz", "rt") as f:
        (tmp_path / "gaps.json").write_text(json.dumps(json.load(f)[:60]))
    sets = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    result = CliRunner().invoke(main, ["train", str(data_path), "-o", str(out), "--workers", "2",
                                       "--epochs", "2", "--batch-size", "4", *sets,
                                       "--gaps", str(tmp_path / "gaps.json"),
                                       "--hold-out", str(shared_data / "poscar")])
    assert result.exit_code == 0, result.output
    assert "validation MAE" in result.output and "gap-set bounds excess" in result.output
    model, meta = load_checkpoint(out / "model.pt")
    assert meta["arch"] == "d-alignn" and meta["training"]["workers"] == 2
    data = read_training_set(data_path, graphs=False)
    assert meta["split"]["test"] == data.split["test"].tolist()
    assert len(meta["data_hash"]) == 64
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["history"]] == [1, 2]
    assert [row["threads"] for row in metrics["history"]] == [1, 1]  # 2 CPUs, 2 workers
    assert (out / "metrics.csv").read_text().startswith("epoch,train_loss,val_mae")
    assert type(model) is type(build_model("d-alignn", TINY))
    assert all(np.isfinite(row["val_gap_excess"]) for row in metrics["history"])
    assert "JVASP-107" in meta["gap_set"]["exclude"] and meta["gap_set"]["weight"] == training.GAP_WEIGHT
    assert not any(absolute_paths(meta)), list(absolute_paths(meta))
    assert (Path.cwd() / meta["gap_set"]["path"]).resolve() == (tmp_path / "gaps.json").resolve()


def absolute_paths(value):
    """Every string in a checkpoint's meta that names an absolute path."""
    if isinstance(value, dict):
        for v in value.values():
            yield from absolute_paths(v)
    elif isinstance(value, list):
        for v in value:
            yield from absolute_paths(v)
    elif isinstance(value, str) and value.startswith("/"):
        yield value


@pytest.mark.parametrize("name", ["default_model.pt", "ae_model.pt"])
def test_shipped_checkpoints_name_no_absolute_path(name):
    _, meta = load_checkpoint(Path(__file__).parents[1] / "screener" / "data" / name)
    assert not any(absolute_paths(meta)), list(absolute_paths(meta))


@pytest.mark.slow
def test_training_starts_its_local_ray_with_the_state_api():
    """Ray Train's placement-group monitor polls the State API, which only the dashboard serves:
    without it a training run warns every second, and is killed once another Ray's dashboard
    answers in its place. In a process of its own, since the session's Ray is already up here
    and connect() would join it."""
    code = ("import ray\n"
            "from ray.util.state import list_actors\n"
            "from screener.cluster import connect\n"
            "for dashboard in (False, True):\n"
            "    connect(None, dashboard=dashboard)\n"
            "    try:\n"
            "        list_actors(address=ray.get_runtime_context().gcs_address)\n"
            "        print(dashboard, 'answers')\n"
            "    except Exception as error:\n"
            "        print(dashboard, 'fails', type(error).__name__)\n"
            "    ray.shutdown()\n")
    done = subprocess.run([sys.executable, "-c", code], env=repo_env(), capture_output=True,
                          text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("False fails") and lines[1] == "True answers", done.stdout


def test_metrics_csv_has_the_columns_of_every_epoch(tmp_path):
    """A run resumed across versions may add a column halfway."""
    history = [{"epoch": 1, "val_mae": 0.1}, {"epoch": 2, "val_mae": 0.09, "threads": 2}]
    training.write_metrics(tmp_path, history, {})
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines == ["epoch,val_mae,threads", "1,0.1,", "2,0.09,2"]


def wait_for_exit(pids: list[int], seconds: float = 60) -> None:
    """Ray ends a dead driver's train workers a moment after it, and one may still copy a
    checkpoint meanwhile: the run's last checkpoint is only known once they are gone."""
    deadline = time.monotonic() + seconds
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        assert time.monotonic() < deadline, f"train workers {pids} outlived their driver"
        time.sleep(0.1)


@pytest.mark.slow
def test_killed_ae_alignn_training_resumes_from_its_last_checkpoint(ray_local, data_path, tmp_path):
    out = tmp_path / "run"
    options = {"arch": "ae-alignn", "latent": 4, "ae_epochs": 20, "epochs": 5, "patience": 5,
               "batch_size": 4, "config": TINY}
    code = (f"from screener.training.train import train; train({str(data_path)!r}, {str(out)!r}, "
            f"address={ray_local.get_runtime_context().gcs_address!r}, **{options!r})")
    log = tmp_path / "job.log"
    with open(log, "w") as sink:
        job = subprocess.Popen([sys.executable, "-c", code], env=repo_env(), stdout=sink, stderr=sink)
    try:
        deadline = time.monotonic() + 240
        while training.latest_checkpoint(out) is None:
            assert job.poll() is None, f"training ended before a checkpoint:\n{log.read_text()}"
            assert time.monotonic() < deadline, "no epoch checkpoint within 240 s"
            time.sleep(0.2)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    wait_for_exit(ray_workers(os.getpgid(0), "ray::RayTrainWorker"))
    killed_at = torch.load(training.latest_checkpoint(out) / "state.pt")["epoch"]
    assert 1 <= killed_at < options["epochs"]

    threads = training.worker_cpus(1, 0)
    metrics = training.train(data_path, out, **options)
    assert metrics["resumed_at"] == [killed_at + 1]
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [row["epoch"] for row in history] == list(range(1, options["epochs"] + 1))
    assert [row["threads"] for row in history[killed_at:]] == [threads] * (5 - killed_at)
    assert np.isfinite(metrics["reconstruction_val_mae"])
    model, meta = load_checkpoint(out / "model.pt")
    assert meta["arch"] == "ae-alignn" and model.latent_size == 4


def test_workers_share_a_one_node_ray_s_free_cpus(ray_local):
    """One thread per worker left a core idle; GPU workers keep one CPU each."""
    free = int(ray_local.available_resources()["CPU"])
    assert training.worker_cpus(1, 0) == max(1, free)
    assert training.worker_cpus(2 * free, 0) == 1
    assert training.worker_cpus(1, 0.5) == 1
