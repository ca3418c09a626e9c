"""A results directory: its manifest (a snapshot plus a journal) of the complete shards, the
lock of the one run that writes it, and the checks before a run makes it."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from screener.errors import ScreenerError
from screener.io.files import atomic_path, fsync
from screener.results.hdf5 import SchemaError
from screener.results.shards import KINDS, checked_shard_info

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
JOURNAL_MIN_LINES = 64
RECORD_KEYS = ("kind", "n", "n_failed", "ids_sha256", "size", "sha256")
LOCK = "run.lock"


class ManifestDamaged(SchemaError):
    """A manifest that cannot be read at all; a run rebuilds it from the shards (Manifest.open)."""


class Manifest:
    """The list of complete shards: manifest.json (a snapshot) plus the journal it names.

    The snapshot holds the config, the shards complete when it was written and the name of its
    journal; the journal gets one JSON line per shard added or discarded since. Appending a line
    costs the same at shard 10 as at shard 80,000, whereas rewriting the whole list per shard
    makes a run's bookkeeping quadratic in its size. The snapshot is rewritten (with a new,
    empty journal) only when the journal holds as many lines as the snapshot has shards, so the
    total work stays linear. One writer (the driver); readers need no lock: the snapshot is
    replaced by rename, journals only grow, and a torn last line (a crash mid-append) is ignored.
    """

    def __init__(self, results_dir: str | Path, config: dict[str, Any],
                 shards: dict[str, dict[str, Any]], generation: int = 0, n_logged: int = 0):
        self.dir = Path(results_dir)
        self.config = config
        self.shards = shards
        self.generation = generation
        self.n_logged = n_logged
        self.rebuilt_because: str | None = None

    @classmethod
    def create(cls, results_dir: str | Path, config: dict[str, Any]) -> Manifest:
        """Start a results dir; shards from any earlier run there are no longer listed."""
        manifest = cls(results_dir, dict(config), {})
        manifest.dir.mkdir(parents=True, exist_ok=True)
        manifest._snapshot()
        return manifest

    @classmethod
    def load(cls, results_dir: str | Path) -> Manifest:
        """The current list; retried when the writer starts a new journal between two reads."""
        for _ in range(10):
            data = _read_snapshot(Path(results_dir) / MANIFEST)
            try:
                journal = (Path(results_dir) / _journal_name(data["generation"])).read_bytes()
            except FileNotFoundError:
                continue
            manifest = cls(results_dir, data["config"], data["shards"], data["generation"])
            try:
                manifest._replay(journal)
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
                raise ManifestDamaged(f"{manifest.dir / _journal_name(manifest.generation)}: "
                                      f"damaged line: {err}") from err
            return manifest
        raise SchemaError(f"{Path(results_dir) / MANIFEST}: its journal keeps disappearing; "
                          f"is another run compacting it?")

    @classmethod
    def open(cls, results_dir: str | Path, config: dict[str, Any]) -> Manifest:
        """The manifest a run writes to: a new one, or the existing one when resuming.

        Resuming with a different config (another model, another input) is refused, because the
        shards already listed would silently mix with the new ones. A resumed manifest starts a
        new journal, so a line torn by the crash is never followed by new ones. A missing or
        damaged manifest is rebuilt from the shards (see `rebuild`).
        """
        config = json.loads(json.dumps(config))  # compare as stored: tuples become lists
        if not (Path(results_dir) / MANIFEST).exists():
            return cls.rebuild(results_dir, config)
        try:
            manifest = cls.load(results_dir)
        except ManifestDamaged as damage:
            manifest = cls.rebuild(results_dir, config)
            manifest.rebuilt_because = str(damage)
            return manifest
        changed = {key: (manifest.config.get(key), value) for key, value in config.items()
                   if manifest.config.get(key) != value}
        if changed:
            raise SchemaError(f"{manifest.dir / MANIFEST}: made by a run with other settings "
                              f"(was, now): {changed}; use a new results directory")
        manifest._snapshot()
        return manifest

    @classmethod
    def rebuild(cls, results_dir: str | Path, config: dict[str, Any]) -> Manifest:
        """A new manifest listing each shard file written with `config` (its CONFIG_ATTR) whose
        every checksum holds; the run makes the others again. Only the writing run may call it.
        """
        manifest = cls.create(results_dir, config)
        for journal in manifest.dir.glob("manifest.*.jsonl"):
            if journal.name != _journal_name(manifest.generation):
                journal.unlink()
        for kind in KINDS:
            for path in sorted((manifest.dir / kind).glob(f"{kind}-*.h5")):
                try:
                    info = checked_shard_info(path, config)
                except SchemaError:
                    continue
                manifest.shards[f"{kind}/{path.name}"] = info
        manifest._snapshot()
        return manifest

    def add(self, name: str, info: dict[str, Any]) -> None:
        """Record a complete shard by its name relative to the results dir (see shard_name).

        `info` is the record a write_*_shard returned (or shard_info); extra keys are kept.
        """
        missing = [key for key in RECORD_KEYS if key not in info]
        if missing or info["kind"] not in KINDS:
            raise ValueError(f"{name}: manifest record lacks {missing} or its kind: {info}")
        self.shards[name] = dict(info)
        self._log({"add": name, "info": self.shards[name]})

    def discard(self, name: str) -> None:
        """Unlist a shard found damaged, so that readers skip it until it is written again."""
        if self.shards.pop(name, None) is not None:
            self._log({"discard": name})

    def has(self, name: str, ids_sha256: str | None = None) -> bool:
        """Whether shard `name` is complete (and, given a digest, made from those same ids)."""
        info = self.shards.get(name)
        return info is not None and ids_sha256 in (None, info["ids_sha256"])

    def complete(self, kind: str) -> list[str]:
        """Names of the complete shards of `kind` in chunk order."""
        return sorted((name for name, info in self.shards.items() if info["kind"] == kind),
                      key=lambda name: (len(name), name))

    def _replay(self, journal: bytes) -> None:
        *lines, _torn_or_empty = journal.split(b"\n")
        for line in lines:
            entry = json.loads(line)
            if "add" in entry:
                if not _is_record(entry["info"]):
                    raise KeyError(f"{entry['add']}: a record without {RECORD_KEYS}")
                self.shards[entry["add"]] = entry["info"]
            else:
                self.shards.pop(entry["discard"], None)
        self.n_logged = len(lines)

    def _log(self, entry: dict[str, Any]) -> None:
        if self.n_logged >= max(JOURNAL_MIN_LINES, len(self.shards)):
            self._snapshot()
            return
        with open(self.dir / _journal_name(self.generation), "ab") as f:
            f.write(json.dumps(entry, sort_keys=True).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self.n_logged += 1

    def _snapshot(self) -> None:
        """Write every shard into a new snapshot that starts an empty journal; drop the old one."""
        old = self.dir / _journal_name(self.generation)
        self.generation += 1
        journal = self.dir / _journal_name(self.generation)
        journal.write_bytes(b"")
        fsync(journal)
        data = {"schema_version": MANIFEST_VERSION, "config": self.config, "shards": self.shards,
                "generation": self.generation}
        with atomic_path(self.dir / MANIFEST) as tmp:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        old.unlink(missing_ok=True)
        self.n_logged = 0


def _journal_name(generation: int) -> str:
    return f"manifest.{generation}.jsonl"


def _read_snapshot(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SchemaError(f"{path}: missing: not a results directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestDamaged(f"{path}: not valid JSON: {err}") from err
    found = data.get("schema_version") if isinstance(data, dict) else None
    if isinstance(found, int) and found != MANIFEST_VERSION:
        raise SchemaError(f"{path}: schema version {found!r}, this screener reads "
                          f"version {MANIFEST_VERSION}")
    if (found != MANIFEST_VERSION or not isinstance(data.get("config"), dict)
            or not isinstance(data.get("generation"), int)
            or not isinstance(data.get("shards"), dict)
            or not all(_is_record(info) for info in data["shards"].values())):
        raise ManifestDamaged(f"{path}: not a manifest of version {MANIFEST_VERSION}: damaged")
    return data


def _is_record(info: Any) -> bool:
    return isinstance(info, dict) and all(key in info for key in RECORD_KEYS)


def results_dir_problem(results_dir: str | Path) -> str | None:
    """Why a results dir cannot be made or written at `results_dir`, in words; None if it can."""
    path = Path(results_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK):
        return f"cannot write in {existing} (read-only or no permission)"
    return None


def prepare_results_dir(results_dir: str | Path) -> Path:
    """Make the results dir and its shard folders, or say in one line why they cannot be made."""
    out = Path(results_dir)
    problem = results_dir_problem(out)
    try:
        if problem is None:
            for kind in KINDS:
                (out / kind).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        problem = f"cannot make {out}: {err.strerror}"
    if problem:
        raise ScreenerError(f"{out}: {problem}")
    return out


@contextmanager
def run_lock(results_dir: str | Path) -> Iterator[None]:
    """Hold the results dir for the one run that writes it; another is refused at once. The lock
    is the kernel's (flock), so it ends with its holder: a killed run's lock is free."""
    from filelock import FileLock, Timeout

    path = Path(results_dir) / LOCK
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ScreenerError(f"{results_dir}: another `screen run` is writing here (it holds "
                            f"{path}); wait for it to end, or use another -o") from None
    try:
        yield
    finally:
        lock.release()


def complete_shards(results_dir: str | Path, kind: str = "predictions") -> list[tuple[Path, dict]]:
    """(path, manifest record) of each complete shard of `kind`, in chunk order."""
    manifest = Manifest.load(results_dir)
    return [(manifest.dir / name, manifest.shards[name]) for name in manifest.complete(kind)]
