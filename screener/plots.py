"""Figures of single spectra: a predicted DOS with E_F and the band edges marked."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from screener.dos import ENERGY_GRID


def draw_dos(ax, dos: np.ndarray, label: str, vbm: float | None = None, cbm: float | None = None,
             reference: np.ndarray | None = None) -> None:
    """One spectrum on the shared grid, E_F at 0, the gap shaded when there is one."""
    ax.plot(ENERGY_GRID, dos, color="C0", lw=1.2, label=label)
    if reference is not None:
        ax.plot(ENERGY_GRID, reference, color="k", lw=1.0, ls="--", label="reference")
    ax.axvline(0.0, color="grey", lw=0.8, ls=":", label="E_F")
    if vbm is not None and cbm is not None and cbm > vbm:
        ax.axvspan(vbm, cbm, color="C1", alpha=0.2, label=f"gap {cbm - vbm:.2f} eV")
        ax.axvline(vbm, color="C2", lw=0.8, label=f"VBM {vbm:.2f}")
        ax.axvline(cbm, color="C3", lw=0.8, label=f"CBM {cbm:.2f}")
    ax.set_xlabel("E − E_F (eV)")
    ax.set_ylabel("DOS (states/eV per valence electron)")
    ax.set_xlim(ENERGY_GRID[0], ENERGY_GRID[-1])
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="upper right")


def plot_prediction(results: str | Path, structure_id: str, path: str | Path) -> Path:
    """Write the predicted DOS of `structure_id` from a results folder as a PNG."""
    from screener.results.query import find_prediction

    row = find_prediction(results, structure_id)
    fig, ax = plt.subplots(figsize=(7, 4))
    draw_dos(ax, row["dos"], f"{structure_id} ({row['formula']}) predicted", row["vbm"], row["cbm"])
    ax.set_title(f"{structure_id}  {row['formula']}  learned gap {row['band_gap']:.2f} "
                 f"± {row['band_gap_std']:.2f} eV, P(metal) {row['p_metal']:.2f}; "
                 f"gap off the DOS {row['dos_band_gap']:.2f} eV", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
