"""Benchmark 1: crystal + line graph construction, screener.graphs vs upstream ALIGNN.

The anchor is upstream's DGL-free builder, alignn.torch_graph_builder.build_pure_torch_graph
(two_body_cutoff=8.0, max_neighbors=16), run in this same process on the same structures, one
thread for both. Ours is timed on the path the pipeline's graph task takes: one
`build_graphs` call per chunk of `RunOptions.shard_size` structures, in input order. Upstream
takes one structure per call. The two are timed alternately chunk by chunk, so load from other
processes on a shared machine hits both alike. Inputs are prepared before timing: our
Structure arrays, and jarvis Atoms (what upstream takes).

Both must give each atom the same 16 nearest-neighbour distances; upstream keeps at most 16
neighbours within its 8 A cutoff, so an atom with fewer than 16 there is reported as a mismatch.

    python benchmarks/bench_graphs.py [--limit N]
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from alignn.torch_graph_builder import build_pure_torch_graph
from jarvis.core.atoms import Atoms

from screener.graphs import K, build_graphs
from screener.io import Failure, discover, load
from screener.pipeline import RunOptions

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "jarvis_structures.json.gz"
CUTOFF = 8.0
TOLERANCE = 1e-4  # Angstrom; both builders keep float32 bond vectors
WARMUP = 5
GOAL = 10.0
CHUNK = RunOptions.shard_size


def upstream_graph(atoms: Atoms):
    return build_pure_torch_graph(atoms, two_body_cutoff=CUTOFF, max_neighbors=K)


def inputs(path: Path, limit: int | None):
    """(Structure, jarvis Atoms) pairs of every record that loads, and the load failures."""
    pairs, failures = [], []
    for source in list(discover(path))[:limit]:
        structure = load(source)
        if isinstance(structure, Failure):
            failures.append(structure)
        else:
            pairs.append((structure, Atoms.from_dict(source.record)))
    return pairs, failures


def timed(fn, *args) -> tuple[object, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def ours_graphs(chunk) -> list[dict]:
    return build_graphs([(s.lattice, s.positions, s.numbers) for s, _ in chunk])


def upstream_graphs(chunk) -> list:
    return [upstream_graph(atoms) for _, atoms in chunk]


def run(pairs) -> tuple[dict, dict, list, list]:
    """Build every graph with both builders, alternating chunk by chunk; totals of wall and CPU
    seconds."""
    ours_graphs(pairs[:WARMUP])
    upstream_graphs(pairs[:WARMUP])
    ours_t, up_t = Counter(), Counter()
    ours_d, up_d = [], []
    for start in range(0, len(pairs), CHUNK):
        chunk = pairs[start:start + CHUNK]
        graphs, wall, cpu = timed(ours_graphs, chunk)
        ours_t.update(wall=wall, cpu=cpu, edges=sum(len(g["neighbors"]) for g in graphs),
                      lines=sum(len(g["angle_cos"]) for g in graphs))
        ours_d += [np.linalg.norm(g["edge_vec"], axis=1).reshape(-1, K) for g in graphs]
        built, wall, cpu = timed(upstream_graphs, chunk)
        up_t.update(wall=wall, cpu=cpu, edges=sum(g.num_edges for g, _ in built),
                    lines=sum(lg.num_edges for _, lg in built))
        up_d += [(g.src.numpy(), g.edata["r"].norm(dim=1).numpy()) for g, _ in built]
    return ours_t, up_t, ours_d, up_d


def compare(structure_id: str, ours: np.ndarray, upstream: tuple[np.ndarray, np.ndarray]
            ) -> tuple[float, str | None]:
    """Largest |difference| of the per-atom sorted 16 smallest distances, and why they differ
    (None when they agree within TOLERANCE)."""
    src, dist = upstream
    counts = np.bincount(src, minlength=len(ours))
    if np.any(counts < K):
        atom = int(np.argmin(counts))
        return np.inf, (f"{structure_id}: upstream finds only {counts[atom]} neighbours within its "
                        f"{CUTOFF} A cutoff for atom {atom} (ours: 16th at {ours[atom, -1]:.3f} A)")
    theirs = np.stack([np.sort(dist[src == i])[:K] for i in range(len(ours))])
    diff = np.abs(np.sort(ours, axis=1) - theirs)
    if diff.max() <= TOLERANCE:
        return float(diff.max()), None
    atom, rank = np.unravel_index(np.argmax(diff), diff.shape)
    return float(diff.max()), (f"{structure_id}: atom {atom} neighbour {rank}: ours "
                               f"{ours[atom, rank]:.6f} A, upstream {theirs[atom, rank]:.6f} A")


def rates(totals: dict, n_structures: int, n_atoms: int) -> str:
    return (f"wall {totals['wall']:7.2f} s  cpu {totals['cpu']:7.2f} s  "
            f"{n_structures / totals['wall']:8.1f} structures/s  {n_atoms / totals['wall']:9.0f} atoms/s"
            f"  (per cpu-s: {n_structures / totals['cpu']:.1f} structures)")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, help="only the first N structures (quick run)")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    torch.set_num_threads(1)

    pairs, failures = inputs(args.data, args.limit)
    n, n_atoms = len(pairs), sum(s.n_atoms for s, _ in pairs)
    print(f"{n} structures ({n_atoms} atoms) from {args.data}, {len(failures)} failed to load; "
          f"1 thread; {WARMUP} warm-up builds each; load average {load_average()}")
    print(f"ours fed as the pipeline's graph task does: one build_graphs call per chunk of "
          f"{CHUNK} (RunOptions.shard_size); upstream one structure per call")
    ours_t, up_t, ours_d, up_d = run(pairs)
    print(f"ours      screener.graphs.build_graphs (k=16)   : {rates(ours_t, n, n_atoms)}")
    print(f"upstream  build_pure_torch_graph (8.0 A, 16 nn) : {rates(up_t, n, n_atoms)}")
    ratio, ratio_cpu = up_t["wall"] / ours_t["wall"], up_t["cpu"] / ours_t["cpu"]
    print(f"ratio ours/upstream throughput: {ratio:.2f}x wall, {ratio_cpu:.2f}x cpu (goal >= {GOAL:g}x)")
    print(f"graph sizes per atom: ours {ours_t['edges'] / n_atoms:.1f} edges, "
          f"{ours_t['lines'] / n_atoms:.1f} line-graph edges (ordered pairs of distinct bonds at a centre); "
          f"upstream {up_t['edges'] / n_atoms:.1f} edges, {up_t['lines'] / n_atoms:.1f} line-graph edges "
          f"(bond u->v followed by every bond v->w)")

    checks = [compare(s.id, o, u) for (s, _), o, u in zip(pairs, ours_d, up_d)]
    mismatches = [reason for _, reason in checks if reason]
    agreeing = max((d for d, reason in checks if reason is None), default=0.0)
    print(f"16-NN distances: {n - len(mismatches)}/{n} structures agree within {TOLERANCE} A "
          f"(largest |difference| among them {agreeing:.2e} A)")
    for line in mismatches[:10]:
        print(f"  mismatch {line}")
    if len(mismatches) > 10:
        print(f"  ... {len(mismatches) - 10} more")
    verdict = "met" if ratio >= GOAL else "NOT met"
    print(f"SUMMARY bench_graphs: ours {n / ours_t['wall']:.0f} vs upstream {n / up_t['wall']:.0f} "
          f"structures/s = {ratio:.2f}x (cpu {ratio_cpu:.2f}x), goal >= {GOAL:g}x {verdict}; "
          f"16-NN distances agree {n - len(mismatches)}/{n}; chunks of {CHUNK}; "
          f"load average {load_average()}")


if __name__ == "__main__":
    main()
