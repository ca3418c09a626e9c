"""The DOS energy grid, resampling onto it, per-electron normalization, band gap and DOS at E_F.

Every spectrum in the project lives on one grid, the one JARVIS publishes `edos_up` on:
300 bins 0.05 eV apart from -5.00 to 9.95 eV relative to the Fermi level. A grid value is the
mean DOS over its bin, [E - E_STEP/2, E + E_STEP/2).
"""
import numpy as np

N_BINS = 300
E_MIN = -5.0
E_STEP = 0.05
ENERGY_GRID = E_MIN + E_STEP * np.arange(N_BINS)
ENERGY_GRID.flags.writeable = False
_EDGES = E_MIN - E_STEP / 2 + E_STEP * np.arange(N_BINS + 1)
_I_FERMI = round(-E_MIN / E_STEP)

# Valence electrons (POTCAR ZVAL) of the PAW_PBE potentials JARVIS-DFT uses, as listed in
# jarvis-tools' jarvis/io/vasp/default_potcars.json (e.g. Na_pv 7, Fe_pv 14, Ta_pv 11, Eu 17,
# Dy_3 9, Yb_2 8); Po_d, At_d, Rn, Fr_sv, Ra_sv, Am, Cm (absent there) follow VASP's
# recommended set. Same counts as the NELECT of the JARVIS VASP runs, so the normalized
# spectra match the electron count of the DFT that made them. Index = atomic number.
_VALENCE = np.array([
    0,
    1, 2,                                                                  # H He
    3, 4, 3, 4, 5, 6, 7, 8,                                                # Li-Ne
    7, 8, 3, 4, 5, 6, 7, 8,                                                # Na-Ar
    9, 10, 11, 10, 11, 12, 13, 14, 9, 16, 17, 12, 13, 14, 5, 6, 7, 8,      # K-Kr
    9, 10, 11, 12, 11, 12, 13, 14, 15, 10, 11, 12, 13, 14, 5, 6, 7, 8,     # Rb-Xe
    9, 10, 11, 12, 11, 11, 11, 11, 17, 18, 9, 9, 9, 9, 9, 8, 9,            # Cs-Lu
    10, 11, 12, 13, 14, 9, 10, 11, 12, 13, 14, 5, 16, 17, 8,               # Hf-Rn
    9, 10, 11, 12, 13, 14, 15, 16, 17, 18,                                 # Fr-Cm
])

# Smallest DOS, in normalized units (states/eV per spin per valence electron, see normalize),
# that band_gap counts as a state. Measured in tests/test_dos.py: the VASP DOS of AlN
# (JVASP-39) gives its eigenvalue gap 4.197 eV as 4.20 eV for any threshold in 2.1e-4 ...
# 2.8e-3. Below, the smearing tail of its VBM, 0.04 eV under E_F, leaves 2e-4 in the E_F bin
# and AlN turns metal; above, its sparse band-edge bins (2.9e-3, 3.0e-3) drop out and the gap
# jumps to 4.90 eV (5e-3) and 5.40 eV (2.5e-2). Metals keep far more at E_F: Ta2CrNO5
# (JVASP-42538) 0.012, the C49 sheet (JVASP-667) 0.017, the JARVIS edos metals 0.053-0.066.
# 1e-3 is about the geometric middle of the AlN window and 10x under the metals. On the JARVIS
# edos sample, gaps move by <= 0.25 eV between 5e-4 and 1.5e-3, except two whose band edge
# holds almost no weight (NaI 3.50 -> 4.05 eV, FeH8Cl2O4 2.80 -> 3.50 eV).
GAP_THRESHOLD = 1e-3
# A gap below this is a metal's: the smallest gap a spectrum on the grid can show.
METAL_BELOW_EV = 0.1


def to_grid(energies: np.ndarray, dos: np.ndarray, e_fermi: float = 0.0) -> np.ndarray:
    """Resample a spectrum onto ENERGY_GRID as the mean of its linear interpolant over each bin.

    Bin averaging instead of point sampling: a DFT DOS on a 0.007 eV mesh with 0.01 eV
    smearing is spiky, and sampling it every 0.05 eV would alias peaks (hit or miss them).
    The bin mean keeps the integral of every bin exactly, and for an input coarser than the
    grid it is the interpolated value at the bin centre up to the curvature at input points.
    DOS outside the input's energy range is zero.
    """
    x = np.asarray(energies, dtype=np.float64) - e_fermi
    y = np.asarray(dos, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size < 2:
        raise ValueError(f"need 1-D energies and dos of one length >= 2, not {x.shape}, {y.shape}")
    if not np.all(np.diff(x) > 0):
        raise ValueError("energies must be strictly increasing")
    return np.diff(_integral(x, y, _EDGES)) / E_STEP


def _integral(x: np.ndarray, y: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Exact integral from x[0] to each `at` of the piecewise-linear (x, y), zero beyond x."""
    area = np.concatenate([[0.0], np.cumsum(0.5 * (y[1:] + y[:-1]) * np.diff(x))])
    t = np.clip(at, x[0], x[-1])
    k = np.clip(np.searchsorted(x, t, side="right") - 1, 0, x.size - 2)
    dx = t - x[k]
    slope = (y[k + 1] - y[k]) / (x[k + 1] - x[k])
    return area[k] + y[k] * dx + 0.5 * slope * dx**2


def valence_electrons(numbers: np.ndarray) -> int:
    """Valence electrons of a cell: sum over atoms of the JARVIS PAW valence of each element."""
    z = np.asarray(numbers, dtype=np.int64)
    if z.size and (z.min() < 1 or z.max() >= _VALENCE.size):
        raise ValueError(f"atomic numbers must be 1..{_VALENCE.size - 1}, got {z.min()}..{z.max()}")
    return int(_VALENCE[z].sum())


def normalize(dos: np.ndarray, n_valence: int | np.ndarray) -> np.ndarray:
    """A spin-summed DOS (electrons/eV per cell) as states/eV per spin per valence electron.

    This is the scale of JARVIS `edos_up` (NaI: its [-5, 0] eV integral times 14 valence
    electrons is 3.0, the three I-5p orbitals of one spin), so DFT labels made here, JARVIS
    downloads and the paper's MAE figures share one scale. `n_valence` is a count for one
    spectrum or one count per row of an (n, 300) batch.
    """
    return per_valence_electron(np.asarray(dos, dtype=np.float64) / 2.0, n_valence)


def per_valence_electron(channel: np.ndarray, n_valence: int | np.ndarray) -> np.ndarray:
    """One spin channel's DOS (states/eV per cell) per valence electron: edos_up is the up
    channel of a spin-polarized VASP run on this scale. Batches as in normalize."""
    n = np.asarray(n_valence, dtype=np.float64)
    if np.any(n <= 0):
        raise ValueError("n_valence must be positive")
    return np.asarray(channel, dtype=np.float64) / (n[:, None] if n.ndim else n)


def dos_at_ef(dos: np.ndarray) -> float | np.ndarray:
    """DOS at E_F (0 eV) of one spectrum or of each row of a batch.

    0 eV is exactly the centre of bin 100, so interpolating between the bins around it
    gives that bin's value, the mean DOS over [-0.025, 0.025) eV.
    """
    value = _on_grid(dos)[..., _I_FERMI]
    return float(value) if value.ndim == 0 else value


def band_gap(
    dos: np.ndarray, threshold: float = GAP_THRESHOLD
) -> tuple[float, float, float] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gap, vbm, cbm) in eV relative to E_F, for one (300,) spectrum or an (n, 300) batch.

    A spectrum whose DOS at E_F exceeds `threshold` is a metal: (0, 0, 0). Otherwise the VBM
    is the centre of the highest bin below E_F with DOS > threshold and the CBM the lowest
    such bin above; bin centres make the gap exact to +-0.05 eV. A side without any such
    bin takes the window edge (-5.00 or 9.95 eV), so that gap is a lower bound.
    """
    d = _on_grid(dos)
    states = d > threshold
    below = states[..., :_I_FERMI]
    over = states[..., _I_FERMI + 1:]
    i_vbm = np.where(below.any(-1), _I_FERMI - 1 - np.argmax(below[..., ::-1], -1), 0)
    i_cbm = np.where(over.any(-1), _I_FERMI + 1 + np.argmax(over, -1), N_BINS - 1)
    metal = d[..., _I_FERMI] > threshold
    vbm = np.where(metal, 0.0, ENERGY_GRID[i_vbm])
    cbm = np.where(metal, 0.0, ENERGY_GRID[i_cbm])
    gap = cbm - vbm
    if d.ndim == 1:
        return float(gap), float(vbm), float(cbm)
    return gap, vbm, cbm


def _on_grid(dos: np.ndarray) -> np.ndarray:
    d = np.asarray(dos, dtype=np.float64)
    if d.ndim not in (1, 2) or d.shape[-1] != N_BINS:
        raise ValueError(f"need a ({N_BINS},) spectrum or an (n, {N_BINS}) batch, not {d.shape}")
    return d
