"""Benchmark 2 on a GPU: D-ALIGNN forward structures/s in fp32, TF32 and bf16 autocast over a
batch-size sweep, ours vs upstream ALIGNNAtomWisePure at the sizes of bench_inference.py (hidden
256, 4 ALIGNN + 4 GCN layers, 300 outputs).

Graphs are built and batched before timing and the batches moved to the device, so the figure is
the model's own throughput; whether `screen run`'s GPU actors reach it depends on their CPU
(benchmarks/project_scale.py). Weights are random: speed does not depend on them. Each point
cycles through the sampled structures in batches of its size, after one warm-up batch, with the
device synchronised around the timed pass. GPU utilisation and memory are sampled from
`nvidia-smi` in a thread when it is on PATH; torch reports the peak memory it allocated.
`--device cpu` runs the same code with a tiny sweep, to check the script without a GPU.

    python benchmarks/bench_gpu.py --device cuda [--batch-sizes 64 128 256 512 1024 2048]
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_gpu.py --device cpu --limit 8 \
        --batch-sizes 4 8 --per-point 8 --threads 1
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Self

import numpy as np
import torch
from alignn.torch_graph_builder import batch_torch_graph_pairs, build_pure_torch_graph
from bench_inference import DATA, SIZES, n_params, sample, upstream_model

from screener.graphs import build_graph, collate
from screener.model import build_model, to_tensors

GOAL = 5000.0
MODES = ("fp32", "tf32", "bf16")
CUDA_SWEEP = (64, 128, 256, 512, 1024, 2048)
CPU_SWEEP = (8, 16)


class GpuSampler:
    """Mean utilisation and peak memory from `nvidia-smi` every `period` s, in a thread."""

    QUERY = ("--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits")

    def __init__(self, period: float = 0.2) -> None:
        self.command = shutil.which("nvidia-smi")
        self.period = period
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        if self.command:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def _run(self) -> None:
        while not self.stop.wait(self.period):
            out = subprocess.run([self.command, *self.QUERY], capture_output=True, text=True,
                                 check=False)
            if out.returncode == 0 and out.stdout.strip():
                util, memory = out.stdout.splitlines()[0].split(",")
                self.samples.append((float(util), float(memory)))

    def summary(self) -> str:
        if not self.samples:
            return "n/a" if self.command is None else "no sample"
        util, memory = np.array(self.samples).T
        return f"{util.mean():.0f}% ({len(util)} samples), {memory.max():,.0f} MiB"


@contextlib.contextmanager
def precision(mode: str, device: torch.device) -> Iterator[None]:
    """fp32 with TF32 off, TF32 matmuls, or bf16 autocast; restores the matmul precision."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if mode == "tf32" else "highest")
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16"):
            yield
    finally:
        torch.set_float32_matmul_precision(before)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_batch(label: str, chosen: list, device: torch.device):
    """One batch of (our graph, upstream's graph pair) items, as `label`'s model takes it."""
    if label == "ours":
        return to_tensors(collate([p[0] for p in chosen]), device)
    g, lg = batch_torch_graph_pairs([p[1] for p in chosen])
    return g.to(device), lg.to(device), None


def device_batches(pairs: list, label: str, batch_size: int, total: int, device: torch.device
                   ) -> tuple[list, int]:
    """Batches of `batch_size` on the device cycling through `pairs` until at least `total`
    structures, and their number of structures."""
    order = np.resize(np.arange(len(pairs)), max(total, batch_size))
    starts = range(0, len(order), batch_size)
    return [device_batch(label, [pairs[i] for i in order[s:s + batch_size]], device)
            for s in starts], len(order)


def point(forward: Callable, batches: list, n: int, mode: str, device: torch.device) -> dict:
    """Structures/s of one model, mode and batch size over n structures, or why it could not run."""
    failure = None
    try:
        with precision(mode, device), torch.inference_mode():
            forward(batches[0])
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with GpuSampler() as gpu:
                t0 = time.perf_counter()
                for batch in batches:
                    forward(batch)
                synchronize(device)
                seconds = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - out of memory or an unsupported dtype ends one point
        failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    if failure:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the failed point's tensors went with its traceback
        return {"rate": 0.0, "note": failure}
    result = {"rate": n / seconds, "ms": 1e3 * seconds / len(batches), "note": ""}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        result["note"] = f"torch peak {peak:,.0f} MiB, nvidia-smi {gpu.summary()}"
    return result


def agreement(ours: torch.nn.Module, batch: dict, device: torch.device) -> str:
    """How far TF32 and bf16 outputs of our model stray from fp32 on one batch."""
    with torch.inference_mode():
        outputs = {}
        for mode in MODES:
            with precision(mode, device):
                outputs[mode] = ours(batch).float()
    ref = outputs["fp32"]
    diffs = ", ".join(f"{m} {float((outputs[m] - ref).abs().max()):.2e}" for m in MODES[1:])
    return (f"ours, max |output - fp32 output| on one batch: {diffs} (outputs up to "
            f"{float(ref.max()):.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1 or cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+",
                        help=f"default {CUDA_SWEEP} on a GPU, {CPU_SWEEP} on the CPU")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    parser.add_argument("--limit", type=int, default=0, help="structures sampled (0: all 2,312)")
    parser.add_argument("--per-point", type=int, default=0,
                        help="structures per point (default: 4 x the largest batch)")
    parser.add_argument("--no-upstream", action="store_true", help="time ours only")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="of the structure sample")
    args = parser.parse_args()
    device = torch.device(args.device)
    sweep = args.batch_sizes or (CUDA_SWEEP if device.type == "cuda" else CPU_SWEEP)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    pairs = [(build_graph(s.lattice, s.positions, s.numbers),
              build_pure_torch_graph(a, two_body_cutoff=SIZES["cutoff"], max_neighbors=16))
             for s, a in sample(DATA, args.limit or None, args.seed)]
    per_point = args.per_point or 4 * max(sweep)
    ours = build_model("d-alignn", dict(SIZES)).to(device).eval()
    models = {"ours": ours}
    if not args.no_upstream:
        models["upstream"] = upstream_model().to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, load average "
          f"(uptime) {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
          f"{len(pairs)} JARVIS structures (seed {args.seed}) cycled to {per_point} per point; "
          f"parameters ours {n_params(ours):,}" + (
              f", upstream {n_params(models['upstream']):,}" if "upstream" in models else ""))

    results = {}
    for batch_size in sweep:
        for label, model in models.items():
            batches, n = device_batches(pairs, label, batch_size, per_point, device)
            if label == "ours" and batch_size == sweep[0]:
                print(agreement(ours, batches[0], device))
            for mode in args.modes:
                r = results[label, mode, batch_size] = point(model, batches, n, mode, device)
                ms = f"{r['ms']:8.1f} ms/batch" if "ms" in r else ""
                print(f"{label:8s} {mode:4s} batch {batch_size:5d}: {r['rate']:9.1f} structures/s "
                      f"{ms}  {r['note']}")
            del batches

    for mode in args.modes:
        rates = [(b, results["ours", mode, b]["rate"], results.get(("upstream", mode, b), {}))
                 for b in sweep]
        ratios = [f"{b}: {r / up['rate']:.2f}x" for b, r, up in rates if up.get("rate")]
        if ratios:
            print(f"ours / upstream, {mode}: " + ", ".join(ratios))
    (_, mode, batch_size), best = max(((k, r) for k, r in results.items() if k[0] == "ours"),
                                      key=lambda item: item[1]["rate"])
    verdict = "met" if best["rate"] >= GOAL else "NOT met"
    if device.type != "cuda":
        verdict = "applies to --device cuda only"
    print(f"SUMMARY bench_gpu: ours best {best['rate']:,.1f} structures/s ({mode}, batch "
          f"{batch_size}) on {name}; goal >= {GOAL:,.0f} structures/s on one H100: {verdict}")


if __name__ == "__main__":
    main()
