"""What a crystal structure is here, what became of an input that is none, and every check a
structure passes before a graph is built from it."""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np

from screener.io.elements import element_tables

MAX_ATOMS = 5000
MIN_DISTANCE = 0.5
MIN_VOLUME_PER_ATOM = 1e-3
MAX_LENGTH = 1e4
MAX_OBLIQUITY = 30.0
MAX_IMAGE_POINTS = 5_000_000  # periodic images x atoms for the closest-pair check: ~0.5 GB


@dataclass(frozen=True)
class Structure:
    """A validated crystal: lattice rows and cartesian positions in Angstrom, atomic numbers."""

    id: str
    source: str
    lattice: np.ndarray
    positions: np.ndarray
    numbers: np.ndarray

    @property
    def n_atoms(self) -> int:
        return len(self.numbers)

    @property
    def formula(self) -> str:
        """Reduced formula, elements by electronegativity like jarvis (ties by Z, so stable)."""
        numbers, counts = np.unique(self.numbers, return_counts=True)
        counts //= np.gcd.reduce(counts)
        symbols, electronegativity = element_tables()[1:]
        order = sorted(range(len(numbers)), key=lambda k: (electronegativity[numbers[k]], numbers[k]))
        return "".join(symbols[numbers[k]] + (str(counts[k]) if counts[k] > 1 else "") for k in order)


@dataclass(frozen=True)
class Failure:
    """Why one input was dropped, and at which stage: "read", "validate", "graph" or "predict"."""

    id: str
    source: str
    stage: str
    reason: str


@dataclass(frozen=True)
class Source:
    """Cheap, picklable handle on one input: `discover` yields it in the driver, workers `load` it.
    `record` holds a JARVIS record's `atoms` dict, None for a file."""

    id: str
    origin: str
    record: dict | None


class Problem(ValueError):
    """What `load` reports: a stage and a reason meant for the user. A ValueError, so that
    callers of `read_records` outside a run report it like any bad argument."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


def validated(source: Source, lattice: np.ndarray, positions: np.ndarray,
              symbols: list[str]) -> Structure:
    """Every check a structure must pass before a crystal graph can be built from it."""
    n_atoms = len(symbols)
    if positions.shape != (n_atoms, 3):
        raise Problem("validate", f"{len(positions)} positions for {n_atoms} element symbols")
    if n_atoms == 0:
        raise Problem("validate", "no atoms")
    if n_atoms > MAX_ATOMS:
        raise Problem("validate", f"{n_atoms} atoms, more than the limit of {MAX_ATOMS} (MAX_ATOMS)")
    if not np.isfinite(lattice).all():
        raise Problem("validate", f"lattice has non-finite values: {lattice.tolist()}")
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if bad.size:
        i = bad[0]
        raise Problem("validate", f"atom {i} ({symbols[i]}) has a non-finite position "
                                  f"{positions[i].tolist()}")
    numbers = _atomic_numbers(symbols)
    volume = abs(float(np.linalg.det(lattice)))
    if volume < MIN_VOLUME_PER_ATOM * n_atoms:
        raise Problem("validate", f"cell volume {volume:.3g} A^3 is too small for {n_atoms} atoms "
                                  f"(minimum {MIN_VOLUME_PER_ATOM} A^3 per atom)")
    pair = _closest_pair(lattice, positions)
    if pair is not None and pair[2] < MIN_DISTANCE:
        raise Problem("validate", _closeness(*pair, symbols))
    problem = _cell_shape_problem(lattice, volume)
    if problem is None and pair is None:
        problem = (f"the cell is too thin to check its {MIN_DISTANCE} A atom spacing within "
                   f"{MAX_IMAGE_POINTS:.0e} periodic image points: use a reduced (Niggli) cell")
    if problem:
        raise Problem("validate", problem)
    return Structure(source.id, source.origin, np.ascontiguousarray(lattice),
                     np.ascontiguousarray(positions), numbers)


def _cell_shape_problem(lattice: np.ndarray, volume: float) -> str | None:
    """A cell too big or too oblique for the graph's neighbour search, which walks images of
    the cell as given: a vector longer than MAX_LENGTH, or one more than MAX_OBLIQUITY times
    the spacing of the lattice planes it crosses (a reduced cell's ratio is below 2). The
    images searched grow as the cube of that ratio, about 160 ratio^3 points in all: 100 MB
    at the limit, terabytes for the bases a fuzzer makes."""
    lengths = np.linalg.norm(lattice, axis=1)
    if lengths.max() > MAX_LENGTH:
        i = int(np.argmax(lengths))
        return f"lattice vector {i + 1} is {lengths[i]:.3g} A long, more than {MAX_LENGTH:g} A"
    spacings = volume / np.linalg.norm(np.cross(lattice[[1, 2, 0]], lattice[[2, 0, 1]]), axis=1)
    i = int(np.argmax(lengths / spacings))
    if lengths[i] > MAX_OBLIQUITY * spacings[i]:
        return (f"lattice vector {i + 1} is {lengths[i]:.3g} A long but its lattice planes are "
                f"{spacings[i]:.3g} A apart: too oblique a basis, use a reduced (Niggli) cell")
    return None


def _closeness(i: int, j: int, distance: float, symbols: list[str]) -> str:
    limit = f"closer than the {MIN_DISTANCE} A minimum"
    if i == j:
        return (f"atom {i} ({symbols[i]}) is {distance:.3f} A from its own periodic image, "
                f"{limit}: a lattice vector is too short")
    return f"atoms {i} ({symbols[i]}) and {j} ({symbols[j]}) are {distance:.3f} A apart, {limit}"


def _atomic_numbers(symbols: list[str]) -> np.ndarray:
    numbers = element_tables()[0]
    unknown = sorted({symbol for symbol in symbols if symbol not in numbers})
    if unknown:
        raise Problem("validate", f"unknown element symbol(s): {', '.join(map(repr, unknown))}")
    return np.array([numbers[symbol] for symbol in symbols], dtype=np.int64)


def _closest_pair(lattice: np.ndarray, positions: np.ndarray) -> tuple[int, int, float] | None:
    """Closest periodic pair (i, j, distance), i == j for an atom and its own image, searched
    only up to MIN_DISTANCE (distance inf beyond). Each axis gets as many images as its plane
    spacing requires; a cell that would need more than the neighbouring ones is reduced first,
    which keeps the image count small and exposes a too short lattice vector directly. None
    where even the reduced cell needs more than MAX_IMAGE_POINTS: a basis that the reduction
    (100 rounds, in floating point) leaves thin, whose search would take gigabytes."""
    from scipy.spatial import cKDTree

    cell, inverse = lattice, np.linalg.inv(lattice)
    if _reach(inverse).max() > 1:
        cell = _reduced(lattice)
        inverse = np.linalg.inv(cell)
        lengths = np.linalg.norm(cell, axis=1)
        if lengths.min() < MIN_DISTANCE:
            return 0, 0, float(lengths.min())
    reach = _reach(inverse)
    n_atoms = len(positions)
    if np.prod(2.0 * reach + 1) * n_atoms > MAX_IMAGE_POINTS:
        return None
    fractional = positions @ inverse
    inside = (fractional - np.floor(fractional)) @ cell
    shifts = _image_shifts(tuple(reach)) @ cell
    images = (shifts[:, None, :] + inside[None, :, :]).reshape(-1, 3)
    distances, found = cKDTree(images).query(inside, k=2, distance_upper_bound=MIN_DISTANCE)
    itself = found[:, 0] == (len(shifts) // 2) * n_atoms + np.arange(n_atoms)
    nearest = np.where(itself, distances[:, 1], distances[:, 0])
    partner = np.where(itself, found[:, 1], found[:, 0])
    i = int(np.argmin(nearest))
    return i, int(partner[i] % n_atoms), float(nearest[i])


def _reach(inverse: np.ndarray) -> np.ndarray:
    """Images needed on each side per axis: MIN_DISTANCE over the spacing of the lattice planes,
    which is one over the length of the matching column of the inverse cell."""
    return np.ceil(MIN_DISTANCE * np.linalg.norm(inverse, axis=0)).astype(int)


@functools.cache
def _image_shifts(reach: tuple[int, ...]) -> np.ndarray:
    """Integer cell shifts in lexicographic order, so the zero shift sits in the middle."""
    return np.array(list(itertools.product(*(range(-r, r + 1) for r in reach))), dtype=np.float64)


_STEPS = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)], dtype=np.float64)


def _reduced(lattice: np.ndarray) -> np.ndarray:
    """The same lattice with a nearly orthogonal basis: each vector is replaced by a shorter
    one made by adding whole multiples of the other two (nearest multiples of each, and all
    +-1 combinations of both), until none shrinks."""
    cell = lattice.copy()
    for _ in range(100):
        changed = False
        for k in range(3):
            others = np.delete(cell, k, axis=0)
            nearest = np.round(others @ cell[k] / np.einsum("ij,ij->i", others, others))
            steps = np.vstack([np.diag(nearest), _STEPS])
            candidates = cell[k] - steps @ others
            best = candidates[np.argmin(np.einsum("ij,ij->i", candidates, candidates))]
            if best @ best < (1 - 1e-12) * (cell[k] @ cell[k]):
                cell[k] = best
                changed = True
        if not changed:
            break
    return cell
