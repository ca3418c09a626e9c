"""One DFT label: a GPAW calculation of one structure, reduced to the project's DOS target.

Level of theory, chosen for throughput on CPUs that many structures must share:
- PBE, LCAO mode with GPAW's dzp basis: an SCF costs seconds to minutes for small cells,
  where plane waves cost tens of minutes; dzp describes occupied and low conduction states
  well enough for a DOS on a 0.05 eV grid up to +10 eV (higher states are basis-limited).
- Monkhorst-Pack grid from the cell (ASE `kpts={'density': D, 'gamma': True}`,
  N_i = ceil(2 pi D |b_i|), so N_i * a_i >= 2 pi D), rounded up to even (see kpoint_grid):
  D = 2.5 A gives N * a >= 16 A, e.g. 8x8x8 for rock-salt MgO, 1x1x1 only for cells over
  16 A. Denser grids smooth the DOS of metals but LCAO time grows linearly with irreducible
  k-points.
- Fermi-Dirac occupations of width 0.01 eV: nearly the T = 0 ground state, so gaps are not
  smeared away; SCF cases that do not converge with it are recorded as failures.
- The DOS is a sum of Gaussians exp(-((E - e)/w)^2) with w = 0.1 eV (sigma = 0.07 eV): wide
  enough to join the discrete k-point eigenvalues of a coarse grid into a spectrum, narrow
  enough to keep gaps and band edges within about one 0.05 eV bin.
- Energy zero: E_F for metals; in a gap, where GPAW's E_F lands is arbitrary (LiF: 3.6 eV
  above the VBM of a 9 eV gap), so the zero is put at VBM + min(gap/2, 0.5 eV). JARVIS edos
  spectra put theirs 0.45-0.65 eV above the VBM for gaps of 0.95-4 eV (jarvis_edos_sample10),
  which keeps the valence band inside the -5 eV window and the E_F bin free of band tails.
- Real-space grid spacing 0.25 A, not GPAW's 0.2: LCAO time goes mostly into putting the
  density on the grid, so this halves it (CoNiAs2, 8 k-points: 93 -> 46 s) while the DOS
  moves by 1% (mean |dDOS| / mean DOS); the total energy moves by 50 meV/atom.
- Symmetry is found with a 1e-3 A tolerance: JARVIS stores cells rounded to ~1e-5 A, which
  breaks GPAW's default exact matching and multiplies the irreducible k-points (8x for MgO).
- Spin: polarized for cells holding an element with an open d or f shell in its usual ions
  (MAGNETIC_ELEMENTS), unpolarized otherwise, which halves the cost of the rest. JARVIS runs
  every cell with ISPIN = 2, ferromagnetic; here the start is ferromagnetic too, each
  magnetic atom at its free atom's Hund's-rule moment (see initial_moments). The label is the
  spin-up (majority) channel per valence electron, as edos_up; the gap is that of both
  channels together, as JARVIS's optB88vdW gap.
Known limits: ferromagnetic only (antiferromagnets come out ferromagnetic or non-magnetic), PBE
underestimates gaps, and total energies are GPAW's (relative to its atomic references), not
comparable to VASP's.
"""
from __future__ import annotations

import multiprocessing
import os
import resource
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import cache

import numpy as np

from screener.dos import E_MIN, E_STEP, N_BINS, per_valence_electron, to_grid, valence_electrons
from screener.io import Structure

KPT_DENSITY = 2.5
SMEARING = 0.01
BROADENING = 0.1
GRID_SPACING = 0.25
SYMMETRY_TOLERANCE = 1e-3
GAP_ZERO_OFFSET = 0.5
PARTIAL_OCCUPATION = 0.01
# What the DOS is divided by: JARVIS's valence count (dos.valence_electrons), not GPAW's own,
# whose setups often hold semicore states (Ti: 12 against 10), so labels share edos_up's scale.
VALENCE = "jarvis"
# This level of theory's folder under a label root (screener.label_store); a level with other
# physics (e.g. Hubbard U) gets its own.
LEVEL = "gpaw-pbe-lcao-dzp"
SPIN_RULES = ("magnetic-elements", "unpolarized")
# Ti-Cu, Zr-Pd, Hf-Pt, Ce-Yb. Left out as closed shells in their usual ions: Sc, Y, La (d0),
# Zn, Cd, Hg, Ag, Au (d10) and Lu (f14).
MAGNETIC_ELEMENTS = frozenset([*range(22, 30), *range(40, 47), *range(72, 79), *range(58, 71)])
_FINE_STEP = 0.01


@dataclass(frozen=True)
class Settings:
    """What the labels depend on; a resumed run must use the same values."""

    kpt_density: float = KPT_DENSITY
    smearing: float = SMEARING
    broadening: float = BROADENING
    grid_spacing: float = GRID_SPACING
    valence: str = VALENCE
    spin: str = SPIN_RULES[0]

    def __post_init__(self) -> None:
        if self.valence != VALENCE:
            raise ValueError(f"valence {self.valence!r}: labels are divided by the {VALENCE!r} "
                             "valence count only")
        if self.spin not in SPIN_RULES:
            raise ValueError(f"spin {self.spin!r}: one of {SPIN_RULES}")


def spin_mode(settings: Settings, numbers: Iterable[int]) -> str:
    """'polarized' or 'unpolarized': what `settings` make of a cell with these atomic numbers."""
    polarized = settings.spin == "magnetic-elements" and not MAGNETIC_ELEMENTS.isdisjoint(numbers)
    return "polarized" if polarized else "unpolarized"


@dataclass(frozen=True)
class Label:
    """A structure's DFT results in eV; dos, vbm and cbm relative to `e_fermi`, the energy zero."""

    dos: np.ndarray
    gap: float
    vbm: float
    cbm: float
    e_fermi: float
    energy: float
    kpts: tuple[int, int, int]
    n_electrons: float
    wall_time: float
    cpu_time: float
    spin: str
    magmom: float


def initial_moments(numbers: np.ndarray) -> np.ndarray:
    """The ferromagnetic start of a polarized calculation, muB per atom: on each atom of a
    MAGNETIC_ELEMENTS element its free atom's Hund's-rule moment (Mn 5, Fe 4, Co 3, ...), on
    the others none.

    VASP's start, 1 muB on every atom, fails here: GPAW builds the first density from atomic
    orbitals of the basis, which cannot hold a moment on a closed shell (Be 2s2: "Bad basis"),
    and it left FeCl2 non-magnetic where the Hund start finds high-spin Fe2+.
    """
    from ase.data import ground_state_magnetic_moments

    z = np.asarray(numbers)
    return np.where(np.isin(z, list(MAGNETIC_ELEMENTS)), ground_state_magnetic_moments[z], 0.0)


def kpoint_grid(atoms, density: float) -> tuple[int, int, int]:
    """The gamma-centred Monkhorst-Pack size ASE derives from a k-point density, made even.

    An even gamma-centred mesh holds the zone boundary (k = 1/2), where many band edges sit:
    PbS, gap at L, comes out 1.35 eV on 5x5x5 and 0.52 eV on 6x6x6 (JARVIS 0.56 eV). A single
    k-point stays single: the cells that get one are too large for their zone edge to matter.
    """
    from ase.calculators.calculator import kpts2sizeandoffsets

    size, _ = kpts2sizeandoffsets(density=density, gamma=True, atoms=atoms)
    return tuple(int(n + n % 2) if n > 1 else 1 for n in size)


def to_atoms(structure: Structure):
    from ase import Atoms

    return Atoms(numbers=structure.numbers, positions=structure.positions,
                 cell=structure.lattice, pbc=True)


def missing_basis(numbers: Iterable[int]) -> list[str]:
    """The elements among `numbers` that GPAW has no dzp basis file for (gpaw-data 1.2.1 has
    none for Tc, Th and U): their calculations could only fail, and only once started."""
    from ase.data import chemical_symbols

    symbols = (chemical_symbols[z] for z in sorted(set(numbers)))
    return [symbol for symbol in symbols if not _has_basis(symbol)]


@cache
def _has_basis(symbol: str) -> bool:
    from gpaw.basis_data import Basis

    try:
        Basis.find(symbol, "dzp")
    except FileNotFoundError:
        return False
    return True


def calculate(structure: Structure, settings: Settings = Settings(),
              txt: str | None = None) -> Label:
    """Run the SCF and reduce it to a Label; GPAW's exceptions propagate to the caller.

    A cell too skewed for GPAW's finite-difference stencils (one JARVIS AlCrO4 cell has a 146
    degree angle) is calculated in its Niggli-reduced form: the same crystal, so the same DOS.
    """
    from ase.build import niggli_reduce

    atoms = to_atoms(structure)
    try:
        return _calculate(atoms, settings, txt)
    except ValueError as error:
        if "weird unit cell" not in str(error):
            raise
    niggli_reduce(atoms)
    return _calculate(atoms, settings, txt)


def _calculate(atoms, settings: Settings, txt: str | None) -> Label:
    """The DOS is divided by 2 x the JARVIS/VASP valence count of the cell (one scale with
    JARVIS edos_up); GPAW's own count, semicore states included, is kept as n_electrons.
    """
    from ase.dft.bandgap import GapInfo
    from gpaw import GPAW, KohnShamConvergenceError

    start, cpu_start = time.perf_counter(), time.process_time()
    kpts = kpoint_grid(atoms, settings.kpt_density)
    spin = spin_mode(settings, atoms.get_atomic_numbers().tolist())
    if spin == "polarized":
        atoms.set_initial_magnetic_moments(initial_moments(atoms.get_atomic_numbers()))
    atoms.calc = GPAW(mode="lcao", basis="dzp", xc="PBE", kpts={"size": kpts, "gamma": True},
                      occupations={"name": "fermi-dirac", "width": settings.smearing},
                      h=settings.grid_spacing, symmetry={"tolerance": SYMMETRY_TOLERANCE},
                      spinpol=spin == "polarized", txt=txt)
    try:
        energy = atoms.get_potential_energy()
    except KohnShamConvergenceError as error:
        raise RuntimeError(f"SCF did not converge: {error or 'iteration limit reached'}") from error
    calc = atoms.calc
    n_electrons = float(calc.get_number_of_electrons())
    gap, vbm, cbm = _gap_edges(GapInfo.fromcalc(calc)) if _filled(calc) else (0.0, 0.0, 0.0)
    zero = vbm + min(gap / 2, GAP_ZERO_OFFSET) if gap > 0 else 0.0
    dos = per_valence_electron(spin_up_dos(calc, settings.broadening, zero),
                               valence_electrons(atoms.get_atomic_numbers()))
    magmom = float(calc.get_magnetic_moment()) if spin == "polarized" else 0.0
    return Label(dos=dos,
                 gap=gap, vbm=vbm - zero, cbm=cbm - zero,
                 e_fermi=float(calc.get_fermi_level()) + zero, energy=float(energy), kpts=kpts,
                 n_electrons=n_electrons, wall_time=time.perf_counter() - start,
                 cpu_time=time.process_time() - cpu_start, spin=spin,
                 magmom=magmom)


def spin_up_dos(calc, broadening: float, zero: float = 0.0) -> np.ndarray:
    """The spin-up channel's DOS (states/eV per cell) on ENERGY_GRID, energies relative to
    E_F + zero; of an unpolarized calculation, its one channel (half the spin-summed DOS).

    Evaluated on a 0.01 eV mesh reaching one eV past the grid, then bin-averaged by to_grid,
    so Gaussians centred just outside the window still contribute their tails.
    """
    fine = np.arange(E_MIN - 1.0, E_MIN + N_BINS * E_STEP + 1.0, _FINE_STEP)
    return to_grid(fine, calc.dos().raw_dos(fine + zero, spin=0, width=broadening))


def _filled(calc) -> bool:
    """Whether every state is full or empty (within 1%), as a gap needs.

    ASE's eigenvalue test alone calls a level lying at E_F occupied and finds a gap above it:
    it gives the half-filled 3p shell of an isolated Si atom a 6.7 eV gap.
    """
    occupations = np.array([calc.get_occupation_numbers(k, s, raw=True)
                            for k in range(len(calc.get_ibz_k_points()))
                            for s in range(calc.get_number_of_spins())])
    return bool(np.all(np.minimum(occupations, 1 - occupations) < PARTIAL_OCCUPATION))


def _gap_edges(info) -> tuple[float, float, float]:
    """(gap, vbm, cbm) relative to GPAW's E_F; a metal is (0, 0, 0) as in dos.band_gap."""
    gap, valence, conduction = info.gap()
    if gap == 0.0:
        return 0.0, 0.0, 0.0
    return float(gap), float(info.eigenvalues[valence]), float(info.eigenvalues[conduction])


def calculate_with_timeout(structure: Structure, settings: Settings, timeout: float,
                           txt: str | None = None) -> Label | str:
    """dft.calculate in a child process killed after `timeout` s: a Label, or why it failed.

    A child, not a thread: GPAW's C loops cannot be interrupted, and a killed child frees its
    memory. A child that dies (out of memory, segfault) is reported with its exit code. A
    timeout says how much CPU time the child got: far less than the wall time means other work
    starved it, and a retry on a quieter machine may finish it.
    """
    cpu_before = _children_cpu_time()
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, structure, settings, txt, os.getpid()),
                            daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(timeout):
            child.kill()
            child.join()
            return f"timed out after {timeout:g} s ({_children_cpu_time() - cpu_before:.0f} s CPU)"
        try:
            return receive.recv()
        except EOFError:
            child.join()
            return f"calculation process died (exit code {child.exitcode})"
    finally:
        child.join(5)
        if child.is_alive():
            child.kill()
        receive.close()


def _children_cpu_time() -> float:
    """User + system seconds of finished children; a killed child counts once joined."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _child(send, structure: Structure, settings: Settings, txt: str | None, parent: int) -> None:
    """Send back a Label or a one-line 'Type: message'; exit with the parent, leaving no orphan."""
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    try:
        send.send(calculate(structure, settings, txt))
    except Exception as error:  # noqa: BLE001 -- every failure is reported, not raised
        send.send(f"{type(error).__name__}: {' '.join(str(error).split())}")
    finally:
        send.close()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def gpaw_version() -> str:
    from gpaw import __version__

    return __version__


def provenance(settings: Settings) -> dict:
    """The training-set provenance of labels made with these settings."""
    return {
        "code": f"GPAW {gpaw_version()}", "xc": "PBE", "mode": "LCAO dzp",
        "level_of_theory": "DFT, GPAW, PBE, LCAO dzp",
        "spin": ("polarized (ferromagnetic start, free-atom Hund's-rule moments on the "
                 "magnetic atoms) where the cell holds one of gpaw.MAGNETIC_ELEMENTS, "
                 "unpolarized otherwise (extra/spin)"
                 if settings.spin == "magnetic-elements" else "unpolarized"),
        "kpt_density": settings.kpt_density,
        "kpts": "gamma-centred Monkhorst-Pack from the ASE density (N_i * a_i >= 2 pi * "
                "kpt_density A), N_i > 1 rounded up to even",
        "smearing": f"Fermi-Dirac {settings.smearing} eV",
        "broadening": f"Gaussian exp(-((E - e)/w)^2), w = {settings.broadening} eV",
        "grid_spacing": f"{settings.grid_spacing} A",
        "symmetry_tolerance": f"{SYMMETRY_TOLERANCE} A",
        "dos": "GPAW spin-up DOS (of an unpolarized cell: half the total), bin-averaged onto "
               "the grid, divided by the JARVIS valence electron count (dos.valence_electrons; "
               "GPAW's own count, semicore included, is extra/n_electrons)",
        "gap": "of both spin channels together; extra/magmom: total moment, muB per cell",
        "energy_zero": f"E_F for metals, VBM + min(gap/2, {GAP_ZERO_OFFSET} eV) in a gap "
                       "(extra/e_fermi holds it)",
        "settings": asdict(settings),
    }
