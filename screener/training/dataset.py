"""Training sets: structures, their graphs and DOS targets in one versioned HDF5 file.

Three sources end in the same `Labelled` value: the JARVIS `edos_pdos` download, any JSON file
of JARVIS-form records with `edos_up`, and folders of VASP runs. Records that cannot be used
are returned as `Failure`s, never dropped silently. Layout: schemas/training_set.json.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from screener.dos import N_BINS, normalize, to_grid, valence_electrons
from screener.errors import ScreenerError
from screener.graphs import build_graph
from screener.io import Failure, Source, Structure, load, read_records
from screener.io.files import atomic_path, file_sha256, portable_path
from screener.io.records import (
    JARVIS_GAP_KEY,
    record_id,
    record_origin,
    reference_gap,
    reference_gaps,
)
from screener.results.hdf5 import (
    ATTRS_SHA256,
    LIBVER,
    SchemaError,
    attrs_digest,
    create_dataset,
    damage_named,
    read_graphs,
    screener_version,
    write_graphs,
)

SCHEMA_VERSION = 1
KIND = "training_set"
SPLITS = ("train", "val", "test")
FRACTIONS = (0.7, 0.1, 0.2)
# How split_by_id assigns structures; recorded with every split it makes (older sets and
# gap-set metas, without it, were split by row position).
SPLIT_METHOD = "id-hash"
# One seed for labelled sets and gap sets alike: a structure that moves from the gap set into
# the labelled set when it gets a spectrum keeps its part, so nothing trained on as a gap is
# later tested on as a spectrum.
SPLIT_SEED = 0
EDOS_DATASET = "edos_pdos"
JARVIS_THEORY = "DFT, VASP, OptB88vdW (JARVIS-DFT)"


class DownloadError(ScreenerError, RuntimeError):
    """The JARVIS download failed; the message says where to put the file by hand."""


class RecordFileError(ScreenerError, ValueError):
    """A JSON record file whose content is not a list of records; the message names the file."""


@dataclass
class TrainingSet:
    """A training set as read back: arrays by structure, in file order."""

    ids: np.ndarray
    graphs: list[dict]
    dos: np.ndarray
    ref_gap: np.ndarray
    formula: np.ndarray
    split: dict[str, np.ndarray] | None
    attrs: dict
    extra: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Labelled:
    """What one data source yields: usable structures with targets, and what it had to skip."""

    structures: list[Structure]
    dos: np.ndarray
    ref_gap: np.ndarray
    provenance: dict
    skipped: list[Failure]
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def split_by_id(ids: Iterable[str], seed: int = SPLIT_SEED, fractions=FRACTIONS) -> dict[str, np.ndarray]:
    """Seeded train/val/test split that follows each structure's id, not its row.

    A structure's part comes from a hash of (seed, id) alone, so a set that grows keeps every
    structure where it was: a model's test structures stay unseen by the next model's training,
    and test sets of successive versions nest. Sizes follow `fractions` up to sampling noise.
    For n >= 3 no part with a positive fraction is left empty: the row whose hash lies nearest
    it moves there, so early stopping and evaluation always have something to measure.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    position = np.array([_unit_hash(seed, structure_id) for structure_id in ids])
    edges = np.cumsum(fractions)
    part = np.minimum(np.searchsorted(edges, position, side="right"), len(SPLITS) - 1)
    if len(position) >= 3:
        for k in np.flatnonzero(np.array(fractions) > 0):
            if not (part == k).any():
                donors = np.flatnonzero(part == np.bincount(part, minlength=len(SPLITS)).argmax())
                centre = edges[k] - fractions[k] / 2
                part[donors[np.abs(position[donors] - centre).argmin()]] = k
    return {name: np.flatnonzero(part == k) for k, name in enumerate(SPLITS)}


def _unit_hash(seed: int, structure_id: str) -> float:
    """A number in [0, 1) fixed by (seed, id)."""
    digest = hashlib.sha256(f"{seed}\0{structure_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def write_training_set(path: str | Path, structures: list[Structure], dos: np.ndarray,
                       ref_gap: np.ndarray, provenance: dict, *,
                       extra: dict[str, np.ndarray] | None = None, seed: int = SPLIT_SEED) -> None:
    """Build every graph and write the set atomically (tmp file + rename), split included."""
    path = Path(path)
    dos = np.asarray(dos, dtype=np.float32)
    ref_gap = np.asarray(ref_gap, dtype=np.float32)
    extra = {name: np.asarray(values) for name, values in (extra or {}).items()}
    _check_inputs(structures, dos, ref_gap, extra)
    graphs = [build_graph(s.lattice, s.positions, s.numbers)
              for s in tqdm(structures, desc="graphs", unit="structure", disable=None)]
    with atomic_path(path) as tmp, h5py.File(tmp, "w", libver=LIBVER) as f:
        _write(f, structures, graphs, dos, ref_gap, provenance, extra, seed)


def _check_inputs(structures, dos, ref_gap, extra) -> None:
    n = len(structures)
    if n == 0:
        raise ValueError("no structures to write")
    if dos.shape != (n, N_BINS):
        raise ValueError(f"dos has shape {dos.shape}, expected ({n}, {N_BINS})")
    if ref_gap.shape != (n,):
        raise ValueError(f"ref_gap has shape {ref_gap.shape}, expected ({n},)")
    for name, values in extra.items():
        if len(values) != n:
            raise ValueError(f"extra[{name!r}] has {len(values)} rows, expected {n}")
    ids = [s.id for s in structures]
    if len(set(ids)) != n:
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"duplicate structure ids: {repeated[:5]}")


# What write_training_set records itself, beside the provenance it is given.
_WRITTEN_ATTRS = ("kind", "schema_version", "n_structures", "created", "screener_version",
                  ATTRS_SHA256, "split_seed", "split_method")


def _write(f: h5py.File, structures, graphs, dos, ref_gap, provenance, extra, seed) -> None:
    """Every dataset under the shards' checksums (create_dataset)."""
    f.attrs.update(kind=KIND, schema_version=SCHEMA_VERSION, n_structures=len(structures),
                   created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   screener_version=screener_version(), provenance=json.dumps(provenance))
    create_dataset(f, "ids", [s.id for s in structures], {})
    create_dataset(f, "formula", [s.formula for s in structures], {})
    create_dataset(f, "dos", dos, {"compression": "gzip", "chunks": (min(len(dos), 256), N_BINS)})
    create_dataset(f, "ref_gap", ref_gap, {})
    write_structures(f.create_group("structures"), structures)
    write_graphs(f.create_group("graphs"), graphs)
    split = f.create_group("split")
    split.attrs.update(seed=seed, fractions=FRACTIONS, method=SPLIT_METHOD)
    for name, indices in split_by_id([s.id for s in structures], seed).items():
        create_dataset(split, name, indices.astype(np.int64), {})
    group = f.create_group("extra")
    for name, values in extra.items():
        create_dataset(group, name, values, {})
    f.attrs[ATTRS_SHA256] = np.bytes_(attrs_digest(f.attrs))


def write_structures(group: h5py.Group, structures: list[Structure]) -> None:
    """Cells as ragged arrays, so graphs can be rebuilt (another k, a fixed graph builder)."""
    sizes = np.array([len(s.numbers) for s in structures], dtype=np.int64)
    create_dataset(group, "lattice",
                   np.array([s.lattice for s in structures], np.float64).reshape(-1, 3, 3), {})
    create_dataset(group, "positions",
                   np.concatenate([np.empty((0, 3))] + [s.positions for s in structures]),
                   {"compression": "gzip"})
    create_dataset(group, "numbers",
                   np.concatenate([np.empty(0, np.int64)] + [s.numbers for s in structures]),
                   {"compression": "gzip"})
    create_dataset(group, "atom_offsets", np.concatenate([[0], np.cumsum(sizes)]), {})


def write_subset(data: str | Path, train_rows: np.ndarray, path: str | Path, note: dict) -> None:
    """`data` with only `train_rows` of its training split and all of validation and test.

    Splits follow ids, so the subset's validation and test structures are the full set's, and
    models trained on different subsets are scored on the same structures. `note` joins the
    provenance, saying how the rows were chosen.
    """
    ts = read_training_set(data, graphs=False)
    if ts.attrs["split_method"] != SPLIT_METHOD:
        raise ValueError(f"{data} is split by {ts.attrs['split_method']}: a subset would get "
                         "other validation and test structures; export it again")
    if not np.isin(train_rows, ts.split["train"]).all():
        raise ValueError("a subset keeps training rows only from the training split")
    keep = np.sort(np.concatenate([train_rows, ts.split["val"], ts.split["test"]]))
    provenance = {k: v for k, v in ts.attrs.items() if k not in _WRITTEN_ATTRS}
    structures = read_structures(data)
    write_training_set(path, [structures[i] for i in keep], ts.dos[keep], ts.ref_gap[keep],
                       {**provenance, "subset_of": str(data), **note},
                       extra={name: values[keep] for name, values in ts.extra.items()},
                       seed=int(ts.attrs["split_seed"]))


def read_training_set(path: str | Path, graphs: bool = True) -> TrainingSet:
    """The whole set, from a file or a label folder (screener.label_store); `graphs=False`
    skips the large graph arrays (see `read_set_graphs`)."""
    if Path(path).is_dir():
        from screener.training import label_store  # it builds on this module

        return label_store.read_label_set(path, graphs)
    with _open(path) as f:
        split = f["split"]
        return TrainingSet(
            ids=f["ids"].asstr()[()].astype(str),
            graphs=read_graphs(f["graphs"]) if graphs else [],
            dos=f["dos"][()],
            ref_gap=f["ref_gap"][()],
            formula=f["formula"].asstr()[()].astype(str),
            split={name: split[name][()] for name in SPLITS},
            attrs={**json.loads(f.attrs["provenance"]), "split_seed": int(split.attrs["seed"]),
                   "split_method": str(split.attrs.get("method", "row position")),
                   **{k: _plain(v) for k, v in f.attrs.items() if k != "provenance"}},
            extra={name: values[()] for name, values in f["extra"].items()},
        )


def read_set_graphs(path: str | Path, indices: np.ndarray) -> list[dict]:
    """Graphs of some structures only, so each training worker holds just its own part.

    Copies, since read_graphs returns views into the whole span it read.
    """
    if Path(path).is_dir():
        from screener.training import label_store

        return label_store.read_label_graphs(path, indices)
    with _open(path) as f:
        graphs = read_graphs(f["graphs"], np.asarray(indices))
    return [{name: array.copy() for name, array in g.items()} for g in graphs]


def read_structures(path: str | Path) -> list[Structure]:
    """The stored cells as Structures, in row order."""
    if Path(path).is_dir():
        from screener.training import label_store

        return label_store.read_label_structures(path)
    with _open(path) as f:
        ids = f["ids"].asstr()[()].astype(str)
        return read_structures_group(f["structures"], ids,
                                     [record_origin(path, i) for i in range(len(ids))])


def read_structures_group(group: h5py.Group, ids, sources) -> list[Structure]:
    """Inverse of write_structures."""
    offsets = group["atom_offsets"][()]
    lattice, positions, numbers = (group[k][()] for k in ("lattice", "positions", "numbers"))
    return [Structure(id=str(sid), source=str(source), lattice=lattice[i],
                      positions=positions[offsets[i]:offsets[i + 1]],
                      numbers=numbers[offsets[i]:offsets[i + 1]])
            for i, (sid, source) in enumerate(zip(ids, sources))]


def training_set_sha256(path: str | Path) -> str:
    """What a model records of the data it trained on: the file's sha256, or a label folder's
    (label_store.label_set_sha256)."""
    if Path(path).is_dir():
        from screener.training import label_store

        return label_store.label_set_sha256(path)
    return file_sha256(path)


@contextmanager
def _open(path: str | Path) -> Iterator[h5py.File]:
    """Open a training set read-only, refusing anything that is not one of this version; damage
    found while reading it (a failed checksum) is a SchemaError naming the file."""
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise SchemaError(f"{path}: not a readable HDF5 training set ({err})") from err
    with f, damage_named(path):
        problem = _layout_problem(f)
        if problem:
            raise SchemaError(f"{path}: {problem}")
        recorded = f.attrs.get(ATTRS_SHA256)  # absent from sets written before it
        if recorded is not None and recorded.decode() != attrs_digest(f.attrs):
            raise SchemaError(f"{path}: attributes differ from their checksum: damaged")
        yield f


def _layout_problem(f: h5py.File) -> str | None:
    if f.attrs.get("kind") != KIND:
        return f"kind is {f.attrs.get('kind')!r}, not {KIND!r}"
    if f.attrs.get("schema_version") != SCHEMA_VERSION:
        return f"schema_version {f.attrs.get('schema_version')}, this screener reads {SCHEMA_VERSION}"
    missing = [k for k in ("ids", "dos", "ref_gap", "formula", "structures", "graphs", "split",
                           "extra") if k not in f]
    return f"missing {', '.join(missing)}" if missing else None


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def from_records(records: Iterable[dict], origin: str, provenance: dict) -> Labelled:
    """JARVIS-form records (`jid`, `atoms`, `edos_up`) -> Labelled; bad records become Failures.

    One function for the figshare download and for JSON files, which hold the same records.
    """
    structures, rows, gaps, skipped = [], [], [], []
    for i, record in enumerate(records):
        rid = record_id(record, origin, i)
        where = record_origin(origin, i)
        problem = target_problem(record.get("edos_up"))
        atoms = record.get("atoms")
        if problem is None and not isinstance(atoms, dict):
            problem = "no 'atoms' structure dict in the record"
        if problem is not None:
            skipped.append(Failure(rid, where, "validate", problem))
            continue
        structure = load(Source(rid, where, atoms))
        if isinstance(structure, Failure):
            skipped.append(structure)
            continue
        structures.append(structure)
        rows.append(record["edos_up"])
        gaps.append(reference_gap(record))
    return Labelled(structures, _rows(rows), np.array(gaps, dtype=np.float32),
                    provenance, skipped)


def target_problem(values) -> str | None:
    """Why a DOS target is unusable (None when it is fine), so bad labels are never trained on."""
    if values is None or isinstance(values, str):
        return f"no DOS target (edos_up is {values!r})"
    try:
        dos = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        return "DOS target is not a list of numbers"
    if dos.shape != (N_BINS,):
        return f"DOS target has shape {dos.shape}, expected ({N_BINS},) on the energy grid"
    if not np.isfinite(dos).all():
        return f"DOS target has {int((~np.isfinite(dos)).sum())} NaN/inf values"
    if (dos < 0).any():
        return f"DOS target has {int((dos < 0).sum())} negative values (min {dos.min():.3g})"
    return None


def _rows(rows: list) -> np.ndarray:
    return np.array(rows, dtype=np.float32).reshape(-1, N_BINS)


def from_jarvis_edos(cache_dir: str | Path) -> Labelled:
    """The ~48k JARVIS eDOS spectra, downloaded once by jarvis-tools into `cache_dir`."""
    from jarvis.db.figshare import data, get_db_info

    url, zip_member, _, reference = get_db_info()[EDOS_DATASET][:4]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        records = data(EDOS_DATASET, store_dir=str(cache_dir))
    except (OSError, zipfile.BadZipFile) as err:
        raise DownloadError(
            f"could not load JARVIS {EDOS_DATASET} ({err}); with no network, put the figshare "
            f"file {url} as {cache_dir / (zip_member + '.zip')} (delete a partial one)") from err
    provenance = {"source": f"jarvis-tools figshare {EDOS_DATASET}", "url": url,
                  "reference": reference, "level_of_theory": JARVIS_THEORY,
                  "dos": "edos_up as published by JARVIS"}
    return from_records(records, f"jarvis:{EDOS_DATASET}", provenance)


def from_json(path: str | Path, level_of_theory: str = "unknown") -> Labelled:
    """A JSON (.json or .json.gz) list of JARVIS-form records carrying `edos_up`."""
    path = Path(path)
    records = _read_records(path)
    provenance = {"source": portable_path(path), "sha256": file_sha256(path),
                  "level_of_theory": level_of_theory, "dos": "edos_up as given"}
    return from_records(records, str(path), provenance)


def _read_records(path: Path) -> list:
    """`read_records` with the file named in its ValueError, so the CLI prints one line that
    says which of its two record files (source, --ref-gaps) is broken."""
    try:
        return read_records(path)
    except ValueError as err:
        raise RecordFileError(f"{path}: {err}") from err


def merge_ref_gaps(labelled: Labelled, path: str | Path, key: str = JARVIS_GAP_KEY) -> int:
    """Fill unknown reference gaps from another JARVIS-form file by id; returns how many.

    Kept apart from the sources so each source reports only what its records hold.
    """
    path = Path(path)
    known = reference_gaps(_read_records(path), path, key)
    filled = 0
    for i, structure in enumerate(labelled.structures):
        gap = known.get(structure.id, float("nan"))
        if math.isnan(labelled.ref_gap[i]) and not math.isnan(gap):
            labelled.ref_gap[i] = gap
            filled += 1
    labelled.provenance["ref_gaps"] = f"{key} from {path} where the source had none"
    return filled


def from_vasprun(path: str | Path) -> Labelled:
    """VASP runs (vasprun.xml, .gz too) under a folder: total DOS per valence electron.

    The reference gap is VASP's own eigenvalue/occupation gap of the same run.
    """
    root = Path(path)
    files = [root] if root.is_file() else sorted(root.rglob("vasprun*.xml*"))
    base = root.parent if root.is_file() else root
    structures, rows, gaps, skipped, theories = [], [], [], [], set()
    for file in files:
        rid = vasprun_id(file, base)
        try:
            run = _read_vasprun(file)
            atoms = run.all_structures[-1]
            structure = load(Source(rid, str(file), atoms.to_dict()))
            if isinstance(structure, Failure):
                skipped.append(structure)
                continue
            e, up, down = run.total_dos
            total = up + np.abs(down) if len(down) else up
            grid = to_grid(e, total, e_fermi=run.efermi)
            row = normalize(grid, valence_electrons(structure.numbers))
            gap = max(float(run.get_indir_gap[0]), 0.0)
            theories.add(f"VASP GGA={run.all_input_parameters.get('GGA', '?')}")
        except Exception as err:  # noqa: BLE001 -- any unreadable run is reported, not fatal
            skipped.append(Failure(rid, str(file), "read", f"{type(err).__name__}: {err}"))
            continue
        problem = target_problem(row)
        if problem:
            skipped.append(Failure(rid, str(file), "validate", problem))
            continue
        structures.append(structure)
        rows.append(row)
        gaps.append(gap)
    provenance = {"source": portable_path(root), "level_of_theory": ", ".join(sorted(theories)) or "unknown",
                  "dos": "VASP total DOS (both spins) on the grid, per valence electron",
                  "ref_gap": "VASP indirect eigenvalue gap of the same run, 0 for metals"}
    return Labelled(structures, _rows(rows), np.array(gaps, dtype=np.float32), provenance, skipped)


def vasprun_id(file: Path, root: Path) -> str:
    """`dir/JVASP-39/vasprun.xml` and `dir/vasprun.xml.JVASP-39.gz` both give 'JVASP-39'."""
    name = file.name.removesuffix(".gz").removeprefix("vasprun").replace(".xml", "", 1)
    tag = name.strip("._-")
    parts = [*file.parent.relative_to(root).parts, *([tag] if tag else [])]
    return "/".join(parts) or root.resolve().name


def _read_vasprun(file: Path):
    """jarvis-tools' Vasprun reads plain paths only, so a .gz goes through a temporary copy."""
    from jarvis.io.vasp.outputs import Vasprun

    if file.suffix != ".gz":
        return Vasprun(str(file))
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "vasprun.xml"
        with gzip.open(file, "rb") as src, open(plain, "wb") as dst:
            dst.write(src.read())
        return Vasprun(str(plain))


def skipped_summary(skipped: list[Failure], limit: int = 20) -> str:
    """Human summary of skipped records, counted by reason, the first `limit` listed."""
    if not skipped:
        return "skipped: none"
    lines = [f"skipped {len(skipped)} record(s):"]
    lines += [f"  {f.id} ({f.source}) [{f.stage}] {f.reason}" for f in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return "\n".join(lines)
