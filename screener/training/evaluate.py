"""Evaluation report of a DOS model on one split of a training set: metrics, figures, HTML.

The figures follow the ALIGNN-DOS paper: MAE and RE histograms (Fig. 4a, b), one spectrum
per MAE quartile (Fig. 4c), and band gaps of binary compounds (Fig. 6).
"""
from __future__ import annotations

import html
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from jarvis.core.specie import atomic_numbers_to_symbols
from matplotlib import colormaps
from matplotlib.figure import Figure

from screener.dos import ENERGY_GRID, GAP_THRESHOLD, METAL_BELOW_EV, band_gap
from screener.io import Structure
from screener.io.files import file_sha256
from screener.model.checkpoint import load_checkpoint
from screener.plots import draw_dos
from screener.predict import predict, predict_dos, prediction_columns
from screener.training import metrics
from screener.training.dataset import (
    SPLIT_METHOD,
    TrainingSet,
    read_set_graphs,
    read_structures,
    read_training_set,
    training_set_sha256,
)
from screener.training.gap_set import read_gap_set
from screener.window import p_in_window

SPLITS = ("train", "val", "test", "all")
SYMPREC = 1e-3
_SYSTEMS = ((2, "triclinic"), (15, "monoclinic"), (74, "orthorhombic"), (142, "tetragonal"),
            (167, "trigonal"), (194, "hexagonal"), (230, "cubic"))
FIGURES = {
    "mae_histogram": "mae_histogram.png",
    "re_histogram": "re_histogram.png",
    "quartile_spectra": "quartile_spectra.png",
    "gap_parity": "gap_parity.png",
    "binary_gap_map": "binary_gap_map.png",
    "reliability": "reliability.png",
}
# The window whose P(in window) calibration the report scores: the screen benchmark's.
CALIBRATION_WINDOW = (1.0, 2.0)


def evaluate(model_path: str | Path, data_path: str | Path, *, split: str = "test",
             out_dir: str | Path = "report", batch_size: int = 64, device: str = "cpu",
             gap_file: str | Path | None = None) -> dict:
    """Predict one split, score it and write figures, metrics.json and index.html to `out_dir`.

    `model_path` is a checkpoint file. `gap_file`: the model's gap-set file where it lies
    elsewhere than on the machine that trained it. Returns the report that metrics.json holds.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, meta = load_checkpoint(model_path, device)
    if not np.allclose(meta["energy_grid"], ENERGY_GRID):
        raise ValueError(f"{model_path} predicts on another energy grid than the data's "
                         f"({ENERGY_GRID[0]:.2f} ... {ENERGY_GRID[-1]:.2f} eV, 300 bins)")
    ts = read_training_set(data_path, graphs=False)
    rows, train_rows, split_from = split_rows(ts, meta, split, training_set_sha256(data_path))
    if rows.size == 0:
        raise ValueError(f"split {split!r} of {data_path} holds no structures")
    every = read_structures(data_path)
    structures = [every[i] for i in rows]
    prediction = predict(model, read_set_graphs(data_path, rows), batch_size, device)
    pred = prediction.dos
    ref = ts.dos[rows]
    learned = learned_gap_report(model, prediction, ts.ref_gap[rows])

    mae = metrics.spectrum_mae(pred, ref)
    re = metrics.relative_error(pred, ref)
    baseline = metrics.baseline_spectrum(ts.dos[train_rows])
    summary = metrics.summarize(mae, re, metrics.spectrum_mae(baseline, ref))
    pred_gap = np.asarray(band_gap(pred)[0], dtype=np.float64)
    gaps = metrics.gap_metrics(pred_gap, ts.ref_gap[rows])
    symbols = [atomic_numbers_to_symbols(np.unique(s.numbers)) for s in structures]
    systems, notes = crystal_systems(structures)
    gap_set, gap_note = gap_set_report(model, meta, split, batch_size, device, gap_file)
    notes += gap_note

    figures, figure_notes = _figures(pred, ref, mae, re, summary, pred_gap, gaps, structures,
                                     ts, rows, split)
    notes += figure_notes
    if learned:
        figures["reliability"] = _reliability(learned)
    for name, fig in figures.items():
        fig.savefig(out / FIGURES[name], dpi=110)

    report = {
        "model": {"path": str(model_path), **{k: meta.get(k) for k in ("arch", "model_id", "hash")}},
        "data": {"path": str(data_path), "n_structures": int(ts.ids.size),
                 **{k: ts.attrs.get(k) for k in ("source", "level_of_theory")}},
        "split": {"name": split, "from": split_from, "n": int(rows.size)},
        "baseline": f"mean spectrum of the {train_rows.size} training-split structures",
        "summary": summary,
        "band_gap": {"from_predicted_dos_threshold": GAP_THRESHOLD,
                     **(gaps if gaps["n_known"] else {"n_known": 0})},
        "learned_gap": learned and {k: v for k, v in learned.items() if k != "curves"},
        "gap_set": gap_set,
        "by_energy": metrics.windowed_mae(pred, ref, baseline, ENERGY_GRID),
        "by_element": metrics.grouped_mae(mae, symbols),
        "by_crystal_system": metrics.grouped_mae(mae, [[s] for s in systems]) if systems else None,
        "figures": {name: FIGURES[name] for name in figures},
        "notes": notes,
    }
    (out / "metrics.json").write_text(json.dumps(_json_safe(report), indent=2))
    (out / "index.html").write_text(report_html(report))
    return report


def learned_gap_report(model, prediction, ref_gap: np.ndarray) -> dict | None:
    """The gap head's gaps against the reference gaps, and the calibration of its P(metal)
    and P(gap in CALIBRATION_WINDOW); None for a model without a gap head or structures
    without a reference gap."""
    if prediction.gaps is None or not np.isfinite(ref_gap).any():
        return None
    columns = prediction_columns(model, prediction)
    known = np.isfinite(ref_gap)
    ref = ref_gap[known]
    p_metal = columns["p_metal"][known]
    lo, hi = CALIBRATION_WINDOW
    p_window = p_in_window(p_metal, columns["band_gap_mean"][known],
                           columns["band_gap_std"][known], lo, hi)
    metal, inside = ref < METAL_BELOW_EV, (ref >= lo) & (ref <= hi)
    return {**metrics.gap_metrics(columns["band_gap"], ref_gap),
            "window": list(CALIBRATION_WINDOW),
            "ece_p_metal": metrics.expected_calibration_error(p_metal, metal),
            "ece_p_in_window": metrics.expected_calibration_error(p_window, inside),
            "curves": {"P(metal)": metrics.reliability(p_metal, metal),
                       f"P({lo:g}-{hi:g} eV)": metrics.reliability(p_window, inside)}}


def _reliability(learned: dict) -> Figure:
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="k", lw=0.8)
    for (name, (mean_p, freq, count)), ece in zip(
            learned["curves"].items(), (learned["ece_p_metal"], learned["ece_p_in_window"])):
        used = count > 0
        ax.plot(mean_p[used], freq[used], "o-", label=f"{name}, ECE {ece:.3f}")
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency (reference gaps)")
    ax.set_title(f"Reliability of the gap head (n = {learned['n_known']})")
    ax.legend(fontsize=8)
    return fig


def gap_set_report(model, meta: dict, split: str, batch_size: int, device: str,
                   gap_file: str | Path | None = None) -> tuple[dict | None, list[str]]:
    """Gaps from the predicted DOS against the known gaps of the model's gap set, on the same
    split name; its test structures reached training through neither a spectrum nor a gap.
    The file is the one training read (same sha256), at `gap_file` or where training found it."""
    info = meta.get("gap_set")
    if not info:
        return None, [f"--gaps {gap_file} ignored: the model was trained without a gap set"
                      ] if gap_file else []
    if info.get("split") != SPLIT_METHOD:
        note = ("the model's gap set was split by row position, a rule this version no longer "
                "has: its gap-set scores skipped")
        return None, [note]
    path = Path(gap_file or info["path"])
    if not path.is_file() or file_sha256(path) != info["hash"]:
        note = (f"gap set {path} is missing or not the file the model trained with: its scores "
                "skipped (pass that file with --gaps)")
        return None, [note]
    gap_set = read_gap_set(path, info["exclude"], info["seed"])
    rows = np.arange(len(gap_set.ids)) if split == "all" else gap_set.split[split]
    pred = predict_dos(model, [gap_set.graphs[i] for i in rows], batch_size, device)
    gaps = metrics.gap_metrics(band_gap(pred)[0], gap_set.gaps[rows])
    return {"path": str(path), "split": split, "n": int(rows.size), **gaps}, []


def split_rows(ts: TrainingSet, meta: dict, split: str, data_hash: str
               ) -> tuple[np.ndarray, np.ndarray, str]:
    """Rows to score, training rows for the baseline, and whose split they come from.

    The checkpoint's split (row indices) wins when it was made on this very file, so a model is
    scored on structures it never saw; on any other file its rows would name other structures.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if meta.get("split") and meta.get("data_hash") == data_hash:
        parts, origin = meta["split"], "checkpoint"
    elif meta.get("split"):
        parts, origin = ts.split, "data file (the model was trained on another file)"
    else:
        parts, origin = ts.split, "data file"
    rows = np.arange(ts.ids.size) if split == "all" else np.asarray(parts[split], dtype=np.int64)
    return rows, np.asarray(parts["train"], dtype=np.int64), origin


def crystal_systems(structures: Sequence[Structure]) -> tuple[list[str], list[str]]:
    """Crystal system of each structure by spglib (what jarvis' Spacegroup3D uses), with notes.

    Without spglib the grouping is skipped rather than failing the whole report. spglib 2.x
    warns on every call until its exceptions become the default (3.0); both error styles are
    handled here, so the warning is noise.
    """
    try:
        import spglib
        from spglib.error import SpglibError
    except ImportError:
        return [], ["spglib (>= 2.7) is not installed: MAE by crystal system skipped"]
    systems = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for s in structures:
            fractional = np.linalg.solve(s.lattice.T, s.positions.T).T
            try:
                data = spglib.get_symmetry_dataset((s.lattice, fractional, s.numbers),
                                                   symprec=SYMPREC)
            except SpglibError:
                data = None
            systems.append("unknown" if data is None else
                           next(name for last, name in _SYSTEMS if data.number <= last))
    return systems, []


def binary_gap_matrix(numbers: Sequence[np.ndarray], gaps: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Atomic numbers present in binaries, and their mean predicted gap per pair (NaN if none)."""
    pairs = {}
    for z, gap in zip(numbers, gaps, strict=True):
        elements = tuple(np.unique(z).tolist())
        if len(elements) == 2:
            pairs.setdefault(elements, []).append(float(gap))
    present = np.array(sorted({z for pair in pairs for z in pair}), dtype=np.int64)
    where = {z: i for i, z in enumerate(present.tolist())}
    matrix = np.full((present.size, present.size), np.nan)
    for (a, b), values in pairs.items():
        matrix[where[a], where[b]] = matrix[where[b], where[a]] = np.mean(values)
    return present, matrix


def _figures(pred, ref, mae, re, summary, pred_gap, gaps, structures, ts, rows, split
             ) -> tuple[dict[str, Figure], list[str]]:
    """The report's figures, and a note for each one the data cannot support."""
    figures = {
        "mae_histogram": _mae_histogram(mae, summary),
        "re_histogram": _re_histogram(re, summary),
        "quartile_spectra": _quartile_spectra(pred, ref, mae, ts.ids[rows], ts.formula[rows]),
    }
    notes = []
    if gaps["n_known"]:
        figures["gap_parity"] = _gap_parity(pred_gap, ts.ref_gap[rows], gaps)
    else:
        notes.append("no reference band gaps among these structures: gap parity and metal/non-metal "
                     "confusion skipped")
    present, matrix = binary_gap_matrix([s.numbers for s in structures], pred_gap)
    if present.size:
        figures["binary_gap_map"] = _binary_gap_map(present, matrix, split)
    else:
        notes.append("no binary compounds in this split: binary band-gap map skipped")
    return figures, notes


def _mae_histogram(mae: np.ndarray, summary: dict) -> Figure:
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.hist(mae, bins=40, color="C0", alpha=0.8)
    for key, style in (("mae_q25", ":"), ("mae_median", "-"), ("mae_q75", "--")):
        ax.axvline(summary[key], color="k", ls=style, lw=1, label=f"{key} {summary[key]:.4f}")
    ax.axvline(summary["baseline_mae_mean"], color="C3", lw=1,
               label=f"baseline mean {summary['baseline_mae_mean']:.4f}")
    ax.set_xlabel("MAE per structure (DOS per valence electron)")
    ax.set_ylabel("structures")
    ax.set_title(f"MAE, mean {summary['mae_mean']:.4f} (n = {summary['n']})")
    ax.legend(fontsize=8)
    return fig


def _re_histogram(re: np.ndarray, summary: dict) -> Figure:
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.hist(re[np.isfinite(re)], bins=40, color="C1", alpha=0.8)
    ax.axvline(metrics.RE_GOOD, color="k", ls="--", lw=1,
               label=f"RE < {metrics.RE_GOOD}: {summary['share_re_below_0.2']:.0%}")
    ax.set_xlabel("relative error |mean(p) − mean(a)| / mean(a)")
    ax.set_ylabel("structures")
    ax.set_title(f"Relative error, median {summary['re_median']:.3f}")
    ax.legend(fontsize=8)
    return fig


def _quartile_spectra(pred: np.ndarray, ref: np.ndarray, mae: np.ndarray, ids: np.ndarray,
                      formula: np.ndarray) -> Figure:
    """The median structure of each MAE quartile, best quartile first."""
    quartiles = [q for q in np.array_split(np.argsort(mae, kind="stable"), 4) if q.size]
    fig = Figure(figsize=(12, 8), layout="constrained")
    for k, members in enumerate(quartiles):
        ax = fig.add_subplot(2, 2, k + 1)
        i = members[members.size // 2]
        draw_dos(ax, pred[i], "predicted", reference=ref[i])
        ax.set_title(f"Q{k + 1}: {ids[i]} {formula[i]}, MAE {mae[i]:.4f}", fontsize=9)
    return fig


def _gap_parity(pred_gap: np.ndarray, ref_gap: np.ndarray, gaps: dict) -> Figure:
    known = np.isfinite(ref_gap)
    top = max(float(np.max(pred_gap[known])), float(np.max(ref_gap[known])), 1.0) * 1.05
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(ref_gap[known], pred_gap[known], s=8, alpha=0.6)
    ax.plot([0, top], [0, top], color="k", lw=0.8)
    ax.set_xlim(-0.03 * top, top)
    ax.set_ylim(-0.03 * top, top)
    ax.set_xlabel("reference band gap (eV)")
    ax.set_ylabel("band gap from predicted DOS (eV)")
    ax.set_title(f"Band gap, MAE {gaps['gap_mae']:.3f} eV (n = {gaps['n_known']})")
    return fig


def _binary_gap_map(present: np.ndarray, matrix: np.ndarray, split: str) -> Figure:
    size = 3 + 0.22 * present.size
    fig = Figure(figsize=(size + 1.5, size), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=max(float(np.nanmax(matrix)), 0.1),
                      cmap=colormaps["viridis"].with_extremes(bad="0.9"))
    symbols = atomic_numbers_to_symbols(present.tolist())
    ax.set_xticks(range(present.size), symbols, rotation=90, fontsize=7)
    ax.set_yticks(range(present.size), symbols, fontsize=7)
    ax.set_title(f"Binary compounds A–B, {split} split:\nmean band gap from the predicted DOS "
                 "(elements by atomic number; grey: no such binary)", fontsize=9)
    fig.colorbar(image, ax=ax, label="mean predicted band gap (eV)")
    return fig


_STYLE = ("<style>body{font-family:sans-serif;max-width:70em;margin:auto}"
          "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px}"
          "img{max-width:100%}</style>")


def report_html(report: dict) -> str:
    """A self-contained page: the metrics tables, then every figure beside metrics.json."""
    s, g = report["summary"], report["band_gap"]
    parts = [
        "<!doctype html><meta charset='utf-8'><title>dos-screener evaluation</title>",
        _STYLE,
        "<h1>Evaluation report</h1>",
        _table({"model": report["model"]["path"], "arch": report["model"]["arch"],
                "model id": report["model"]["model_id"], "model hash": report["model"]["hash"],
                "data": report["data"]["path"], "data source": report["data"]["source"],
                "split": f"{report['split']['name']}, from the {report['split']['from']}",
                "structures": report["split"]["n"], "baseline": report["baseline"]}),
        "<h2>DOS</h2>", _table(s),
        "<h2>Band gap from the predicted DOS</h2>",
        _table({k: v for k, v in g.items() if not k.startswith("confusion")}),
    ]
    if g["n_known"]:
        parts.append(_confusion_table(g["confusion"]))
    if report["learned_gap"]:
        lg = report["learned_gap"]
        parts += ["<h2>Learned band gap (gap head)</h2>",
                  _table({k: v for k, v in lg.items() if not k.startswith("confusion")}),
                  _confusion_table(lg["confusion"])]
    if report["gap_set"]:
        gs = report["gap_set"]
        parts += ["<h2>Band gap from the predicted DOS, gap-set structures</h2>",
                  _table({k: v for k, v in gs.items() if not k.startswith("confusion")}),
                  _confusion_table(gs["confusion"])]
    parts += ["<h2>MAE by energy window</h2>", _rows_table(
        ["window", "bins", "mean MAE", "baseline", "baseline / model"],
        [[k, v["bins"], v["mae_mean"], v["baseline_mae_mean"], v["baseline_over_model"]]
         for k, v in report["by_energy"].items()])]
    for title, key in (("MAE by element", "by_element"), ("MAE by crystal system", "by_crystal_system")):
        groups = report[key]
        if groups:
            parts += [f"<h2>{title}</h2>", _rows_table(
                ["group", "n", "mean MAE"], [[k, v["n"], v["mae_mean"]] for k, v in groups.items()])]
    if report["notes"]:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{html.escape(n)}</li>" for n in report["notes"]]
        parts.append("</ul>")
    parts += ["<h2>Figures</h2>"] + [
        f"<h3>{html.escape(name)}</h3><img src='{html.escape(file)}' alt='{html.escape(name)}'>"
        for name, file in report["figures"].items()]
    return "\n".join(parts) + "\n"


def _confusion_table(confusion: list[list[int]]) -> str:
    (mm, mn), (nm, nn) = confusion
    return _rows_table(["reference \\ predicted", "metal", "non-metal"],
                       [["metal", mm, mn], ["non-metal", nm, nn]])


def _table(values: dict) -> str:
    return _rows_table(["", ""], [[k, v] for k, v in values.items()])


def _rows_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return html.escape(str(value))


def _json_safe(value):
    """NaN and inf become null: strict JSON for any reader."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
