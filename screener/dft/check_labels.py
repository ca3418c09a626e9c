"""Check GPAW labels against published JARVIS-DFT: gaps against optB88vdW, DOS against edos_up.

A training set made here is only worth training on if its labels agree with real DFT where the
physics allows. Both sides live on one grid: `screen label` bin-averages the GPAW DOS onto
dos.ENERGY_GRID, and JARVIS publishes edos_up as the values on that same grid (300 bins,
-5.00 ... 9.95 eV, 0.05 eV), which dataset.from_json takes as they are.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from screener.dos import E_STEP, ENERGY_GRID, METAL_BELOW_EV, N_BINS, band_gap
from screener.plots import draw_dos
from screener.results.hdf5 import SchemaError
from screener.training import metrics
from screener.training.dataset import Labelled, TrainingSet, from_json, read_training_set

LABEL_EXTRA = ("gpaw_gap", "vbm", "cbm")
GAP_PARITY = "gap_parity.png"
DOS_FOLDER = "dos_overlay"
REPORT = "check.json"


def check_labels(labels: str | Path, out_dir: str | Path, edos: str | Path | None = None) -> dict:
    """Write the gap parity plot, DOS overlays (with `edos`) and check.json; return the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ts = read_labels(labels)
    gap = gap_check(ts.extra["gpaw_gap"], ts.ref_gap)
    if gap["n"]:
        gap["disagreements"] = disagreements(ts)
    report = {"labels": str(labels), "level_of_theory": ts.attrs.get("level_of_theory"),
              "n_structures": int(ts.ids.size), "gap": gap, "figures": [], "notes": []}
    if gap["n"]:
        _gap_parity(ts, gap).savefig(out / GAP_PARITY, dpi=110)
        report["figures"].append(GAP_PARITY)
    else:
        report["notes"].append("no JARVIS reference gaps in the labels: gap parity skipped")
    if edos is not None:
        jarvis = from_json(edos)
        l_rows, j_rows = match(ts, jarvis)
        report["dos"] = {"edos": str(edos), **dos_check(ts, jarvis, l_rows, j_rows)}
        maes = [s["mae"] for s in report["dos"]["structures"]]
        report["figures"] += _dos_overlays(ts, jarvis, l_rows, j_rows, maes, out)
    (out / REPORT).write_text(json.dumps(report, indent=2, allow_nan=False))
    return report


def read_labels(path: str | Path) -> TrainingSet:
    """A training set from `screen label`; other files are refused with what they lack."""
    ts = read_training_set(path, graphs=False)
    missing = [name for name in LABEL_EXTRA if name not in ts.extra]
    if missing:
        raise SchemaError(f"{path}: a training set, but not one from `screen label` (no "
                          f"extra/{', extra/'.join(missing)})")
    return ts


def gap_check(gpaw_gap: np.ndarray, ref_gap: np.ndarray) -> dict:
    """GPAW vs reference gaps over the structures with a reference; metals count as 0 eV.

    Gapped means a reference gap of at least METAL_BELOW_EV, the same split as the
    metal/non-metal confusion, so the gapped MAE and the disagreement count share one class line.
    """
    known = np.isfinite(ref_gap)
    gpaw = np.asarray(gpaw_gap, np.float64)[known]
    ref = np.asarray(ref_gap, np.float64)[known]
    if not known.any():
        return {"n": 0}
    overall = metrics.gap_metrics(gpaw, ref)
    gapped = ref >= METAL_BELOW_EV
    (_, metal_as_gapped), (gapped_as_metal, _) = overall["confusion"]
    return {
        "n": overall["n_known"],
        "mae": overall["gap_mae"],
        "correlation": _correlation(gpaw, ref),
        "n_gapped": int(gapped.sum()),
        "correlation_gapped": _correlation(gpaw[gapped], ref[gapped]),
        "mae_gapped": metrics.gap_metrics(gpaw[gapped], ref[gapped])["gap_mae"] if gapped.any()
        else None,
        "class_disagreements": metal_as_gapped + gapped_as_metal,
        "metal_below_ev": overall["metal_below_ev"],
        "confusion_rows_reference_cols_gpaw": ["metal", "gapped"],
        "confusion": overall["confusion"],
    }


def disagreements(ts: TrainingSet) -> list[dict]:
    """The structures that GPAW and the reference put on different sides of the metal line."""
    gpaw = np.asarray(ts.extra["gpaw_gap"], np.float64)
    line = metrics.METAL_BELOW_EV
    rows = np.flatnonzero(np.isfinite(ts.ref_gap) & ((ts.ref_gap >= line) != (gpaw >= line)))
    return [{"id": str(ts.ids[i]), "formula": str(ts.formula[i]),
             "gpaw_gap": float(gpaw[i]), "ref_gap": float(ts.ref_gap[i]), "spin": _spin(ts, i)}
            for i in rows]


def _spin(ts: TrainingSet, row: int) -> str:
    """A label's spin mode; sets from before spin polarization have no extra/spin."""
    return str(ts.extra["spin"][row]) if "spin" in ts.extra else "unpolarized"


def _correlation(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson r, None where it is undefined (fewer than two points or a constant side)."""
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def dos_check(ts: TrainingSet, jarvis: Labelled, l_rows: np.ndarray, j_rows: np.ndarray
              ) -> dict:
    """Per-structure MAE of the GPAW DOS against JARVIS edos_up, on the rows `match` pairs.

    Both are the spin-up channel per valence electron; a label made unpolarized (extra/spin)
    holds half its spin-summed DOS, which for a magnetic compound is not its up channel.
    """
    mae = metrics.spectrum_mae(ts.dos[l_rows], jarvis.dos[j_rows])
    jarvis_gap = np.asarray(band_gap(jarvis.dos[j_rows])[0]) if j_rows.size else np.array([])
    structures = [{"id": str(ts.ids[i]), "formula": str(ts.formula[i]), "mae": float(m),
                   "gpaw_gap": float(ts.extra["gpaw_gap"][i]), "jarvis_dos_gap": float(g)}
                  for i, m, g in zip(l_rows, mae, jarvis_gap)]
    labelled = set(ts.ids.tolist())
    return {
        "grid": {"e_min": round(float(ENERGY_GRID[0]), 6),
                 "e_max": round(float(ENERGY_GRID[-1]), 6), "step": E_STEP, "n_bins": N_BINS},
        "n_matched": len(structures),
        "mae_mean": float(mae.mean()) if structures else None,
        "structures": structures,
        "not_labelled": [s.id for s in jarvis.structures if s.id not in labelled],
        "unusable_in_edos": [{"id": f.id, "reason": f.reason} for f in jarvis.skipped],
    }


def match(ts: TrainingSet, jarvis: Labelled) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (labels, JARVIS) of the structures in both, in the JARVIS file's order."""
    rows = {sid: i for i, sid in enumerate(ts.ids.tolist())}
    pairs = [(rows[s.id], j) for j, s in enumerate(jarvis.structures) if s.id in rows]
    return (np.array([i for i, _ in pairs], dtype=np.int64),
            np.array([j for _, j in pairs], dtype=np.int64))


def _gap_parity(ts: TrainingSet, gap: dict) -> Figure:
    """GPAW gap against the reference, coloured by whether both put it on the same side."""
    known = np.isfinite(ts.ref_gap)
    ref = ts.ref_gap[known].astype(np.float64)
    gpaw = ts.extra["gpaw_gap"][known].astype(np.float64)
    gapped_ref, gapped_gpaw = ref >= gap["metal_below_ev"], gpaw >= gap["metal_below_ev"]
    top = max(float(ref.max()), float(gpaw.max()), 1.0) * 1.05
    fig = Figure(figsize=(5.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    for name, members, color in (("metal in both", ~gapped_ref & ~gapped_gpaw, "C7"),
                                 ("gapped in both", gapped_ref & gapped_gpaw, "C0"),
                                 ("metal in one only", gapped_ref != gapped_gpaw, "C3")):
        ax.scatter(ref[members], gpaw[members], s=14, color=color,
                   label=f"{name} ({int(members.sum())})")
    named = gapped_ref | gapped_gpaw
    for x, y, formula in zip(ref[named], gpaw[named], ts.formula[known][named]):
        ax.annotate(str(formula), (x, y), fontsize=7, xytext=(3, -8), textcoords="offset points")
    ax.plot([0, top], [0, top], color="k", lw=0.8, label="y = x")
    ax.set_xlim(-0.03 * top, top)
    ax.set_ylim(-0.03 * top, top)
    ax.set_xlabel("JARVIS optB88vdW band gap (eV)")
    ax.set_ylabel("GPAW PBE eigenvalue gap (eV)")
    ax.set_title(f"n = {gap['n']}, MAE {gap['mae']:.3f} eV, r = {_text(gap['correlation'])}",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def _dos_overlays(ts: TrainingSet, jarvis: Labelled, l_rows: np.ndarray, j_rows: np.ndarray,
                  maes: list[float], out: Path) -> list[str]:
    """One PNG per matched structure: the GPAW label over JARVIS edos_up (dashed)."""
    files = []
    if l_rows.size:
        (out / DOS_FOLDER).mkdir(exist_ok=True)
    for i, j, mae in zip(l_rows, j_rows, maes):
        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.add_subplot()
        draw_dos(ax, ts.dos[i], f"GPAW PBE, {_spin(ts, i)}", float(ts.extra["vbm"][i]),
                 float(ts.extra["cbm"][i]), reference=jarvis.dos[j])
        ax.set_title(f"{ts.ids[i]} {ts.formula[i]}: GPAW vs JARVIS edos_up (dashed), "
                     f"MAE {mae:.4f}", fontsize=9)
        name = f"{DOS_FOLDER}/{ts.ids[i]}.png"
        fig.savefig(out / name, dpi=110)
        files.append(name)
    return files


def format_report(report: dict) -> str:
    """The report as the lines `screen check-labels` prints."""
    g = report["gap"]
    lines = [f"{report['labels']}: {report['n_structures']} labelled structures"]
    if g["n"]:
        lines.append(f"gap vs JARVIS optB88vdW: n {g['n']}, MAE {g['mae']:.3f} eV, correlation "
                     f"{_text(g['correlation'])}; gapped (ref >= {g['metal_below_ev']} eV): n "
                     f"{g['n_gapped']}, MAE {_text(g['mae_gapped'], '.3f')} eV, correlation "
                     f"{_text(g['correlation_gapped'])}; metal/gapped disagreements "
                     f"{g['class_disagreements']}")
    lines += [f"note: {note}" for note in report["notes"]]
    dos = report.get("dos")
    if dos:
        lines.append(f"DOS vs JARVIS edos_up ({dos['edos']}): {dos['n_matched']} matched, "
                     f"mean MAE {_text(dos['mae_mean'])}")
        lines += [f"  {s['id']:<12} {s['formula']:<14} MAE {s['mae']:.4f}  gap GPAW "
                  f"{s['gpaw_gap']:.2f} eV, from the JARVIS DOS {s['jarvis_dos_gap']:.2f} eV"
                  for s in dos["structures"]]
        if dos["not_labelled"]:
            lines.append(f"not labelled: {', '.join(dos['not_labelled'])}")
        lines += [f"unusable in the eDOS file: {u['id']}: {u['reason']}"
                  for u in dos["unusable_in_edos"]]
    return "\n".join(lines)


def _text(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)
