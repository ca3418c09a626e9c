"""The screening job as a library call (screener.screen) and the campaign job that calls it."""
import csv
import importlib.util
import inspect
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from screener.pipeline import RunOptions
from screener.screen import OptionError, screen
from screener.shipped import shipped_model


def campaign_module():
    spec = importlib.util.spec_from_file_location("campaign", REPO / "jobs" / "campaign.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_screen_returns_the_shortlist_it_writes(ray_local, shared_data, tiny_model, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in sorted((shared_data / "poscar").iterdir())[:6]:
        shutil.copy(path, inputs)
    opts = RunOptions(str(inputs), tmp_path / "out", tiny_model)
    summary = screen(opts, bandgap=(0.0, np.inf), min_probability=0.0, progress=False)
    assert (summary.run.n_read, summary.run.n_predicted, summary.failures) == (6, 6, [])
    assert summary.shortlist_path == opts.out_dir / "shortlist.csv"
    assert summary.min_probability == 0.0
    with open(summary.shortlist_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["ids"] for row in rows] == list(summary.shortlist["ids"])
    assert len(rows) == 6 and "band_gap_eV" in rows[0]
    again = screen(opts, progress=False)
    assert again.run.n_skipped_shards == 1 and again.shortlist is None


def test_verify_without_a_window_is_refused_before_any_work(tmp_path):
    with pytest.raises(OptionError, match="--verify checks the top"):
        screen(RunOptions(str(tmp_path), tmp_path / "out", tmp_path), verify_top=1)
    assert not (tmp_path / "out").exists()


def test_campaign_keys_become_screen_arguments():
    opts, options, strict = campaign_module().screen_call(
        {"structures": "in", "bandgap": "1.4:1.6", "out": "o", "shard_size": 512, "quiet": True,
         "verify": 3, "strict": True})
    assert strict and opts == RunOptions("in", Path("o"), shipped_model(), address="auto",
                                         shard_size=512)
    assert options == {"bandgap": (1.4, 1.6), "verify_top": 3, "progress": False}
    assert set(options) <= set(inspect.signature(screen).parameters)
