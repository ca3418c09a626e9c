"""The screening job on Ray: sources → graph shards (CPU tasks) → prediction shards (actor pool).

The driver only streams small `Source` handles and shard names; structures, graphs and spectra
live in the workers and on disk, so driver memory grows only by the ids it has seen (to refuse
repeated ids). A chunk's shards are registered in the manifest only once complete, and checked
again before a rerun skips them, so a rerun of the same command redoes only missing or damaged
work and accounts for every input exactly once.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import ray

from screener.cluster import connect
from screener.errors import ScreenerError
from screener.io import MAX_ATOMS, Failure, Source, Structure, discover, load
from screener.io.files import file_sha256
from screener.results.manifest import Manifest, prepare_results_dir, run_lock
from screener.results.shards import (
    CONFIG_ATTR,
    KINDS,
    config_attr,
    empty_prediction_table,
    ids_digest,
    read_graph_shard,
    shard_name,
    write_graph_shard,
    write_prediction_shard,
)

if TYPE_CHECKING:
    from screener.predict import Prediction

Progress = Callable[[str, int], None]


@dataclass
class RunOptions:
    structures: str
    out_dir: Path
    model: Path
    address: str | None = None
    device: str = "auto"
    workers: int | None = None
    batch_size: int = 64
    shard_size: int = 256
    max_atoms: int = MAX_ATOMS


@dataclass
class Summary:
    n_read: int = 0
    n_failed: int = 0
    n_predicted: int = 0
    n_skipped_shards: int = 0
    damaged: list[str] = field(default_factory=list)
    manifest_rebuilt_because: str | None = None
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.n_read / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Chunk:
    """The inputs of one shard: sources to read, and failures for ids that came before."""

    index: int
    sources: list[Source]
    duplicates: list[Failure]
    digest: str

    def __len__(self) -> int:
        return len(self.sources) + len(self.duplicates)

    def shard(self, kind: str) -> str:
        return shard_name(kind, self.index)


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items; the last one may be shorter."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def chunks(sources: Iterable[Source], size: int) -> Iterator[Chunk]:
    """Chunks of `size` inputs in input order; a repeated id fails, naming its first origin.

    The id -> first origin map is the one driver state that grows with the input: about 200
    bytes per structure, 0.2 GB per million.
    """
    first: dict[str, str] = {}
    for index, batch in enumerate(chunked(sources, size)):
        unique, duplicates = [], []
        for source in batch:
            if source.id in first:
                reason = f"duplicate id, also at {first[source.id]}"
                duplicates.append(Failure(source.id, source.origin, "read", reason))
            else:
                first[source.id] = source.origin
                unique.append(source)
        yield Chunk(index, unique, duplicates, ids_digest(s.id for s in batch))


def graphs_or_failures(sources: list[Source], max_atoms: int = MAX_ATOMS
                       ) -> list[tuple[Structure, dict] | Failure]:
    """Read, validate and graph inputs, all graphs built together; never raises, and an input
    that cannot be graphed fails alone.

    `max_atoms` keeps structures too large for a worker's memory away from graphs and model.
    """
    items = [_validated(load(source), max_atoms) for source in sources]
    structures = [item for item in items if not isinstance(item, Failure)]
    graphs = iter(_graphs(structures))
    return [item if isinstance(item, Failure) else _graphed(item, next(graphs)) for item in items]


def _validated(item: Structure | Failure, max_atoms: int) -> Structure | Failure:
    if isinstance(item, Structure) and item.n_atoms > max_atoms:
        reason = f"{item.n_atoms} atoms, more than this run's limit of {max_atoms} (max_atoms)"
        return Failure(item.id, item.source, "validate", reason)
    return item


def _graphs(structures: list[Structure]) -> list[dict | Exception]:
    """Graphs built in one batch; should the batch itself fail, one by one, so that only the
    structure at fault fails."""
    from screener.graphs import build_graphs

    try:
        return build_graphs([(s.lattice, s.positions, s.numbers) for s in structures])
    except Exception as exc:  # noqa: BLE001 - any graph error fails its structure only
        return [exc] if len(structures) == 1 else [g for s in structures for g in _graphs([s])]


def _graphed(structure: Structure, graph: dict | Exception) -> tuple[Structure, dict] | Failure:
    if isinstance(graph, Exception):
        return Failure(structure.id, structure.source, "graph", _describe(graph))
    return structure, graph


def build_graph_shard(chunk: Chunk, path: str | Path, attrs: dict, max_atoms: int = MAX_ATOMS
                      ) -> dict:
    """Graph one chunk into one shard, in which every input is a graph or a failure."""
    t0 = time.perf_counter()
    structures, graphs, failures = [], [], list(chunk.duplicates)
    for outcome in graphs_or_failures(chunk.sources, max_atoms):
        if isinstance(outcome, Failure):
            failures.append(outcome)
        else:
            structures.append(outcome[0])
            graphs.append(outcome[1])
    record = write_graph_shard(path, structures, graphs, failures, attrs)
    return {**record, "node": _node_id(), "seconds": time.perf_counter() - t0}


class Predictor:
    """Holds one loaded model; Ray keeps one per actor so weights load once per worker."""

    def __init__(self, model_path: str, device: str, threads: int) -> None:
        import torch

        from screener.model import load_checkpoint

        torch.set_num_threads(max(1, threads))
        self.device = device
        self.model, self.meta = load_checkpoint(model_path, device)

    def predict_shard(self, graph_path: str, out_path: str, batch_size: int, attrs: dict) -> dict:
        """Predict every graph of a shard; a structure that cannot be predicted fails alone.

        The prediction shard repeats its graph shard's failures, so it accounts for every input
        of the chunk and a resumed run recognises it by its ids.
        """
        from screener.model.domain import in_domain
        from screener.predict import prediction_columns

        t0 = time.perf_counter()
        table, graphs, failures = read_graph_shard(graph_path)
        prediction, errors = self._predict(graphs, batch_size)
        failures += [Failure(str(table["ids"][i]), str(table["source"][i]), "predict", reason)
                     for i, reason in errors.items()]
        ok = np.ones(len(graphs), dtype=bool)
        ok[list(errors)] = False
        table = {key: np.asarray(col)[ok] for key, col in table.items()}
        table.update(dos=prediction.dos, **prediction_columns(self.model, prediction),
                     in_domain=in_domain(self.meta.get("domain"),
                                         [g["numbers"] for g, keep in zip(graphs, ok) if keep]))
        record = write_prediction_shard(out_path, table, failures, attrs)
        return {**record, "node": _node_id(), "seconds": time.perf_counter() - t0}

    def _predict(self, graphs: list[dict], batch_size: int) -> tuple[Prediction, dict[int, str]]:
        """Predictions of the graphs that could be predicted, in order, and why each other failed.

        When a batch fails, out of memory for instance (torch raises a RuntimeError, numpy a
        MemoryError), each graph is tried alone; outside the handler, so that the failed batch's
        tensors, held by the traceback, are freed first.
        """
        from screener.predict import concat, predict

        with contextlib.suppress(Exception):
            return predict(self.model, graphs, batch_size, self.device), {}
        done, errors = [], {}
        for i, graph in enumerate(graphs):
            try:
                done.append(predict(self.model, [graph], 1, self.device))
            except Exception as exc:  # noqa: BLE001 - this structure fails alone
                errors[i] = f"prediction failed ({graph['numbers'].size} atoms): {_describe(exc)}"
        return concat(done), errors


def _node_id() -> str | None:
    """The Ray node a shard was made on, kept in its manifest record to trace where work ran;
    None when called outside Ray, which must not start a Ray just to ask."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _describe(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def predictor_resources(device: str, workers: int | None) -> tuple[int, dict, int]:
    """Prediction actors to start, what each asks of Ray, and its torch threads.

    GPU actors take one GPU each. CPU actors reserve only half the CPUs between them (half of
    the one CPU of a one-CPU Ray), so graph tasks always find a free CPU (no deadlock), but run
    torch on all of them: graph building is about ten times cheaper than prediction, so the
    cores would otherwise sit idle. More actors than that could never all start and the run
    would wait for them forever, so asking for more is an error.
    """
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    if device == "cuda" or (device == "auto" and gpus > 0):
        if gpus == 0:
            raise RuntimeError("--device cuda was asked for but the Ray cluster has no GPU")
        _check_workers(workers, gpus, f"{gpus} GPU(s), one per prediction actor")
        return workers or gpus, {"num_gpus": 1, "num_cpus": 1}, 1
    most = max(1, cpus // 2)
    _check_workers(workers, most, f"{cpus} CPU(s), of which prediction actors may take half")
    n = workers or most
    return n, {"num_cpus": cpus // (2 * n) or cpus / 2}, max(1, cpus // n)


def _check_workers(workers: int | None, most: int, why: str) -> None:
    if workers is not None and not 1 <= workers <= most:
        raise ScreenerError(f"--workers {workers}: this Ray cluster can run 1 to {most} "
                            f"prediction actors ({why})")


def run(opts: RunOptions, on_progress: Progress | None = None) -> Summary:
    """Screen every structure under `opts.structures`; resumable, see the module docstring.

    One run at a time writes a results dir (run_lock); its shards carry the run's config,
    so that a damaged manifest is rebuilt from them (Manifest.open).
    """
    t_start = time.perf_counter()
    out = prepare_results_dir(opts.out_dir)
    with run_lock(out):
        model_info, ray_seconds = _checkpoint_while_connecting(opts.model, opts.address)
        config = {"model_hash": model_info["hash"], "input": str(Path(opts.structures).resolve()),
                  "shard_size": opts.shard_size, "max_atoms": opts.max_atoms}
        attrs = {"model_id": model_info["model_id"], "model_hash": model_info["hash"],
                 "min_probability": model_info.get("gap_head", {}).get("min_probability", 0.5),
                 CONFIG_ATTR: config_attr(config)}
        manifest = Manifest.open(out, config)
        summary = Summary(stage_seconds={"ray_start": ray_seconds},
                          manifest_rebuilt_because=manifest.rebuilt_because)
        driver = _Driver(opts, manifest, attrs, summary, on_progress or (lambda stage, n: None))
        driver.drive(chunks(discover(opts.structures), opts.shard_size))
    summary.seconds = time.perf_counter() - t_start
    return summary


def _checkpoint_while_connecting(model: Path, address: str | None) -> tuple[dict, float]:
    """The model's checkpoint meta, and the seconds Ray took to start.

    Reading the checkpoint imports torch (0.75 s here); a thread does both while Ray starts its
    processes, which leaves the main thread, where `ray.init` must run, mostly waiting.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        info = pool.submit(_checkpoint_info, model)
        t0 = time.perf_counter()
        connect(address)
        seconds = time.perf_counter() - t0
        return info.result(), seconds


def _checkpoint_info(model: Path) -> dict:
    """`checkpoint_info`, imported here so that torch loads on the thread that calls this."""
    from screener.model import checkpoint_info

    return checkpoint_info(model)


class _Driver:
    """The driver loop: chunks go to graph tasks, then wait for an idle prediction actor.

    At most one graph task per CPU and two chunks per actor wait, so memory stays flat.
    """

    def __init__(self, opts: RunOptions, manifest: Manifest, attrs: dict, summary: Summary,
                 on_progress: Progress) -> None:
        self.opts, self.manifest, self.attrs = opts, manifest, attrs
        self.out = Path(opts.out_dir)
        self.summary, self.on_progress = summary, on_progress
        n_actors, actor_opts, threads = predictor_resources(opts.device, opts.workers)
        device = "cuda" if actor_opts.get("num_gpus") else "cpu"
        # Restarts are unlimited because they count over the actor's life: a long campaign
        # would otherwise end with a dead pool. A chunk that kills its actor every time fails
        # after max_task_retries. CPU actors share cores with graph tasks; passive OpenMP waits
        # stop idle torch threads from spinning on a core another process needs.
        actor_cls = ray.remote(Predictor).options(
            max_restarts=-1, max_task_retries=3,
            runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}, **actor_opts)
        self.idle = deque(actor_cls.remote(str(opts.model), device, threads)
                          for _ in range(n_actors))
        self.max_ready = 2 * n_actors
        self.graph_task = ray.remote(build_graph_shard).options(num_cpus=1, max_retries=3)
        self.max_graphs = max(2, int(ray.cluster_resources().get("CPU", 1)))
        self.graphs: dict[ray.ObjectRef, Chunk] = {}
        self.predictions: dict[ray.ObjectRef, tuple[Chunk, ray.actor.ActorHandle]] = {}
        self.ready: deque[Chunk] = deque()

    def drive(self, pending: Iterator[Chunk]) -> None:
        exhausted = False
        while True:
            while not exhausted and self._has_room():
                chunk = next(pending, None)
                exhausted = chunk is None
                if chunk is not None:
                    self._start(chunk)
            while self.idle and self.ready:
                self._predict(self.ready.popleft(), self.idle.popleft())
            if self.graphs or self.predictions:
                self._collect()
            elif exhausted and not self.ready:
                return

    def _has_room(self) -> bool:
        return len(self.graphs) < self.max_graphs and len(self.ready) < self.max_ready

    def _start(self, chunk: Chunk) -> None:
        """Skip a chunk whose shards are intact, otherwise build what is missing."""
        if self._intact(chunk.shard("predictions"), chunk.digest):
            self.summary.n_skipped_shards += 1
            self.on_progress("graphs", len(chunk))
            self._count(chunk, self.manifest.shards[chunk.shard("predictions")])
        elif self._intact(chunk.shard("graphs"), chunk.digest):
            self.on_progress("graphs", len(chunk))
            self.ready.append(chunk)
        else:
            path = str(self.out / chunk.shard("graphs"))
            ref = self.graph_task.remote(chunk, path, self.attrs, self.opts.max_atoms)
            self.graphs[ref] = chunk

    def _intact(self, name: str, digest: str) -> bool:
        """Whether the shard is listed for these ids and still holds the bytes recorded when it
        was written and read back. Size and sha256 cost less than opening the HDF5 file: 0.3 ms
        for a 200-structure prediction shard, 5 ms for its graph shard. A damaged shard is
        unlisted at once, so readers skip it until it is made again."""
        if not self.manifest.has(name, digest):
            return False
        path, recorded = self.out / name, self.manifest.shards[name]
        try:
            intact = (path.stat().st_size == recorded["size"]
                      and file_sha256(path) == recorded["sha256"])
        except OSError:  # deleted or unreadable
            intact = False
        if not intact:
            self.manifest.discard(name)
            self.summary.damaged.append(name)
        return intact

    def _predict(self, chunk: Chunk, actor: ray.actor.ActorHandle) -> None:
        graphs, predictions = (str(self.out / chunk.shard(kind)) for kind in KINDS)
        ref = actor.predict_shard.remote(graphs, predictions, self.opts.batch_size, self.attrs)
        self.predictions[ref] = (chunk, actor)

    def _collect(self) -> None:
        """Record the next finished task; a task that failed for good still ends as a shard."""
        (ref,), _ = ray.wait([*self.graphs, *self.predictions], num_returns=1)
        if ref in self.graphs:
            chunk = self.graphs.pop(ref)
            info = _result_or(ref, lambda reason: self._graph_failures(chunk, reason))
            self.manifest.add(chunk.shard("graphs"), info)
            self._add_seconds("graphs", info)
            self.on_progress("graphs", len(chunk))
            self.ready.append(chunk)
        else:
            chunk, actor = self.predictions.pop(ref)
            self.idle.append(actor)
            info = _result_or(ref, lambda reason: self._prediction_failures(chunk, reason))
            self.manifest.add(chunk.shard("predictions"), info)
            self._add_seconds("predict", info)
            self._count(chunk, info)

    def _graph_failures(self, chunk: Chunk, reason: str) -> dict:
        failures = [*chunk.duplicates, *(Failure(s.id, s.origin, "graph", reason)
                                         for s in chunk.sources)]
        path = self.out / chunk.shard("graphs")
        return write_graph_shard(path, [], [], failures, self.attrs)

    def _prediction_failures(self, chunk: Chunk, reason: str) -> dict:
        table, _, failures = read_graph_shard(self.out / chunk.shard("graphs"))
        failures += [Failure(str(i), str(s), "predict", reason)
                     for i, s in zip(table["ids"], table["source"])]
        return write_prediction_shard(self.out / chunk.shard("predictions"),
                                      empty_prediction_table(), failures, self.attrs)

    def _count(self, chunk: Chunk, entry: dict) -> None:
        self.summary.n_read += len(chunk)
        self.summary.n_predicted += entry["n"]
        self.summary.n_failed += len(chunk) - entry["n"]
        self.on_progress("predict", len(chunk))

    def _add_seconds(self, stage: str, info: dict) -> None:
        seconds = self.summary.stage_seconds
        seconds[stage] = seconds.get(stage, 0.0) + info.get("seconds", 0.0)


def _result_or(ref: ray.ObjectRef, failed: Callable[[str], dict]) -> dict:
    """The task's shard record, or, when its worker failed for good (retries spent), the record
    of a shard that `failed` writes with every input of the chunk as a failure."""
    try:
        return ray.get(ref)
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        return failed(f"worker failed: {_describe(exc)}")
