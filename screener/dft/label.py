"""Label structures with DFT (GPAW, see screener.dft.gpaw): one Ray task per structure, crash-safe.

`out` is a label root: labels of this level of theory go to `<out>/<gpaw.LEVEL>/` as immutable
parts (screener.training.label_store), one new part per run. A label costs minutes, so each finished
structure, labelled or failed, is first written alone to the work folder
`<out>/<gpaw.LEVEL>.work/` (JSON, tmp + rename): a killed run loses only the calculations in
flight, and a rerun skips every structure that has a result there or in a part; `export` turns
the work folder into the next part. Each calculation runs in a child process of its task, so a
wall-time limit can kill it without taking the Ray worker, or the run, down with it.
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
from datetime import datetime, timezone
from functools import cache
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import ray

from screener.dft import acquire
from screener.dft.gpaw import (
    LEVEL,
    Settings,
    calculate_with_timeout,
    missing_basis,
    provenance,
    spin_mode,
)
from screener.dos import N_BINS
from screener.errors import ScreenerError
from screener.io import Failure, Source, Structure, discover, load, read_records
from screener.io.files import atomic_path
from screener.io.records import JARVIS_GAP_KEY, parse_origin, reference_gap
from screener.training import label_store
from screener.training.dataset import read_structures, read_training_set

ORDERS = ("input", "small-first", "gap-balanced", "uncertainty")
GAPPED_ABOVE = 0.1
STAGE = "label"
LOST = "Ray task lost"  # the worker or node died: not the structure's fault, so tried again
TIMEOUT = 600.0
_SETTINGS_FILE = "settings.json"
# label_store extra/<name> -> key of a work-folder result
_EXTRA = {"gpaw_gap": "gap", **{name: name for name in label_store.EXTRA if name != "gpaw_gap"}}


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


def level_dir(out: str | Path) -> Path:
    """The label folder of this level of theory under the label root `out`."""
    return Path(out) / LEVEL


def work_dir(level: Path) -> Path:
    """Where a run keeps each finished structure until it is exported: <level>.work/."""
    return level.with_name(level.name + ".work")


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
    """Label every input without a current label or failure under the label root `out`, then
    add what finished as a new part. A structure whose task Ray lost is tried again; other
    failures only with `retry_failed`; labels whose spin mode `settings` no longer choose
    (see _needs_label) are redone."""
    from tqdm import tqdm

    require_gpaw()
    start = time.perf_counter()
    settings = settings or Settings()
    work = work_dir(level_dir(out))
    _check_settings(level_dir(out), work, settings)
    done = {structure_id for structure_id, result in latest_results(out).items()
            if not _needs_label(result, settings, retry_failed)}
    n_already = sum(item.id in done for item, _ in selected)
    summary = LabelSummary(n_selected=len(selected), n_already=n_already)
    todo = [(item, ref_gap) for item, ref_gap in selected if item.id not in done]
    with tqdm(total=len(todo), desc="label", unit="structure", disable=not progress) as bar:
        def record(result: dict) -> None:
            _record(work, result, summary)
            bar.set_postfix(done=summary.n_labelled, failed=summary.n_failed, refresh=False)
            bar.update()

        for item, ref_gap in todo:
            if isinstance(item, Failure):
                record(_failure_result(item, ref_gap, 0.0))
        structures_todo = [(item, gap) for item, gap in todo if not isinstance(item, Failure)]
        if structures_todo:
            _run_tasks(structures_todo, work, settings, address, workers, timeout, record)
    summary.seconds = time.perf_counter() - start
    if any(map(_exportable, read_results(work))):
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
    """Where the model's gap ensemble disagrees most first (screener.dft.acquire)."""
    structures = [item for item, _ in items]
    scores = acquire.ensemble_disagreement(model, structures)
    order = acquire.uncertainty_order(scores, [s.numbers for s in structures],
                                      acquire.element_counts(labelled))
    return [items[i] for i in order]


def labelled_numbers(out: str | Path) -> list[np.ndarray]:
    """Atomic numbers of each structure labelled under the label root `out` so far."""
    return [np.asarray(r["numbers"]) for r in latest_results(out).values() if r["status"] == "ok"]


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


def _run_tasks(todo: list[tuple[Structure, float]], work: Path, settings: Settings,
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
    logs = str(work / "logs")
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
            record(_failure_result(failure, ref_gap, 0.0, structure))
        if raylet_died is None:
            for item in itertools.islice(queue, 1):
                in_flight[label_task.remote(*item, settings, timeout, logs)] = item
    if raylet_died is not None:
        raise ScreenerError(f"this machine's Ray node stopped ({raylet_died}); every finished "
                            f"structure is kept in {work}/ and a rerun labels the rest")


@ray.remote(num_cpus=1, max_retries=0)
def label_task(structure: Structure, ref_gap: float, settings: Settings, timeout: float,
               logs: str) -> dict:
    """One structure's result. Its GPAW log is kept (in `logs`, on the worker) only on failure."""
    start = time.perf_counter()
    log = Path(logs) / f"{_key(structure.id)}.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    result = calculate_with_timeout(structure, settings, timeout, str(log))
    if isinstance(result, str):
        failure = Failure(structure.id, structure.source, STAGE, f"{result} (log: {log})")
        return _failure_result(failure, ref_gap, time.perf_counter() - start, structure)
    log.unlink(missing_ok=True)
    fields = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in asdict(result).items()}
    return {**_structure_fields(structure), "status": "ok", "ref_gap": ref_gap, **fields,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _structure_fields(structure: Structure) -> dict:
    return {"id": structure.id, "source": structure.source,
            "lattice": structure.lattice.tolist(), "positions": structure.positions.tolist(),
            "numbers": structure.numbers.tolist()}


def _failure_result(failure: Failure, ref_gap: float, wall_time: float,
                  structure: Structure | None = None) -> dict:
    fields = _structure_fields(structure) if structure is not None else {}
    return {**fields, "id": failure.id, "source": failure.source, "status": "failed",
            "stage": failure.stage, "reason": failure.reason, "ref_gap": ref_gap,
            "wall_time": wall_time}


def _record(work: Path, result: dict, summary: LabelSummary) -> None:
    write_result(work, result)
    if result["status"] == "ok":
        summary.n_labelled += 1
    else:
        summary.n_failed += 1
        summary.failures.append(_as_failure(result))


def _key(structure_id: str) -> str:
    """A file name for any id: ids may hold '/' (folder inputs) or be very long."""
    return hashlib.sha1(structure_id.encode()).hexdigest()[:20]


def _result_path(work: Path, structure_id: str) -> Path:
    return work / f"{_key(structure_id)}.json"


def write_result(work: Path, result: dict) -> None:
    """Write one structure's result durably (io.files.atomic_path)."""
    work.mkdir(parents=True, exist_ok=True)
    with atomic_path(_result_path(work, result["id"])) as tmp, open(tmp, "w") as f:
        json.dump(result, f)


def read_results(work: Path) -> list[dict]:
    """Every result in the work folder, sorted by id."""
    if not work.is_dir():
        return []
    found = []
    for path in work.glob("*.json"):
        if path.name != _SETTINGS_FILE:
            with open(path) as f:
                found.append(json.load(f))
    return sorted(found, key=lambda result: result["id"])


def latest_results(out: str | Path) -> dict[str, dict]:
    """Per structure id, its newest entry under the label root `out`: a work-folder result, else
    the newest label or later failure of the parts, with the keys the resume rule reads
    (status, gap, spin, numbers; stage and reason of a failure)."""
    level = level_dir(out)
    latest: dict[str, dict] = {}
    if label_store.part_paths(level):
        found = label_store.newest(level)
        for structure_id, p, r in zip(found.ids.tolist(), found.part, found.row):
            records = found.parts[p].records
            latest[structure_id] = {
                "id": structure_id, "status": "ok", "gap": float(records.extra["gpaw_gap"][r]),
                "spin": str(records.extra["spin"][r]),
                "numbers": records.structures[r].numbers.tolist()}
        for failure in found.failed.values():
            latest[failure.id] = _failure_result(failure, math.nan, 0.0)
    latest.update((result["id"], result) for result in read_results(work_dir(level)))
    return latest


def _needs_label(result: dict, settings: Settings, retry_failed: bool) -> bool:
    """A label is redone when `settings` now choose another spin mode for it (an unpolarized
    label of a cell with magnetic elements); a failure with --retry-failed or a lost task."""
    if result["status"] == "ok":
        return result["spin"] != spin_mode(settings, result["numbers"])
    return retry_failed or result["reason"].startswith(LOST)


def _check_settings(level: Path, work: Path, settings: Settings) -> None:
    """Refuse to mix levels of theory: the folder's parts must share every setting but the spin
    rule (which only decides which labels are redone), and unexported work all of them."""
    _check_level(level, settings)
    wanted = asdict(settings)
    path = work / _SETTINGS_FILE
    if path.exists() and read_results(work):
        _refuse_other_settings(work, json.loads(path.read_text()), wanted)
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(wanted))


def _check_level(level: Path, settings: Settings) -> None:
    paths = label_store.part_paths(level)
    if paths:
        stored = label_store.read_part(paths[-1]).provenance["settings"]
        _refuse_other_settings(level, stored, asdict(settings), ignore=("spin",))


def _refuse_other_settings(where: Path, stored: dict, wanted: dict, ignore=()) -> None:
    def level(settings: dict) -> dict:
        return {k: v for k, v in settings.items() if k not in ignore}

    if level(stored) != level(wanted):
        raise ValueError(f"{where} was labelled with {stored}, not {wanted}: use another output "
                         "or the same settings")


def _as_failure(result: dict) -> Failure:
    return Failure(result["id"], result["source"], result["stage"], result["reason"])


def export(out: str | Path) -> ExportSummary:
    """Add the work folder's results to the label folder as a new part, then clear them;
    a lost task is left out (_exportable), so the next run redoes it."""
    level = level_dir(out)
    work = work_dir(level)
    results = [r for r in read_results(work) if _exportable(r)]
    if not results:
        raise ValueError(f"{work}: no finished structure to export")
    settings = Settings(**json.loads((work / _SETTINGS_FILE).read_text()))
    ok = [r for r in results if r["status"] == "ok"]
    failed = [_as_failure(r) for r in results if r["status"] != "ok"]
    path = label_store.write_part(level, _part_records(ok), failed, _provenance(settings))
    for result in read_results(work):
        _result_path(work, result["id"]).unlink()
    return ExportSummary(path, len(ok), len(failed))


def _exportable(result: dict) -> bool:
    """A lost task says nothing about the structure: it stays out of the parts."""
    return result["status"] == "ok" or not result["reason"].startswith(LOST)


def _part_records(ok: list[dict]) -> label_store.Records:
    structures = [Structure(r["id"], r["source"], np.array(r["lattice"]),
                            np.array(r["positions"]).reshape(-1, 3),
                            np.array(r["numbers"], dtype=np.int64)) for r in ok]
    extra = {name: np.array([r[key] for r in ok]) for name, key in _EXTRA.items()}
    return label_store.Records(structures, np.array([r["dos"] for r in ok]).reshape(-1, N_BINS),
                               np.array([r["ref_gap"] for r in ok]), extra)


def _provenance(settings: Settings) -> dict:
    return {**provenance(settings), "source": "screen label",
            "ref_gap": f"JARVIS {JARVIS_GAP_KEY} of the input record, NaN where it has none"}


def import_training_set(path: str | Path, out: str | Path) -> ExportSummary:
    """A training set exported by an earlier `screen label` (one .h5 and its .failures.csv,
    spin-unpolarized) as a new part of the label root `out`."""
    path = Path(path)
    data = read_training_set(path, graphs=False)
    settings = Settings(**{**data.attrs["settings"], "spin": "unpolarized"})
    n = len(data.ids)
    extra = {name: data.extra[name] for name in _EXTRA if name in data.extra}
    extra.update(cpu_time=np.full(n, np.nan), magmom=np.zeros(n),
                 spin=np.full(n, "unpolarized"), finished=np.full(n, data.attrs["created"]))
    records = label_store.Records(read_structures(path), data.dos, data.ref_gap, extra)
    failures = _read_failures_csv(path.with_name(path.name.removesuffix(".h5") + ".failures.csv"))
    level = level_dir(out)
    _check_level(level, settings)
    part = label_store.write_part(level, records, failures,
                                  {**_provenance(settings), "source": f"imported from {path}"})
    return ExportSummary(part, n, len(failures))


def _read_failures_csv(path: Path) -> list[Failure]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [Failure(row["id"], row["source"], row["stage"], row["reason"])
                for row in csv.DictReader(f)]
