"""Projected wall time, cost and storage of `screen run` for 10^6 and 10^7 structures on a cluster,
from per-stage costs measured in this same run, on this machine, with the pipeline's own functions.

Each stage is timed on one core (1 thread) over a random sample of each input: reading and
validation (`load`), graph building (`build_graphs` on the pipeline's chunks), the graph shard (`write_graph_shard`), and on
the prediction side reading it back, batching (`collate` + `to_tensors`), the forward pass of the
model (`predict_dos` minus batching, batch 64) and the prediction shard with its band gaps. Shard
bytes come from real shards of `screen run`'s default size. The driver records every shard in the
manifest (a journal line, and now and then a snapshot); its cost per shard, amortised over a run,
is measured at two run sizes, to show that it does not grow with the run, and extrapolated.

The cluster model, as `screener.pipeline` places work:
- no GPU: graph tasks and CPU prediction actors share all cores, so every stage costs core time;
- with GPUs: graph tasks run on the CPU nodes; each GPU actor has one CPU of its own (not counted
  as a CPU node) that reads graph shards, batches and writes prediction shards, and its GPU runs
  the forward pass at `--gpu-rate`, an assumption: no GPU was measured here (nor the copies to it);
- the single driver records shards serially, so the run takes at least the driver's time.
Ray's scheduling overhead, network filesystems and node start-up are not in the model.

    python benchmarks/project_scale.py [--limit 256] [--gpu-rate 5000] [--cpu-node-price 0.70]
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import math
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from screener.graphs import build_graphs, collate
from screener.io import Failure, Source, discover, load
from screener.model import load_checkpoint, to_tensors
from screener.pipeline import RunOptions, chunked
from screener.predict import predict_dos, spectral_columns
from screener.results.manifest import Manifest
from screener.results.shards import (
    read_graph_shard,
    shard_name,
    write_graph_shard,
    write_prediction_shard,
)
from screener.shipped import shipped_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
INPUTS = ("jarvis_structures.json.gz", "perov5_structures.json.gz")
RUN_DEFAULTS = {f.name: f.default for f in fields(RunOptions)}
STAGES = ("read", "graph", "write_graphs", "read_graphs", "batch", "forward", "write_predictions")
GRAPH_TASK = ("read", "graph", "write_graphs")
GPU_ACTOR_CPU = ("read_graphs", "batch", "write_predictions")
SIZES = (10**6, 10**7)
NODES = (1, 8, 64)
GPUS = (0, 1, 8, 64)


def pick(path: Path, n: int, seed: int) -> list[Source]:
    """A fixed random sample of an input's records, in input order."""
    sources = list(discover(path))
    order = np.random.default_rng(seed).permutation(len(sources))[:n]
    return [sources[i] for i in sorted(order)]


def clock(seconds: dict[str, np.ndarray], stage: str, fn, *args):
    """fn(*args), adding its (CPU, wall) seconds to seconds[stage]."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn(*args)
    spent = np.array([time.process_time() - cpu, time.perf_counter() - wall])
    seconds[stage] = seconds.get(stage, 0.0) + spent
    return out


def measure(sources: list[Source], model, attrs: dict, tmp: Path) -> tuple[dict, dict]:
    """Per structure: (CPU, wall) seconds of each stage, atoms and shard bytes; and the manifest
    record of the last shard written."""
    sec: dict[str, np.ndarray] = {}
    loaded = [clock(sec, "read", load, s) for s in sources]
    structures = [s for s in loaded if not isinstance(s, Failure)]
    failures = [s for s in loaded if isinstance(s, Failure)]
    shard, bs = RUN_DEFAULTS["shard_size"], RUN_DEFAULTS["batch_size"]
    graphs = [graph for chunk in chunked(structures, shard) for graph in clock(
        sec, "graph", build_graphs, [(s.lattice, s.positions, s.numbers) for s in chunk])]
    graph_bytes = prediction_bytes = 0
    chunks = zip(chunked(structures, shard), chunked(graphs, shard))
    for i, (chunk, chunk_graphs) in enumerate(chunks):
        graph_path, prediction_path = tmp / f"graphs-{i}.h5", tmp / f"predictions-{i}.h5"
        info = clock(sec, "write_graphs", write_graph_shard, graph_path, chunk, chunk_graphs,
                     failures if i == 0 else [], attrs)
        table, read_back, lost = clock(sec, "read_graphs", read_graph_shard, graph_path)
        for start in range(0, len(read_back), bs):
            clock(sec, "batch", lambda b: to_tensors(collate(b)), read_back[start:start + bs])
        dos = clock(sec, "predict", predict_dos, model, read_back, bs)
        record = clock(sec, "write_predictions", write_predictions, prediction_path, table, dos,
                       lost, attrs)
        graph_bytes += info["size"]
        prediction_bytes += record["size"]
    sec["forward"] = sec.pop("predict") - sec["batch"]
    n = len(sources)
    per = {k: v / n for k, v in sec.items()} | {
        "n": n, "atoms": sum(s.n_atoms for s in structures) / n,
        "graph_bytes": graph_bytes / n, "prediction_bytes": prediction_bytes / n}
    return per, {**record, "node": "0" * 56, "seconds": 0.0}


def write_predictions(path: Path, table: dict, dos: np.ndarray, failures: list, attrs: dict
                      ) -> dict:
    """The prediction shard as `Predictor.predict_shard` writes it: graph table, spectra, gaps."""
    return write_prediction_shard(path, {**table, "dos": dos, **spectral_columns(dos)},
                                  failures, attrs)


def manifest_cost(record: dict, tmp: Path, sizes: tuple[int, int] = (250, 2000)
                  ) -> dict[int, np.ndarray]:
    """(CPU, wall) seconds per Manifest.add, amortised over a run of each size from an empty
    manifest, snapshots included."""
    per_add = {}
    for n in sizes:
        manifest = Manifest.create(tmp / f"manifest-{n}", {"input": "projection"})
        spent: dict[str, np.ndarray] = {}
        for i in range(n):
            clock(spent, "add", manifest.add, shard_name("graphs", i), record)
        per_add[n] = spent["add"] / n
    return per_add


def workers(cost: dict, nodes: int, gpus: int, args) -> tuple[float, str]:
    """(structures/s, bounding stage) of the Ray workers, as screener.pipeline places the work."""
    cores = nodes * args.cores_per_node
    if gpus == 0:
        rates = {f"CPU cores ({largest(cost, STAGES)})": cores / sum(cost[s] for s in STAGES)}
    else:
        rates = {f"graph tasks on CPU nodes ({largest(cost, GRAPH_TASK)})":
                 cores / sum(cost[s] for s in GRAPH_TASK),
                 "GPU forward (ASSUMED rate)": gpus * args.gpu_rate,
                 f"GPU actors' one CPU each ({largest(cost, GPU_ACTOR_CPU)})":
                 gpus / sum(cost[s] for s in GPU_ACTOR_CPU)}
    bound, rate = min(rates.items(), key=lambda item: item[1])
    return rate, bound


def driver_seconds(cost: dict, n: int) -> tuple[float, int]:
    """Seconds the one driver spends recording the shards of n structures, and their number."""
    shards = 2 * math.ceil(n / RUN_DEFAULTS["shard_size"])
    return cost["manifest"] * shards, shards


def project(cost: dict, n: int, nodes: int, gpus: int, args) -> tuple[float, str, str]:
    """(wall seconds, what bounds it, the workers' own time and bound) for n structures: the run
    takes the workers' time, or the driver's when that is longer."""
    rate, bound = workers(cost, nodes, gpus, args)
    driver, shards = driver_seconds(cost, n)
    alone = duration(n / rate)
    if driver > n / rate:
        return driver, f"driver: manifest ({shards:,} shards)", f"{alone}, {bound}"
    return n / rate, bound, alone


def largest(cost: dict, stages: tuple[str, ...]) -> str:
    """The stage with the largest share of these stages' time, e.g. 'forward 81%'."""
    stage = max(stages, key=lambda s: cost[s])
    return f"{stage} {cost[stage] / sum(cost[s] for s in stages):.0%}"


def duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def pooled(measured: list[dict]) -> dict:
    """Per-structure figures over all samples together (each weighted by its structure count)."""
    total = sum(m["n"] for m in measured)
    keys = [*STAGES, "atoms", "graph_bytes", "prediction_bytes"]
    return {k: sum(m[k] * m["n"] for m in measured) / total for k in keys} | {"n": total}


def print_measured(names: list[str], measured: list[dict], both: dict, clock_index: int) -> None:
    """Stage costs per input (CPU and wall ms) and pooled (the clock the projection uses)."""
    header = " | ".join(f"{name} CPU | wall" for name in names)
    print(f"| ms per structure on 1 core | {header} | pooled, projected from |")
    print("| --- " * (2 * len(names) + 2) + "|")
    for stage in STAGES:
        cells = " | ".join(f"{m[stage][0] * 1e3:.3f} | {m[stage][1] * 1e3:.3f}" for m in measured)
        print(f"| {stage} | {cells} | {both[stage][clock_index] * 1e3:.3f} |")
    for key, label in (("atoms", "atoms"), ("graph_bytes", "graph shard bytes"),
                       ("prediction_bytes", "prediction shard bytes")):
        cells = " | ".join(f"{m[key]:,.1f} | " for m in measured)
        print(f"| {label} per structure | {cells} | {both[key]:,.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=256, help="structures sampled from each input")
    parser.add_argument("--inputs", nargs="+", default=INPUTS, help=f"files in {DATA}")
    parser.add_argument("--model", type=Path, help="checkpoint (default: the shipped model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="project from CPU time (default: steadier under load) or wall time")
    parser.add_argument("--cores-per-node", type=int, default=16)
    parser.add_argument("--gpu-rate", type=float, default=5000.0,
                        help="ASSUMED forward structures/s per GPU (default: bench_gpu.py's goal)")
    parser.add_argument("--cpu-node-price", type=float, default=0.70,
                        help="ASSUMED $ per CPU node-hour (default: a 16-core on-demand node)")
    parser.add_argument("--gpu-price", type=float, default=3.00,
                        help="ASSUMED $ per GPU-hour (default: one H100 with its host share)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before, t0 = os.getloadavg()[0], time.perf_counter()
    model, meta = load_checkpoint(args.model or shipped_model())
    attrs = {"model_id": meta["model_id"], "model_hash": meta["hash"]}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [measure(pick(DATA / name, args.limit, args.seed), model, attrs, Path(tmp) / name)
                for name in args.inputs]
        manifest = manifest_cost(runs[-1][1], Path(tmp))
    measured, both = [per for per, _ in runs], pooled([per for per, _ in runs])
    i = ("cpu", "wall").index(args.clock)
    cost = {k: (v[i] if isinstance(v, np.ndarray) else v)
            for k, v in (both | {"manifest": manifest[max(manifest)]}).items()}
    print(f"measured in {time.perf_counter() - t0:.0f} s on this machine, 1 thread; model "
          f"{meta['model_id']} {meta['config']}; batch {RUN_DEFAULTS['batch_size']}, shards of "
          f"{RUN_DEFAULTS['shard_size']}; load average (uptime) {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after, {os.cpu_count()} cores")
    print_measured(args.inputs, measured, both, i)
    print("driver, one Manifest.add amortised over a run of " + ", ".join(
        f"{n:,} shards: {ms[0]:.2f} ms CPU, {ms[1]:.2f} ms wall"
        for n, ms in ((n, sec * 1e3) for n, sec in manifest.items())))
    print(f"ASSUMED, not measured: GPU forward {args.gpu_rate:,.0f} structures/s per GPU "
          f"(--gpu-rate); ${args.cpu_node_price:.2f} per {args.cores_per_node}-core CPU node-hour "
          f"(--cpu-node-price); ${args.gpu_price:.2f} per GPU-hour (--gpu-price). Rows with 0 GPUs "
          f"use measured rates only; costs use the assumed prices.")
    print(f"\n| structures | CPU nodes x {args.cores_per_node} cores | GPUs | wall | cost "
          f"| bound by | workers alone (if the driver kept up) |\n" + "| --- " * 7 + "|")
    for n in SIZES:
        for nodes in NODES:
            for gpus in GPUS:
                wall, bound, alone = project(cost, n, nodes, gpus, args)
                price = wall / 3600 * (nodes * args.cpu_node_price + gpus * args.gpu_price)
                print(f"| 10^{math.log10(n):.0f} | {nodes} | {gpus} | {duration(wall)} "
                      f"| ${price:,.2f} | {bound} | {alone} |")
    graph_gb, prediction_gb = cost["graph_bytes"] / 1e9, cost["prediction_bytes"] / 1e9
    storage = "; ".join(f"10^{math.log10(n):.0f}: {n * (graph_gb + prediction_gb):,.1f} GB "
                        f"(graphs {n * graph_gb:,.1f} + predictions {n * prediction_gb:,.1f})"
                        for n in SIZES)
    print(f"\nstorage: {storage}")
    wall, bound, alone = project(cost, SIZES[1], NODES[-1], 0, args)
    print(f"SUMMARY project_scale: {cost['n']} structures measured, "
          f"{1 / sum(cost[s] for s in STAGES):.1f} structures/s per core end to end ({args.clock} "
          f"time); 10^7 on {NODES[-1]} CPU nodes, no GPU: {duration(wall)}, bound by {bound} "
          f"(workers alone {alone}); "
          f"storage {(graph_gb + prediction_gb) * 1e6:.1f} kB/structure; GPU rate "
          f"{args.gpu_rate:,.0f}/s ASSUMED")


if __name__ == "__main__":
    main()
