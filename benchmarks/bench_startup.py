"""Benchmark: start-up of the `screen` command line, and that it does not import torch or ray.

Times `screen --help` and `screen query RESULTS` (plain, and filtered as in the design doc) in
fresh processes, best and median of several runs after one warm-up run, and checks in a fresh
interpreter, running each command through click's CliRunner, which heavy packages it loaded.
`screen` is the installed console script when it is screener's, else `python -m screener.cli`.

Without --results, a results directory is made in a temporary folder: the 2,312 JARVIS
structures in shards of 256, as `screen run` lays them out, each with a stand-in spectrum (flat
bands around the record's OptB88vdW gap); a query's cost depends on the rows, not the values.

    python benchmarks/bench_startup.py [--results DIR] [--runs 7]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "jarvis_structures.json.gz"
HEAVY = ("torch", "ray", "jarvis", "scipy", "matplotlib", "pandas")
FORBIDDEN = ("torch", "ray")
GOAL = 0.5
SHARD = 256
CHECK = """
import json, sys
from click.testing import CliRunner
from screener.cli import main
result = CliRunner().invoke(main, sys.argv[1:])
loaded = [m for m in {heavy!r} if m in sys.modules]
print(json.dumps({{"exit_code": result.exit_code, "loaded": loaded, "output": result.output[-300:]}}))
"""


def screen_command() -> list[str]:
    """The installed `screen` when it is screener's entry point (GNU screen shares the name)."""
    path = shutil.which("screen")
    if path:
        try:
            with open(path, "rb") as f:
                if b"screener.cli" in f.read(4096):
                    return [path]
        except OSError:
            pass
    return [sys.executable, "-m", "screener.cli"]


def make_results(out: Path, data: Path) -> int:
    """A results dir of the JARVIS structures with stand-in spectra; returns the row count."""
    from screener.dos import ENERGY_GRID, band_gap, dos_at_ef
    from screener.io import Failure, discover, load, read_records
    from screener.io.records import reference_gaps
    from screener.results.manifest import Manifest
    from screener.results.shards import elements_of, shard_name, write_prediction_shard

    gaps = reference_gaps(read_records(data), data)
    structures = [s for s in map(load, discover(data)) if not isinstance(s, Failure)]
    manifest = Manifest.create(out, {"input": str(data), "shard_size": SHARD})
    (out / "predictions").mkdir(exist_ok=True)
    for index, start in enumerate(range(0, len(structures), SHARD)):
        chunk = structures[start:start + SHARD]
        gap = np.nan_to_num([gaps.get(s.id, 0.0) for s in chunk])[:, None]
        dos = np.where((ENERGY_GRID < 0) | (ENERGY_GRID >= gap), 0.05, 0.0).astype(np.float32)
        gap_, vbm, cbm = band_gap(dos)
        formulas = [s.formula for s in chunk]
        table = {"ids": [s.id for s in chunk], "source": [s.source for s in chunk],
                 "formula": formulas, "elements": [elements_of(f) for f in formulas],
                 "n_atoms": [s.n_atoms for s in chunk], "band_gap": gap_, "vbm": vbm, "cbm": cbm,
                 "dos_at_ef": dos_at_ef(dos), "dos": dos}
        name = shard_name("predictions", index)
        info = write_prediction_shard(out / name, table, [],
                                      {"model_id": "bench-stand-in", "model_hash": "none"})
        manifest.add(name, info)
    return len(structures)


def wall_times(command: list[str], runs: int) -> list[float]:
    subprocess.run(command, capture_output=True, check=True)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return times


def loaded_modules(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", CHECK.format(heavy=HEAVY), *argv],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def slowest_imports(argv: list[str], n: int = 5) -> str:
    """Top-level packages by cumulative import time (python -X importtime)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "screener.cli", *argv],
                         capture_output=True, text=True, check=True)
    rows = []
    for line in out.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit() and not parts[2].startswith("  "):
            rows.append((int(parts[1]), parts[2].strip()))
    return ", ".join(f"{name} {us / 1000:.0f} ms" for us, name in sorted(rows, reverse=True)[:n])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, help="an existing results dir (default: made here)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        results = args.results
        if results is None:
            results = Path(tmp) / "results"
            n_rows = make_results(results, args.data)
            print(f"results dir: {n_rows} stand-in predictions in {-(-n_rows // SHARD)} shards")
        screen = screen_command()
        print(f"command: {' '.join(screen)}; {args.runs} runs each after one warm-up")
        cases = {"--help": ["--help"], "query": ["query", str(results)],
                 "query --bandgap 1.4:1.6 --elements O": ["query", str(results), "--bandgap",
                                                          "1.4:1.6", "--elements", "O"]}
        worst, clean = 0.0, True
        for label, argv in cases.items():
            times = wall_times(screen + argv, args.runs)
            check = loaded_modules(argv)
            forbidden = [m for m in check["loaded"] if m in FORBIDDEN]
            clean &= not forbidden and check["exit_code"] == 0
            worst = max(worst, statistics.median(times))
            print(f"screen {label:40s} best {min(times):.3f} s  median {statistics.median(times):.3f} s"
                  f"  heavy modules loaded: {check['loaded'] or 'none'}"
                  f"{'  FORBIDDEN ' + str(forbidden) if forbidden else ''}"
                  f"{'' if check['exit_code'] == 0 else '  exit code ' + str(check['exit_code'])}")
            print(f"    slowest imports: {slowest_imports(argv)}")
        verdict = "met" if worst < GOAL and clean else "NOT met"
        print(f"SUMMARY bench_startup: slowest median {worst:.3f} s (goal < {GOAL} s) {verdict}; "
              f"torch/ray imported: {'no' if clean else 'YES'}")


if __name__ == "__main__":
    main()
