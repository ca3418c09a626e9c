"""Hypothetical compounds by charge-balanced ionic substitution into known prototypes.

The probabilities are those of Hautier et al., Inorg. Chem. 50, 656 (2011), as pymatgen ships
them (`SubstitutionProbability`, its lambda.json). A candidate keeps its parent's cell and
sites and swaps each species of the parent, P(new | old) = exp(lambda(new, old)) / p(old):
the pymatgen conditional normalized over the new species, so a map's probability (the product
over the parent's species, unchanged ones included) is the chance that the parent's chemistry
turns into the candidate's. The cell is scaled by the ions' sizes so that a relaxation starts
near its volume. Nothing here relaxes anything (screener.pool.relax does).
"""
from __future__ import annotations

import functools
import hashlib
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from screener.io import Structure

DEFAULT_THRESHOLD = 1e-3  # pymatgen's SubstitutionPredictor default
# Elements a candidate may hold: those with a stable isotope, except noble gases; a pool meant
# for DFT labels and screening has no use for Tc, Pm or anything past Bi.
EXCLUDED_ELEMENTS = frozenset({"He", "Ne", "Ar", "Kr", "Xe", "Rn", "Tc", "Pm"})
MAX_Z = 83


@dataclass(frozen=True)
class Parent:
    """A prototype: a validated JARVIS structure with one integer oxidation state per element."""

    jid: str
    lattice: np.ndarray
    frac: np.ndarray
    elements: tuple[str, ...]
    oxidation: dict[str, int]
    gap: float

    @property
    def formula(self) -> str:
        return reduced_formula(self.elements)


@dataclass(frozen=True)
class Candidate:
    """A substituted, volume-scaled parent, not yet relaxed. `substitution` maps every species
    of the parent ('Zn2+') to its replacement, unchanged ones included."""

    jid: str
    parent: str
    substitution: dict[str, str]
    probability: float
    lattice: np.ndarray
    frac: np.ndarray
    elements: tuple[str, ...]
    volume_scale: float

    @property
    def formula(self) -> str:
        return reduced_formula(self.elements)


@dataclass
class Enumeration:
    """Candidates of a set of parents, and what was dropped on the way."""

    candidates: list[Candidate]
    n_parents: int = 0
    n_unbalanced: int = 0
    n_known: int = 0
    n_duplicates: int = 0


def candidate_id(parent: str, substitution: dict[str, str]) -> str:
    """The one id rule: a hash of the parent's jid and the full species map, so a candidate
    has the same id in every run, before it is relaxed."""
    key = parent + "|" + ",".join(f"{old}>{new}" for old, new in sorted(substitution.items()))
    return "GEN-" + hashlib.sha1(key.encode()).hexdigest()[:12]


def reduced_formula(elements: Iterable[str]) -> str:
    """pymatgen's reduced formula: the key that says two structures share a composition."""
    from pymatgen.core import Composition

    return Composition(Counter(elements)).reduced_formula


def parent_of(structure: Structure, gap: float) -> Parent | None:
    """The structure as a Parent, None where no oxidation-state guess fits the probability
    table (intermetallics, mixed valence of one element, species Hautier et al. never saw)."""
    elements = tuple(_symbols()[z] for z in structure.numbers.tolist())
    oxidation = oxidation_states(tuple(sorted(Counter(elements).items())))
    if oxidation is None:
        return None
    frac = np.linalg.solve(structure.lattice.T, structure.positions.T).T
    return Parent(structure.id, structure.lattice, frac % 1.0, elements, oxidation, gap)


@functools.cache
def oxidation_states(counts: tuple[tuple[str, int], ...]) -> dict[str, int] | None:
    """pymatgen's likeliest charge-balanced guess (ICSD statistics) with integer states whose
    species all appear in the probability table."""
    from pymatgen.core import Composition, Species

    known = _table().species
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guesses = Composition(dict(counts)).oxi_state_guesses()
    for guess in guesses:
        if all(float(v).is_integer() and Species(e, int(v)) in known for e, v in guess.items()):
            return {element: int(v) for element, v in guess.items()}
    return None


def enumerate_candidates(parents: Iterable[Parent], threshold: float = DEFAULT_THRESHOLD,
                         known: frozenset[str] = frozenset()) -> Enumeration:
    """Every charge-balanced substitution of each parent with probability >= `threshold` whose
    reduced formula is not in `known`, one per composition and prototype (`deduplicate`)."""
    result = Enumeration([])
    found = []
    for parent in parents:
        result.n_parents += 1
        for substitution, probability, balanced in substitutions(parent, threshold):
            if not balanced:
                result.n_unbalanced += 1
                continue
            candidate = substitute(parent, substitution, probability)
            if candidate.formula in known:
                result.n_known += 1
            else:
                found.append(candidate)
    result.candidates = deduplicate(found)
    result.n_duplicates = len(found) - len(result.candidates)
    return result


def substitutions(parent: Parent, threshold: float) -> Iterator[tuple[dict[str, str], float, bool]]:
    """(species map, probability, charge balanced) for every map but the identity whose
    probability reaches `threshold`, new elements all distinct and allowed. Searched depth
    first, a branch dropped once even its best completion falls below the threshold."""
    from pymatgen.core import Species

    olds = sorted(parent.oxidation, key=lambda e: (parent.oxidation[e], e))
    counts = [Counter(parent.elements)[e] for e in olds]
    old_species = [str(Species(e, parent.oxidation[e])) for e in olds]
    options = [_options(s) for s in old_species]
    best = [opts[0].probability if opts else 0.0 for opts in options]
    tail = [math.prod(best[i:]) for i in range(len(best) + 1)]

    def search(i: int, probability: float, chosen: list[_Option]):
        if i == len(olds):
            if [c.species for c in chosen] != old_species:
                charge = sum(n * c.oxidation for n, c in zip(counts, chosen))
                yield (dict(zip(old_species, (c.species for c in chosen))), probability,
                       charge == 0)
            return
        for option in options[i]:
            if probability * option.probability * tail[i + 1] < threshold:
                break
            if all(option.element != c.element for c in chosen):
                yield from search(i + 1, probability * option.probability, [*chosen, option])

    yield from search(0, 1.0, [])


def substitute(parent: Parent, substitution: dict[str, str], probability: float) -> Candidate:
    """The parent with its species replaced and its cell scaled isotropically by the ratio of
    the summed cubed radii of the new and old ions at its sites."""
    from pymatgen.core import Species

    by_element = {str(Species.from_str(old).element): Species.from_str(new)
                  for old, new in substitution.items()}
    olds = {e: Species(e, parent.oxidation[e]) for e in parent.oxidation}
    old_volume = new_volume = 0.0
    for element in parent.elements:
        r_old, r_new = _radii(olds[element], by_element[element])
        old_volume += r_old**3
        new_volume += r_new**3
    scale = new_volume / old_volume
    elements = tuple(str(by_element[e].element) for e in parent.elements)
    return Candidate(candidate_id(parent.jid, substitution), parent.jid, substitution,
                     probability, parent.lattice * scale ** (1 / 3), parent.frac, elements, scale)


def deduplicate(candidates: list[Candidate]) -> list[Candidate]:
    """One candidate per composition and prototype: within a reduced formula, the likeliest
    of each group that pymatgen's StructureMatcher (volumes scaled) finds the same crystal."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    matcher = StructureMatcher()
    by_formula: dict[str, list[Candidate]] = {}
    for candidate in sorted(candidates, key=lambda c: (-c.probability, c.jid)):
        by_formula.setdefault(candidate.formula, []).append(candidate)
    kept = []
    for group in by_formula.values():
        unique: list[tuple[Candidate, object]] = []
        for candidate in group:
            structure = pymatgen_structure(candidate.lattice, candidate.frac, candidate.elements)
            if len(group) == 1 or not any(matcher.fit(structure, s) for _, s in unique):
                unique.append((candidate, structure))
        kept.extend(c for c, _ in unique)
    return sorted(kept, key=lambda c: c.jid)


def pymatgen_structure(lattice: np.ndarray, frac: np.ndarray, elements: Iterable[str]):
    from pymatgen.core import Lattice
    from pymatgen.core import Structure as PymatgenStructure

    return PymatgenStructure(Lattice(lattice), list(elements), frac)


def charge(candidate: Candidate) -> int:
    """The total charge of the candidate's cell from its new species' oxidation states."""
    from pymatgen.core import Species

    oxidation = {str(s.element): s.oxi_state
                 for s in map(Species.from_str, candidate.substitution.values())}
    return int(sum(oxidation[e] for e in candidate.elements))


class _Option(NamedTuple):
    probability: float
    species: str
    element: str
    oxidation: int


@functools.cache
def _table():
    """pymatgen's SubstitutionProbability, loaded once (it reads lambda.json)."""
    from pymatgen.analysis.structure_prediction.substitution_probability import (
        SubstitutionProbability,
    )

    return SubstitutionProbability()


@functools.cache
def _options(old: str) -> list[_Option]:
    """Each allowed species of the table as a replacement for `old`, likeliest first."""
    from pymatgen.core import Species

    model = _table()
    old_species = Species.from_str(old)
    rows = [_Option(model.cond_prob(new, old_species), str(new), str(new.element),
                    int(new.oxi_state))
            for new in model.species if allowed(str(new.element))]
    return sorted(rows, key=lambda row: (-row.probability, row.species))


def allowed(element: str) -> bool:
    return element not in EXCLUDED_ELEMENTS and _numbers()[element] <= MAX_Z


def _radii(old, new) -> tuple[float, float]:
    """Ionic radii of both species where pymatgen has both, else both atomic radii, so the
    ratio compares like with like."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r_old, r_new = old.ionic_radius, new.ionic_radius
        if r_old and r_new:
            return float(r_old), float(r_new)
        r_old, r_new = old.element.atomic_radius, new.element.atomic_radius
        return (float(r_old), float(r_new)) if r_old and r_new else (1.0, 1.0)


@functools.cache
def _symbols() -> list[str]:
    from ase.data import chemical_symbols

    return chemical_symbols


@functools.cache
def _numbers() -> dict[str, int]:
    from ase.data import atomic_numbers

    return atomic_numbers
