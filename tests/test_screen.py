"""The screening job as a library call (screener.screen) and the campaign job that calls it."""
import csv
import importlib.util
import inspect
import shutil

import numpy as np
import pytest
from conftest import REPO

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
    out = tmp_path / "out"
    summary = screen(structures=inputs, out_dir=out, model=tiny_model, bandgap=(0.0, np.inf),
                     min_probability=0.0, progress=False)
    assert (summary.run.n_read, summary.run.n_predicted, summary.failures) == (6, 6, [])
    assert summary.shortlist_path == out / "shortlist.csv" and summary.min_probability == 0.0
    with open(summary.shortlist_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["ids"] for row in rows] == list(summary.shortlist["ids"])
    assert len(rows) == 6 and "band_gap_eV" in rows[0]
    again = screen(structures=inputs, out_dir=out, model=tiny_model, progress=False)
    assert again.run.n_skipped_shards == 1 and again.shortlist is None


def test_verify_without_a_window_is_refused_before_any_work(tmp_path):
    with pytest.raises(OptionError, match="--verify checks the top"):
        screen(structures=tmp_path, out_dir=tmp_path / "out", model=tmp_path, verify_top=1)
    assert not (tmp_path / "out").exists()


def test_campaign_keys_become_screen_keywords():
    options, strict = campaign_module().screen_options(
        {"structures": "in", "bandgap": "1.4:1.6", "out": "o", "shard_size": 512, "quiet": True,
         "verify": 3, "strict": True})
    assert strict and options == {
        "address": "auto", "structures": "in", "bandgap": (1.4, 1.6), "out_dir": "o",
        "shard_size": 512, "verify_top": 3, "model": shipped_model(), "progress": False}
    assert set(options) <= set(inspect.signature(screen).parameters)
