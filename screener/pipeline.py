"""The screening job on Ray: sources → graph shards (CPU tasks) → prediction shards (actor pool).

The driver only streams small `Source` handles and shard names; structures, graphs and spectra
live in the workers and on disk, so driver memory does not grow with the input. A chunk's
shards are registered in the manifest only once complete, which makes a rerun of the same
command skip finished work and produce every id exactly once.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray

from screener import store
from screener.structures import Failure, Source, discover, load


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
    progress: bool = True


@dataclass
class Summary:
    n_read: int = 0
    n_failed: int = 0
    n_predicted: int = 0
    n_skipped_shards: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.n_read / self.seconds if self.seconds > 0 else 0.0


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items; the last one may be shorter."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def build_graph_shard(sources: list[Source], path: str, attrs: dict) -> dict:
    """Read, validate and graph one chunk; every source ends as a graph or a failure."""
    from screener.graphs import build_graph

    t0 = time.perf_counter()
    structures, graphs, failures = [], [], []
    for item in map(load, sources):
        if isinstance(item, Failure):
            failures.append(item)
            continue
        try:
            graphs.append(build_graph(item.lattice, item.positions, item.numbers))
            structures.append(item)
        except Exception as exc:  # noqa: BLE001 - any graph error fails this structure only
            failures.append(Failure(item.id, item.source, "graph", f"{type(exc).__name__}: {exc}"))
    record = store.write_graph_shard(path, structures, graphs, failures, attrs)
    return {**record, "seconds": time.perf_counter() - t0}


class Predictor:
    """Holds one loaded model; Ray keeps one per actor so weights load once per worker."""

    def __init__(self, model_path: str, device: str, threads: int) -> None:
        import torch

        from screener.model import load_checkpoint

        torch.set_num_threads(max(1, threads))
        self.device = device
        self.model, self.meta = load_checkpoint(model_path, device)

    def predict_shard(self, graph_path: str, out_path: str, batch_size: int, attrs: dict) -> dict:
        """Predict every graph of a shard; a structure that cannot be predicted fails alone."""
        from screener.predict import predict_dos, spectral_columns

        t0 = time.perf_counter()
        table, graphs, _ = store.read_graph_shard(graph_path)
        failures: list[Failure] = []
        try:
            dos = predict_dos(self.model, graphs, batch_size, self.device)
            keep = np.ones(len(graphs), dtype=bool)
        except RuntimeError:
            dos, keep = self._predict_one_by_one(graphs, table, failures)
        table = {key: np.asarray(col)[keep] for key, col in table.items()}
        table.update(dos=dos[keep], **spectral_columns(dos[keep]))
        record = store.write_prediction_shard(out_path, table, failures, attrs)
        return {**record, "seconds": time.perf_counter() - t0}

    def _predict_one_by_one(self, graphs, table, failures):
        from screener.predict import predict_dos

        dos = np.zeros((len(graphs), 300), dtype=np.float32)
        keep = np.ones(len(graphs), dtype=bool)
        for i, graph in enumerate(graphs):
            try:
                dos[i] = predict_dos(self.model, [graph], 1, self.device)[0]
            except RuntimeError as exc:
                keep[i] = False
                reason = f"prediction failed ({graph['numbers'].size} atoms): {exc}"
                failures.append(Failure(str(table["ids"][i]), str(table["source"][i]), "predict", reason))
        return dos, keep


def connect(address: str | None) -> None:
    """Join a running cluster, or start a private local Ray sized to this machine."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)


def predictor_resources(device: str, workers: int | None) -> tuple[int, dict, int]:
    """Prediction actors to start, what each asks of Ray, and its torch threads.

    GPU actors take one GPU each. CPU actors reserve only half the CPUs between them, so graph
    tasks always find a free CPU (no deadlock), but run torch on all of them: graph building is
    about ten times cheaper than prediction, so the cores would otherwise sit idle.
    """
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    if device == "cuda" or (device == "auto" and gpus > 0):
        if gpus == 0:
            raise RuntimeError("--device cuda was asked for but the Ray cluster has no GPU")
        return workers or gpus, {"num_gpus": 1, "num_cpus": 1}, 1
    n = workers or max(1, cpus // 2)
    return n, {"num_cpus": max(1, cpus // (2 * n))}, max(1, cpus // n)


def default_model() -> Path:
    """The trained model shipped inside the package."""
    path = Path(__file__).parent / "data" / "default_model.pt"
    if not path.exists():
        raise FileNotFoundError(f"no shipped default model at {path}: pass --model PATH")
    return path


def run(opts: RunOptions, on_progress: Callable[[str, int], None] | None = None) -> Summary:
    """Screen every structure under `opts.structures`; resumable, see the module docstring."""
    from screener.model import checkpoint_info

    t_start = time.perf_counter()
    out = Path(opts.out_dir)
    (out / "graphs").mkdir(parents=True, exist_ok=True)
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    model_info = checkpoint_info(opts.model)
    attrs = {"model_id": model_info["model_id"], "model_hash": model_info["hash"]}
    config = {"model_hash": model_info["hash"], "input": str(Path(opts.structures).resolve()),
              "shard_size": opts.shard_size}
    manifest = store.Manifest.open(out, config)

    t0 = time.perf_counter()
    connect(opts.address)
    summary = Summary(stage_seconds={"ray_start": time.perf_counter() - t0})
    n_actors, actor_opts, threads = predictor_resources(opts.device, opts.workers)
    device = "cuda" if actor_opts.get("num_gpus") else "cpu"
    actor_cls = ray.remote(Predictor).options(max_restarts=3, max_task_retries=3, **actor_opts)
    actors = [actor_cls.remote(str(opts.model), device, threads) for _ in range(n_actors)]
    graph_task = ray.remote(build_graph_shard).options(num_cpus=1, max_retries=3)
    max_graph_inflight = max(2, int(ray.cluster_resources().get("CPU", 1)))

    chunks = enumerate(chunked(discover(opts.structures), opts.shard_size))
    graph_refs: dict = {}
    pred_refs: dict = {}
    ready: deque = deque()
    idle = deque(actors)
    exhausted = False
    while True:
        while not exhausted and len(graph_refs) < max_graph_inflight and len(ready) < 2 * n_actors:
            nxt = next(chunks, None)
            if nxt is None:
                exhausted = True
                break
            index, sources = nxt
            digest = store.ids_digest(s.id for s in sources)
            gname, pname = store.shard_name("graphs", index), store.shard_name("predictions", index)
            if manifest.has(pname, digest):
                summary.n_skipped_shards += 1
                if on_progress:
                    on_progress("graphs", len(sources))
                _count(summary, manifest.shards[pname], len(sources), on_progress)
            elif manifest.has(gname, digest):
                if on_progress:
                    on_progress("graphs", len(sources))
                ready.append((index, digest, len(sources)))
            else:
                ref = graph_task.remote(sources, str(out / gname), attrs)
                graph_refs[ref] = (index, digest, sources)
        while idle and ready:
            index, digest, n = ready.popleft()
            actor = idle.popleft()
            ref = actor.predict_shard.remote(
                str(out / store.shard_name("graphs", index)), str(out / store.shard_name("predictions", index)),
                opts.batch_size, attrs,
            )
            pred_refs[ref] = (index, digest, n, actor)
        if not graph_refs and not pred_refs:
            if exhausted and not ready:
                break
            continue
        done, _ = ray.wait(list(graph_refs) + list(pred_refs), num_returns=1)
        ref = done[0]
        if ref in graph_refs:
            index, digest, sources = graph_refs.pop(ref)
            info = _result_or_failure(ref, sources, "graph", out / store.shard_name("graphs", index), attrs)
            manifest.add(store.shard_name("graphs", index), info)
            _add_seconds(summary, "graphs", info)
            if on_progress:
                on_progress("graphs", len(sources))
            ready.append((index, digest, len(sources)))
        else:
            index, digest, n, actor = pred_refs.pop(ref)
            idle.append(actor)
            gpath = out / store.shard_name("graphs", index)
            info = _prediction_or_failure(ref, gpath, out / store.shard_name("predictions", index), attrs)
            manifest.add(store.shard_name("predictions", index), info)
            _add_seconds(summary, "predict", info)
            _count(summary, manifest.shards[store.shard_name("predictions", index)], n, on_progress)
    summary.seconds = time.perf_counter() - t_start
    return summary


def _count(summary: Summary, entry: dict, n_sources: int, on_progress) -> None:
    summary.n_read += n_sources
    summary.n_predicted += entry["n"]
    summary.n_failed += n_sources - entry["n"]
    if on_progress:
        on_progress("predict", n_sources)


def _add_seconds(summary: Summary, stage: str, info: dict) -> None:
    summary.stage_seconds[stage] = summary.stage_seconds.get(stage, 0.0) + info.get("seconds", 0.0)


def _result_or_failure(ref, sources: list[Source], stage: str, path: Path, attrs: dict) -> dict:
    """A chunk whose worker died for good still ends as a shard: all its ids become failures."""
    try:
        return ray.get(ref)
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        reason = f"{stage} worker failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        failures = [Failure(s.id, s.origin, stage, reason) for s in sources]
        return store.write_graph_shard(str(path), [], [], failures, attrs)


def _prediction_or_failure(ref, graph_path: Path, path: Path, attrs: dict) -> dict:
    try:
        return ray.get(ref)
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        reason = f"predict worker failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        table, _, _ = store.read_graph_shard(str(graph_path))
        failures = [Failure(str(i), str(s), "predict", reason) for i, s in zip(table["ids"], table["source"])]
        return store.write_prediction_shard(str(path), store.empty_prediction_table(), failures, attrs)
