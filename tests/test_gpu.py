"""The GPU paths on a real GPU: screening on Ray GPU actors and training on a Ray Train GPU worker.

CI has no GPU, so these skip there; run them on a GPU machine with `pytest tests/test_gpu.py`.
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GPAW_LABELS

from screener.dos import E_STEP
from screener.pipeline import RunOptions, run
from screener.results.query import read_predictions
from screener.shipped import shipped_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def by_id(results: Path) -> dict[str, np.ndarray]:
    table = read_predictions(results, columns=["ids", "dos", "band_gap"])
    order = np.argsort(table["ids"])
    return {key: np.asarray(values)[order] for key, values in table.items()}


def test_gpu_actors_predict_what_cpu_actors_predict(ray_local, shared_data, tmp_path):
    """The shipped model on the 201 POSCARs: same ids, spectra within fp32 noise, same gaps."""
    assert ray_local.cluster_resources().get("GPU", 0) >= 1
    poscars = str(shared_data / "poscar")
    gpu = run(RunOptions(poscars, tmp_path / "gpu", shipped_model(), device="cuda"))
    cpu = run(RunOptions(poscars, tmp_path / "cpu", shipped_model(), device="cpu", workers=1))
    assert gpu.n_predicted == cpu.n_predicted == 201
    on_gpu, on_cpu = by_id(tmp_path / "gpu"), by_id(tmp_path / "cpu")
    assert list(on_gpu["ids"]) == list(on_cpu["ids"])
    assert np.abs(on_gpu["dos"] - on_cpu["dos"]).max() < 1e-4
    gap_steps = np.abs(on_gpu["band_gap"] - on_cpu["band_gap"]) / E_STEP
    assert np.count_nonzero(gap_steps > 1.01) == 0


@pytest.mark.slow
def test_training_runs_on_a_gpu_worker(ray_local, tmp_path):
    """`screen train --gpus-per-worker 1`: Ray Train places the worker on the GPU and the run
    ends with a usable checkpoint."""
    from screener.model import load_checkpoint
    from screener.training.train import train

    metrics = train(GPAW_LABELS, tmp_path / "run", workers=1, gpus_per_worker=1, batch_size=16,
                    epochs=3, patience=3, loss="l1", amp=True,
                    config={"hidden": 32, "alignn_layers": 1, "gcn_layers": 1})
    assert metrics["epochs_run"] == 3 and math.isfinite(metrics["val_mae"])
    _, meta = load_checkpoint(tmp_path / "run" / "model.pt")
    assert meta["training"]["amp"] and meta["training"]["workers"] == 1
