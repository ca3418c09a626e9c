"""Relax a substitution candidate with CHGNet and judge whether the result is physical.

CHGNet's pretrained weights ship inside its wheel, so nothing is downloaded at run time. One
candidate is a few dozen atoms at most: torch runs on one thread and a machine runs one
relaxation per core. A relaxation never raises: every way it can go wrong becomes the
candidate's rejection reason.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, replace

import numpy as np

from screener.io.structure import MIN_DISTANCE
from screener.pool.substitution import Candidate, pymatgen_structure

FAILED = "relaxation failed"
NOT_CONVERGED = "not converged"
VOLUME = "volume change"
CONTACT = "close contact"
REASONS = (FAILED, NOT_CONVERGED, VOLUME, CONTACT)


@dataclass(frozen=True)
class Limits:
    """When a relaxation counts as converged, and what a physical result must satisfy."""

    fmax: float = 0.1  # eV/A, also on the cell's stress through ASE's FrechetCellFilter
    max_steps: int = 500
    max_volume_change: float = 0.30  # relative to the volume-scaled start
    contact_factor: float = 0.7  # times the sum of the two covalent radii
    min_distance: float = MIN_DISTANCE  # A, whatever the radii


@dataclass(frozen=True)
class Relaxed:
    """A candidate after CHGNet: the final cell and what the relaxation did. `reason` is None
    for a kept candidate, else one of REASONS, with `detail` saying by how much."""

    jid: str
    lattice: np.ndarray
    frac: np.ndarray
    elements: tuple[str, ...]
    energy_before: float  # eV/atom
    energy_after: float
    volume_change: float
    steps: int
    seconds: float
    reason: str | None
    detail: str = ""


def relax(candidate: Candidate, limits: Limits = Limits()) -> Relaxed:
    """Relax cell and positions and apply the checks, in the order the reasons list. BFGS, as
    a cell of a few dozen degrees of freedom converges in fewer force calls than with FIRE."""
    start = time.perf_counter()
    n = len(candidate.elements)
    try:
        result = _optimizer().relax(
            pymatgen_structure(candidate.lattice, candidate.frac, candidate.elements),
            fmax=limits.fmax, steps=limits.max_steps, relax_cell=True, verbose=False)
    except Exception as error:  # noqa: BLE001 -- any error is this candidate's rejection
        return Relaxed(candidate.jid, candidate.lattice, candidate.frac, candidate.elements,
                       math.nan, math.nan, math.nan, 0, time.perf_counter() - start, FAILED,
                       f"{type(error).__name__}: {error}")
    final = result["final_structure"]
    energies = result["trajectory"].energies
    lattice = np.asarray(final.lattice.matrix, dtype=np.float64)
    volume_before = abs(np.linalg.det(candidate.lattice))
    relaxed = Relaxed(
        candidate.jid, lattice, np.asarray(final.frac_coords, dtype=np.float64) % 1.0,
        tuple(str(site.specie) for site in final), float(energies[0]) / n,
        float(energies[-1]) / n, abs(np.linalg.det(lattice)) / volume_before - 1.0,
        len(energies) - 2, time.perf_counter() - start, None)
    reason, detail = judge(relaxed, limits)
    return replace(relaxed, reason=reason, detail=detail)


def judge(relaxed: Relaxed, limits: Limits) -> tuple[str | None, str]:
    """(reason, detail) for the first check the relaxed candidate fails, (None, '') if none.

    The trajectory holds the start, one entry per optimizer step, and the end again, so a
    relaxation that used all its steps has max_steps + 2 energies and did not converge.
    """
    energies = (relaxed.energy_before, relaxed.energy_after)
    if not all(map(math.isfinite, energies)) or not np.isfinite(relaxed.lattice).all():
        return FAILED, f"non-finite energy or cell (energies {energies})"
    if relaxed.steps >= limits.max_steps:
        return NOT_CONVERGED, f"forces above {limits.fmax} eV/A after {relaxed.steps} steps"
    if abs(relaxed.volume_change) > limits.max_volume_change:
        return VOLUME, (f"volume {relaxed.volume_change:+.0%} from the scaled start, beyond "
                        f"{limits.max_volume_change:.0%}")
    contact = closest_contact(relaxed.lattice, relaxed.frac, relaxed.elements, limits)
    if contact is not None:
        return CONTACT, contact
    return None, ""


def closest_contact(lattice: np.ndarray, frac: np.ndarray, elements: tuple[str, ...],
                    limits: Limits) -> str | None:
    """The closest pair (periodic images included) nearer than contact_factor times its
    covalent radii sum or than min_distance, in words; None if every pair is farther."""
    from ase.data import atomic_numbers, covalent_radii

    radii = covalent_radii[[atomic_numbers[e] for e in elements]]
    reach = max(2 * limits.contact_factor * radii.max(), limits.min_distance)
    centres, neighbours, _, distances = pymatgen_structure(
        lattice, frac, elements).get_neighbor_list(reach)
    limit = np.maximum(limits.contact_factor * (radii[centres] + radii[neighbours]),
                       limits.min_distance)
    short = np.flatnonzero(distances < limit)
    if short.size == 0:
        return None
    k = short[np.argmin(distances[short] / limit[short])]
    i, j = int(centres[k]), int(neighbours[k])
    return (f"{elements[i]}-{elements[j]} (atoms {i}, {j}) {distances[k]:.2f} A apart, "
            f"under {limit[k]:.2f} A")


def versions() -> dict[str, str]:
    """The chgnet package and the model version it loads: provenance for every record."""
    import chgnet

    return {"chgnet": chgnet.__version__, "chgnet_model": _optimizer().calculator.model.version}


@functools.cache
def _optimizer():
    """CHGNet's default pretrained model, from the weights inside the package, loaded once per
    process (a Ray worker keeps it between tasks). An atom with no neighbour within CHGNet's
    cutoff is an error, so a cell blown apart fails instead of relaxing as separate atoms."""
    import torch
    from chgnet.model import CHGNet, StructOptimizer

    torch.set_num_threads(1)
    model = CHGNet.load(use_device="cpu", verbose=False)
    return StructOptimizer(model=model, optimizer_class="BFGS", use_device="cpu",
                           on_isolated_atoms="error")
