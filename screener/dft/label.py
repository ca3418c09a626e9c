"""Label structures with DFT (GPAW, see screener.dft.gpaw): one Ray task per structure, crash-safe.

A label costs minutes, so every finished structure, labelled or failed, is written at once to
`<out>.parts/` as a small JSON file (tmp + rename): a killed run loses only the calculations in
flight, and a rerun skips every structure that has a part. `export` turns the parts into the
training-set HDF5; an exported set found without its parts (a committed or copied file) is
turned back into parts first, so it resumes too. Each calculation runs in a child process of its
task, so a wall-time limit can kill it without taking the Ray worker, or the run, down with it.
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import ray

from screener.dft import acquire
from screener.dft.gpaw import Settings, calculate_with_timeout, missing_basis, provenance
from screener.errors import ScreenerError
from screener.io import Failure, Source, Structure, discover, load, read_records
from screener.io.files import atomic_path
from screener.io.records import JARVIS_GAP_KEY, parse_origin, reference_gap
from screener.training.dataset import (
    TrainingSet,
    read_structures,
    read_training_set,
    write_training_set,
)

ORDERS = ("input", "small-first", "gap-balanced", "uncertainty")
GAPPED_ABOVE = 0.1
STAGE = "label"
LOST = "Ray task lost"  # the worker or node died: not the structure's fault, so tried again
TIMEOUT = 600.0
_SETTINGS_FILE = "settings.json"
# training-set extra/<name> -> part key
_EXTRA_FLOATS = {"gpaw_gap": "gap", "vbm": "vbm", "cbm": "cbm", "e_fermi": "e_fermi",
                 "energy": "energy", "n_electrons": "n_electrons", "wall_time": "wall_time"}


@dataclass
class LabelSummary:
    """What one call did: counts over the selected structures, new work separately."""

    n_selected: int = 0
    n_already: int = 0
    n_labelled: int = 0
    n_failed: int = 0
    seconds: float = 0.0
    failures: list[Failure] = field(default_factory=list)
    exported: ExportSummary | None = None


@dataclass
class ExportSummary:
    path: Path
    n_labelled: int
    n_failed: int


def parts_dir(out: str | Path) -> Path:
    """The work folder of an output file: labels.h5 -> labels.h5.parts/."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def label(structures: str | Path, out: str | Path, settings: Settings | None = None, *,
          address: str | None = None, workers: int | None = None, timeout: float = TIMEOUT,
          limit: int | None = None, order: str = "input", retry_failed: bool = False,
          progress: bool = True, model: str | Path | None = None) -> LabelSummary:
    """Label the inputs found at `structures` (see read_inputs), in `order`, the first `limit`;
    order "uncertainty" asks `model` (screener.dft.acquire)."""
    labelled = labelled_numbers(out) if order == "uncertainty" else []
    return label_inputs(select(read_inputs(structures), order, limit, model, labelled), out,
                        settings, address=address, workers=workers, timeout=timeout,
                        retry_failed=retry_failed, progress=progress)


def label_inputs(selected: list[tuple[Structure | Failure, float]], out: str | Path,
                 settings: Settings | None = None, *, address: str | None = None,
                 workers: int | None = None, timeout: float = TIMEOUT,
                 retry_failed: bool = False, progress: bool = True) -> LabelSummary:
    """Label every input that has no part yet, then export all parts to `out`. A structure whose
    task Ray lost is tried again; other failures only with `retry_failed`."""
    from tqdm import tqdm

    require_gpaw()
    start = time.perf_counter()
    settings = settings or Settings()
    parts = parts_dir(out)
    adopt_export(out, settings)
    _check_settings(parts, settings)
    found = read_parts(parts)
    done = {p["id"] for p in found
            if p["status"] == "ok" or not (retry_failed or p["reason"].startswith(LOST))}
    n_already = sum(item.id in done for item, _ in selected)
    summary = LabelSummary(n_selected=len(selected), n_already=n_already)
    todo = [(item, ref_gap) for item, ref_gap in selected if item.id not in done]
    with tqdm(total=len(todo), desc="label", unit="structure", disable=not progress) as bar:
        def record(part: dict) -> None:
            _record(parts, part, summary)
            bar.set_postfix(done=summary.n_labelled, failed=summary.n_failed, refresh=False)
            bar.update()

        for item, ref_gap in todo:
            if isinstance(item, Failure):
                record(_failure_part(item, ref_gap, 0.0))
        structures_todo = [(item, gap) for item, gap in todo if not isinstance(item, Failure)]
        if structures_todo:
            _run_tasks(structures_todo, parts, settings, address, workers, timeout, record)
    summary.seconds = time.perf_counter() - start
    if summary.n_labelled or any(p["status"] == "ok" for p in found):
        summary.exported = export(out)
    return summary


def require_gpaw() -> None:
    """Fail at once, not as one failure per structure, where GPAW is not installed."""
    if find_spec("gpaw") is None:
        raise ScreenerError("DFT labels need GPAW, which is not installed: pip install -e '.[dft]'")


def read_inputs(path: str | Path) -> list[tuple[Structure | Failure, float]]:
    """(structure or why it cannot be read, JARVIS reference gap or NaN) per input.

    A .csv is a shortlist from `screen run` (columns id or ids, and source); anything else
    goes through screener.io.discover.
    """
    path = Path(path)
    is_csv = path.suffix.lower() == ".csv"
    return load_inputs(shortlist_sources(*_shortlist_columns(path)) if is_csv else discover(path))


def load_inputs(sources: Iterable[Source]) -> list[tuple[Structure | Failure, float]]:
    """Read each source in the driver: a label task gets its structure, not a file to find."""
    check = find_spec("gpaw") is not None
    return [(_with_basis(load(source)) if check else load(source), origin_gap(source.origin))
            for source in sources]


def _with_basis(item: Structure | Failure) -> Structure | Failure:
    """A structure GPAW has no basis for fails here: it costs no Ray task, and the element
    cover takes its other elements from their next structure. load_inputs asks only where
    GPAW is installed; without it label_inputs refuses the run."""
    if isinstance(item, Failure):
        return item
    missing = missing_basis(item.numbers.tolist())
    if not missing:
        return item
    return Failure(item.id, item.source, "label", f"no dzp basis in GPAW's data for {', '.join(missing)}")


def _shortlist_columns(path: Path) -> tuple[list[str], list[str]]:
    """The ids and sources of a shortlist CSV."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    key = "id" if rows and "id" in rows[0] else "ids"
    if rows and (key not in rows[0] or "source" not in rows[0]):
        raise ValueError(f"{path}: a shortlist needs an 'id' and a 'source' column, "
                         f"found {list(rows[0])}")
    return [row[key] for row in rows], [row["source"] for row in rows]


def shortlist_sources(ids: Iterable[str], origins: Iterable[str]) -> Iterator[Source]:
    """A Source per shortlisted structure: its file, or its record re-read from a JSON input."""
    for structure_id, origin in zip(ids, origins):
        record = _record_of(origin)
        atoms = None if record is None else record.get("atoms")
        if record is not None and not isinstance(atoms, dict):
            atoms = {}
        yield Source(str(structure_id), str(origin), atoms)


def origin_gap(origin: str) -> float:
    """The JARVIS optB88vdW gap of a JSON record input, NaN for files and unknown gaps."""
    record = _record_of(origin)
    return reference_gap(record) if record is not None else math.nan


def _record_of(origin: str) -> dict | None:
    """The full JSON record behind a 'file.json.gz[17]' origin; None for other inputs."""
    found = parse_origin(origin)
    if found is None:
        return None
    file, index = found
    records = _records(file)
    record = records[index] if index < len(records) else {}
    return record if isinstance(record, dict) else {}


@cache
def _records(file: str) -> list:
    """Read once per file, not once per record: a JARVIS file holds tens of thousands."""
    return read_records(file)


def select(items: list[tuple[Structure | Failure, float]], order: str, limit: int | None,
           model: str | Path | None = None, labelled: Sequence[np.ndarray] = ()
           ) -> list[tuple[Structure | Failure, float]]:
    """Put the inputs in `order` and keep the first `limit`; failures first, they cost nothing.
    "uncertainty" needs `model`, and breaks its ties by the elements of `labelled`."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    if (order == "uncertainty") != (model is not None):
        raise ValueError("a model is needed for, and only for, --order uncertainty")
    failed = [item for item in items if isinstance(item[0], Failure)]
    good = [item for item in items if not isinstance(item[0], Failure)]
    if order == "small-first":
        good = small_first(good)
    elif order == "gap-balanced":
        good = gap_balanced(good)
    elif order == "uncertainty":
        good = uncertainty_first(good, model, labelled)
    return (failed + good)[:limit]


def uncertainty_first(items: list[tuple[Structure, float]], model: str | Path,
                      labelled: Sequence[np.ndarray]) -> list[tuple[Structure, float]]:
    """Where the model's gap ensemble disagrees most first (screener.acquire)."""
    structures = [item for item, _ in items]
    scores = acquire.ensemble_disagreement(model, structures)
    order = acquire.uncertainty_order(scores, [s.numbers for s in structures],
                                      acquire.element_counts(labelled))
    return [items[i] for i in order]


def labelled_numbers(out: str | Path) -> list[np.ndarray]:
    """Atomic numbers of each structure labelled into `out` so far (its parts, else the file)."""
    found = [p for p in read_parts(parts_dir(out)) if p["status"] == "ok"]
    if found:
        return [np.asarray(p["numbers"]) for p in found]
    if Path(out).exists():
        return [s.numbers for s in read_structures(out)]
    return []


def small_first(items: list[tuple[Structure, float]]) -> list[tuple[Structure, float]]:
    """Each element's smallest structure first (element_cover), then the rest by size.

    DFT time grows steeply with cell size, so small cells give the most labels per hour; the
    cover puts every element of the input into the set early, also those that only come in
    large cells, which a plain size order would reach last.
    """
    cover, rest = element_cover(items)
    return cover + rest


def gap_balanced(items: list[tuple[Structure, float]]) -> list[tuple[Structure, float]]:
    """The element cover, then the rest by size, alternating a reference-gapped structure and
    an other one.

    Most small JARVIS cells are metals; a set labelled purely small-first teaches the model
    that everything is metallic, while screening asks for gaps. Alternating on the JARVIS gap
    (above GAPPED_ABOVE eV) keeps both classes growing together for as long as both last.
    """
    cover, rest = element_cover(items)
    gapped = [item for item in rest if item[1] > GAPPED_ABOVE]
    other = [item for item in rest if not item[1] > GAPPED_ABOVE]
    pairs = itertools.zip_longest(gapped, other)
    return cover + [item for pair in pairs for item in pair if item is not None]


def element_cover(items: list[tuple[Structure, float]]
                  ) -> tuple[list[tuple[Structure, float]], list[tuple[Structure, float]]]:
    """(structures that bring an element first, the rest), each by size, fewest atoms first.

    Among equal sizes, the structure bringing the most unseen elements goes first, so the
    cover stays small and its first labels spread over as much chemistry as the sizes allow.
    """
    cover, rest, seen = [], [], set()
    by_size = sorted(items, key=lambda item: (item[0].n_atoms, item[0].id))
    for _, band in itertools.groupby(by_size, key=lambda item: item[0].n_atoms):
        band = [(item, set(item[0].numbers.tolist())) for item in band]
        while band:
            best = max(range(len(band)), key=lambda i: len(band[i][1] - seen))
            if not band[best][1] - seen:
                break
            item, elements = band.pop(best)
            cover.append(item)
            seen |= elements
        rest.extend(item for item, _ in band)
    return cover, rest


def _run_tasks(todo: list[tuple[Structure, float]], parts: Path, settings: Settings,
               address: str | None, workers: int | None, timeout: float,
               record: Callable[[dict], None]) -> None:
    """Keep `workers` tasks in flight (one CPU each) and record each result as it arrives.

    A task that Ray itself loses (its worker or node died) becomes that structure's failure, for
    this run only: the next run tries it again. When the driver's own raylet dies, no task can
    start any more: the calculations already running are still collected, then the run stops
    with an error instead of marking every queued structure lost.
    """
    from screener.cluster import connect

    connect(address)
    slots = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    logs = str(parts / "logs")
    queue = iter(todo)
    in_flight = {}
    raylet_died: ray.exceptions.LocalRayletDiedError | None = None
    for item in itertools.islice(queue, slots):
        in_flight[label_task.remote(*item, settings, timeout, logs)] = item
    while in_flight:
        [ready], _ = ray.wait(list(in_flight), num_returns=1)
        structure, ref_gap = in_flight.pop(ready)
        try:
            record(ray.get(ready))
        except ray.exceptions.LocalRayletDiedError as error:
            raylet_died = error
        except ray.exceptions.RayError as error:
            failure = Failure(structure.id, structure.source, STAGE, f"{LOST}: {error}")
            record(_failure_part(failure, ref_gap, 0.0, structure))
        if raylet_died is None:
            for item in itertools.islice(queue, 1):
                in_flight[label_task.remote(*item, settings, timeout, logs)] = item
    if raylet_died is not None:
        raise ScreenerError(f"this machine's Ray node stopped ({raylet_died}); every finished "
                            f"structure is kept in {parts}/ and a rerun labels the rest")


@ray.remote(num_cpus=1, max_retries=0)
def label_task(structure: Structure, ref_gap: float, settings: Settings, timeout: float,
               logs: str) -> dict:
    """One structure's part. Its GPAW log is kept (in `logs`, on the worker) only on failure."""
    start = time.perf_counter()
    log = Path(logs) / f"{_key(structure.id)}.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    result = calculate_with_timeout(structure, settings, timeout, str(log))
    if isinstance(result, str):
        failure = Failure(structure.id, structure.source, STAGE, f"{result} (log: {log})")
        return _failure_part(failure, ref_gap, time.perf_counter() - start, structure)
    log.unlink(missing_ok=True)
    fields = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in asdict(result).items()}
    return {**_structure_fields(structure), "status": "ok", "ref_gap": ref_gap, **fields}


def _structure_fields(structure: Structure) -> dict:
    return {"id": structure.id, "source": structure.source,
            "lattice": structure.lattice.tolist(), "positions": structure.positions.tolist(),
            "numbers": structure.numbers.tolist()}


def _failure_part(failure: Failure, ref_gap: float, wall_time: float,
                  structure: Structure | None = None) -> dict:
    fields = _structure_fields(structure) if structure is not None else {}
    return {**fields, "id": failure.id, "source": failure.source, "status": "failed",
            "stage": failure.stage, "reason": failure.reason, "ref_gap": ref_gap,
            "wall_time": wall_time}


def _record(parts: Path, part: dict, summary: LabelSummary) -> None:
    write_part(parts, part)
    if part["status"] == "ok":
        summary.n_labelled += 1
    else:
        summary.n_failed += 1
        summary.failures.append(_as_failure(part))


def _key(structure_id: str) -> str:
    """A file name for any id: ids may hold '/' (folder inputs) or be very long."""
    return hashlib.sha1(structure_id.encode()).hexdigest()[:20]


def _part_path(parts: Path, structure_id: str) -> Path:
    return parts / f"{_key(structure_id)}.json"


def write_part(parts: Path, part: dict) -> None:
    """Write one structure's part durably (io.files.atomic_path)."""
    parts.mkdir(parents=True, exist_ok=True)
    with atomic_path(_part_path(parts, part["id"])) as tmp, open(tmp, "w") as f:
        json.dump(part, f)


def read_part(parts: Path, structure_id: str) -> dict:
    """One structure's finished part; FileNotFoundError if it has none."""
    with open(_part_path(parts, structure_id)) as f:
        return json.load(f)


def read_parts(parts: Path) -> list[dict]:
    """Every finished part, sorted by id (the order of the exported training set)."""
    if not parts.is_dir():
        return []
    found = []
    for path in parts.glob("*.json"):
        if path.name != _SETTINGS_FILE:
            with open(path) as f:
                found.append(json.load(f))
    return sorted(found, key=lambda part: part["id"])


def _check_settings(parts: Path, settings: Settings) -> None:
    """Refuse to resume with other settings: one training set, one level of theory."""
    parts.mkdir(parents=True, exist_ok=True)
    path = parts / _SETTINGS_FILE
    wanted = asdict(settings)
    if path.exists():
        _refuse_other_settings(parts, json.loads(path.read_text()), wanted)
    else:
        path.write_text(json.dumps(wanted))


def _refuse_other_settings(where: Path, stored: dict | None, wanted: dict) -> None:
    if stored != wanted:
        raise ValueError(f"{where} was labelled with {stored}, not {wanted}: use another output "
                         "or the same settings")


def _as_failure(part: dict) -> Failure:
    return Failure(part["id"], part["source"], part["stage"], part["reason"])


def export(out: str | Path) -> ExportSummary:
    """Consolidate the parts into the training set `out`; failures go to `<out>.failures.csv`."""
    out = Path(out)
    parts = parts_dir(out)
    found = read_parts(parts)
    ok = [p for p in found if p["status"] == "ok"]
    failed = [_as_failure(p) for p in found if p["status"] != "ok"]
    if not ok:
        raise ValueError(f"{parts}: no labelled structure to export")
    settings = Settings(**json.loads((parts / _SETTINGS_FILE).read_text()))
    structures = [Structure(p["id"], p["source"], np.array(p["lattice"]),
                            np.array(p["positions"]).reshape(-1, 3),
                            np.array(p["numbers"], dtype=np.int64)) for p in ok]
    meta = {**provenance(settings), "source": f"screen label ({parts})",
            "ref_gap": f"JARVIS {JARVIS_GAP_KEY} of the input record, NaN where it has none",
            "n_failed": len(failed)}
    write_training_set(out, structures, np.array([p["dos"] for p in ok]),
                       np.array([p["ref_gap"] for p in ok], dtype=np.float32), meta,
                       extra=_extra(ok))
    _write_failures(_failures_path(out), failed)
    return ExportSummary(out, len(ok), len(failed))


def adopt_export(out: str | Path, settings: Settings) -> int:
    """Write a part for each structure, labelled or failed, that the exported `out` (and its
    failures csv) holds and `out`'s parts folder lacks; return how many.

    Without this a fresh clone of a committed training set would label it all again, and its
    first export would overwrite the file with only the new structures.
    """
    out = Path(out)
    if not out.exists():
        return 0
    data = read_training_set(out, graphs=False)
    _refuse_other_settings(out, data.attrs.get("settings"), asdict(settings))
    parts = parts_dir(out)
    _check_settings(parts, settings)
    have = {p["id"] for p in read_parts(parts)}
    adopted = [p for p in _failed_parts(out) if p["id"] not in have]
    if not have.issuperset(data.ids):
        adopted += _exported_parts(out, data, have)
    for part in adopted:
        write_part(parts, part)
    return len(adopted)


def _exported_parts(out: Path, data: TrainingSet, skip: set[str]) -> Iterator[dict]:
    """A part per structure of the file whose id is not in `skip`."""
    for i, structure in enumerate(read_structures(out)):
        if structure.id in skip:
            continue
        label = {key: data.extra[name][i].tolist() for name, key in _EXTRA_FLOATS.items()}
        yield {**_structure_fields(structure), "status": "ok", "ref_gap": float(data.ref_gap[i]),
               "dos": data.dos[i].tolist(), "kpts": data.extra["kpts"][i].tolist(), **label}


def _failed_parts(out: Path) -> Iterator[dict]:
    path = _failures_path(out)
    if path.exists():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                failure = Failure(row["id"], row["source"], row["stage"], row["reason"])
                yield _failure_part(failure, math.nan, 0.0)


def _failures_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".h5") + ".failures.csv")


def _extra(ok: list[dict]) -> dict[str, np.ndarray]:
    """Per-structure DFT results beside the DOS: eV, relative to the energy zero e_fermi."""
    extra = {name: np.array([p[key] for p in ok]) for name, key in _EXTRA_FLOATS.items()}
    extra["kpts"] = np.array([p["kpts"] for p in ok], dtype=np.int64)
    return extra


def _write_failures(path: Path, failed: list[Failure]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "source", "stage", "reason"])
        writer.writerows([f.id, f.source, f.stage, f.reason] for f in failed)
