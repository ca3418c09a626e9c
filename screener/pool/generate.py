"""`screen generate`: a pool of hypothetical, likely-gapped crystals as JARVIS-form records.

Parents are the gapped small cells of a JARVIS record file; screener.pool.substitution turns
them into charge-balanced candidates of new compositions, screener.pool.relax relaxes and
judges each.
Kept candidates go to `out` (json or json.gz, the form `screen run` and `screen label` read),
rejected ones with their reason to `<out>.rejected.csv`. Both files are rewritten atomically
every minute and at the end, so a killed run loses at most a minute of work, and a rerun skips
every candidate either file holds: a candidate's id depends only on its parent and its
substitution (substitution.candidate_id).
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import itertools
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from screener.dft.label import GAPPED_ABOVE
from screener.io import Failure, Source, discover, load, read_records, record_sources
from screener.io.records import reference_gap
from screener.pool.relax import Limits, Relaxed, relax, versions
from screener.pool.substitution import (
    DEFAULT_THRESHOLD,
    Candidate,
    Enumeration,
    Parent,
    enumerate_candidates,
    parent_of,
    reduced_formula,
)

MAX_ATOMS = 20
CHECKPOINT_SECONDS = 60.0
SOURCE = "screen generate: ionic substitution (Hautier et al. 2011) relaxed with CHGNet"
REJECTED_COLUMNS = ("jid", "parent", "formula", "substitution", "probability", "reason",
                    "detail", "energy_before", "energy_after", "volume_change", "steps",
                    "seconds")


@dataclass
class GenerateSummary:
    """What one call did. Candidate counts cover this call's enumeration; `n_pool` and
    `elements` the whole output file."""

    n_gapped: int = 0
    n_parents: int = 0
    enumeration: Enumeration | None = None
    n_selected: int = 0
    n_already: int = 0
    n_kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    n_lost: int = 0
    seconds: float = 0.0
    relax_seconds: float = 0.0
    workers: int = 1
    n_pool: int = 0
    elements: list[str] = field(default_factory=list)

    @property
    def n_relaxed(self) -> int:
        return self.n_kept + sum(self.rejected.values())


def rejected_path(out: str | Path) -> Path:
    """Where the rejections of `out` are kept: pool.json.gz -> pool.rejected.csv."""
    out = Path(out)
    stem = out.name.removesuffix(".gz").removesuffix(".json")
    return out.with_name(stem + ".rejected.csv")


def generate(parents: str | Path, out: str | Path, exclude: Iterable[str | Path] = (),
             max_atoms: int = MAX_ATOMS, threshold: float = DEFAULT_THRESHOLD,
             limit: int | None = None, seed: int = 0, limits: Limits | None = None,
             workers: int = 1, address: str | None = None,
             progress: bool = True) -> GenerateSummary:
    """Relax the first `limit` candidates of the gapped parents with at most `max_atoms` atoms
    (in the `seed` order) that `out` does not hold yet. No candidate has the composition of a
    structure in `parents` or in any `exclude` path (anything structures.discover reads)."""
    from tqdm import tqdm

    start = time.perf_counter()
    limits = limits or Limits()
    summary = GenerateSummary(workers=workers)
    records = read_records(parents)
    summary.n_gapped, chosen = select_parents(parents, records, max_atoms)
    summary.n_parents = len(chosen)
    known = known_formulas([parents, *exclude])
    summary.enumeration = enumerate_candidates(chosen, threshold, known)
    selected = in_order(summary.enumeration.candidates, seed)[:limit]
    kept, rejected = read_output(out)
    done = set(kept) | set(rejected)
    todo = [c for c in selected if c.jid not in done]
    summary.n_selected, summary.n_already = len(selected), len(selected) - len(todo)
    chgnet = versions() if todo else {}
    last = time.monotonic()
    try:
        with tqdm(total=len(todo), desc="generate", unit="candidate",
                  disable=not progress) as bar:
            for candidate, relaxed in _outcomes(todo, limits, workers, address, summary):
                _add(candidate, relaxed, limits, chgnet, kept, rejected, summary)
                bar.set_postfix(kept=summary.n_kept, rejected=sum(summary.rejected.values()),
                                refresh=False)
                bar.update()
                if time.monotonic() - last > CHECKPOINT_SECONDS:
                    write_output(out, kept, rejected)
                    last = time.monotonic()
    finally:
        write_output(out, kept, rejected)
    summary.seconds = time.perf_counter() - start
    summary.n_pool = len(kept)
    summary.elements = sorted({e for r in kept.values() for e in r["atoms"]["elements"]})
    return summary


def select_parents(path: str | Path, records: list, max_atoms: int) -> tuple[int, list[Parent]]:
    """(how many records have a JARVIS gap above GAPPED_ABOVE eV, at most `max_atoms` atoms
    and validate; those of them with oxidation states in the probability table)."""
    n_gapped, parents = 0, []
    for source, record in zip(record_sources(path, records), records):
        fields = record if isinstance(record, dict) else {}
        gap = reference_gap(fields)
        if not gap > GAPPED_ABOVE or len(source.record.get("elements") or ()) > max_atoms:
            continue
        structure = load(source)
        if isinstance(structure, Failure):
            continue
        n_gapped += 1
        parent = parent_of(structure, gap)
        if parent is not None:
            parents.append(parent)
    return n_gapped, parents


def known_formulas(paths: Iterable[str | Path]) -> frozenset[str]:
    """The reduced formula of every readable structure under `paths`."""
    return frozenset(reduced_formula(elements) for path in paths
                     for elements in map(_elements, discover(path)) if elements)


def _elements(source: Source) -> list[str]:
    """A record's element list as written (no validation needed for a formula); a file's as
    loaded; [] for an input that cannot be read."""
    if source.record is not None:
        elements = source.record.get("elements")
        return elements if isinstance(elements, list) else []
    structure = load(source)
    if isinstance(structure, Failure):
        return []
    from ase.data import chemical_symbols

    return [chemical_symbols[z] for z in structure.numbers.tolist()]


def in_order(candidates: list[Candidate], seed: int) -> list[Candidate]:
    """A random order fixed by (seed, id) alone, so it does not depend on which other
    candidates were enumerated, and a larger --limit extends a smaller one."""
    return sorted(candidates,
                  key=lambda c: hashlib.sha1(f"{seed}:{c.jid}".encode()).hexdigest())


def _outcomes(todo: list[Candidate], limits: Limits, workers: int, address: str | None,
              summary: GenerateSummary) -> Iterator[tuple[Candidate, Relaxed]]:
    """Relax in this process (one worker, no cluster) or as one-CPU Ray tasks, `workers` in
    flight. A task Ray loses is not recorded, so the next run tries that candidate again."""
    if workers == 1 and address is None:
        for candidate in todo:
            yield candidate, relax(candidate, limits)
        return
    import ray

    from screener.cluster import connect

    connect(address)
    task = ray.remote(num_cpus=1, max_retries=0)(relax)
    queue = iter(todo)
    in_flight = {task.remote(c, limits): c for c in itertools.islice(queue, workers)}
    while in_flight:
        [ready], _ = ray.wait(list(in_flight), num_returns=1)
        candidate = in_flight.pop(ready)
        try:
            relaxed = ray.get(ready)
        except ray.exceptions.RayError:
            summary.n_lost += 1
        else:
            yield candidate, relaxed
        for c in itertools.islice(queue, 1):
            in_flight[task.remote(c, limits)] = c


def _add(candidate: Candidate, relaxed: Relaxed, limits: Limits, chgnet: dict,
         kept: dict[str, dict], rejected: dict[str, dict], summary: GenerateSummary) -> None:
    summary.relax_seconds += relaxed.seconds
    if relaxed.reason is None:
        kept[candidate.jid] = jarvis_record(candidate, relaxed, limits, chgnet)
        summary.n_kept += 1
    else:
        rejected[candidate.jid] = _rejection(candidate, relaxed)
        summary.rejected[relaxed.reason] += 1


def jarvis_record(candidate: Candidate, relaxed: Relaxed, limits: Limits,
                  chgnet: dict) -> dict:
    """The relaxed candidate in the JARVIS `dft_3d` form (`jid`, `atoms` as jarvis-tools'
    Atoms.to_dict()) with its provenance under `generated`."""
    from jarvis.core.atoms import Atoms

    atoms = Atoms(lattice_mat=relaxed.lattice, coords=relaxed.frac,
                  elements=list(relaxed.elements), cartesian=False)
    return {"jid": candidate.jid, "atoms": dict(atoms.to_dict()),
            "source": SOURCE, "generated": {
                "parent": candidate.parent, "formula": candidate.formula,
                "substitution": candidate.substitution, "probability": candidate.probability,
                "volume_scale": candidate.volume_scale,
                "chgnet_energy_per_atom_before": relaxed.energy_before,
                "chgnet_energy_per_atom_after": relaxed.energy_after,
                "volume_change": relaxed.volume_change, "relaxation_steps": relaxed.steps,
                "relax_seconds": relaxed.seconds, "fmax": limits.fmax, **chgnet}}


def _rejection(candidate: Candidate, relaxed: Relaxed) -> dict:
    return {"jid": candidate.jid, "parent": candidate.parent, "formula": candidate.formula,
            "substitution": json.dumps(candidate.substitution),
            "probability": candidate.probability, "reason": relaxed.reason,
            "detail": relaxed.detail, "energy_before": relaxed.energy_before,
            "energy_after": relaxed.energy_after, "volume_change": relaxed.volume_change,
            "steps": relaxed.steps, "seconds": relaxed.seconds}


def read_output(out: str | Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """(kept records, rejection rows) by jid, from an earlier run's files where they exist."""
    out = Path(out)
    kept = {r["jid"]: r for r in read_records(out)} if out.exists() else {}
    path = rejected_path(out)
    rejected = {}
    if path.exists():
        with open(path, newline="") as f:
            rejected = {row["jid"]: row for row in csv.DictReader(f)}
    return kept, rejected


def write_output(out: str | Path, kept: dict[str, dict], rejected: dict[str, dict]) -> None:
    """Both files, sorted by jid, each replaced whole (tmp, fsync, rename). `out` is written
    only once it holds a record: the record reader refuses an empty list."""
    out = Path(out)
    if kept:
        data = json.dumps([kept[jid] for jid in sorted(kept)]).encode()
        _replace(out, gzip.compress(data, mtime=0) if out.name.endswith(".gz") else data)
    if rejected:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=REJECTED_COLUMNS)
        writer.writeheader()
        writer.writerows(rejected[jid] for jid in sorted(rejected))
        _replace(rejected_path(out), text.getvalue().encode())


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def throughput(summary: GenerateSummary) -> float:
    """Candidates relaxed per core-second of relaxation (each relaxation uses one core)."""
    return summary.n_relaxed / summary.relax_seconds if summary.relax_seconds else math.nan
