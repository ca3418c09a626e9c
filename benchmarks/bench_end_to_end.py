"""End to end: `screen run` over real inputs, wall time, structures/s, peak RSS, stage shares.

    python benchmarks/bench_end_to_end.py [--model PATH] [--inputs perov5_structures.json.gz ...]

Each input runs in a fresh results folder under `/usr/bin/time -v`, so peak RSS is the
driver's. Stage times are worker-seconds reported by the pipeline; with one prediction actor
the pipeline is stall-free when wall time is close to the prediction stage's own time.
"""
import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_INPUTS = ("jarvis_structures.json.gz", "perov5_structures.json.gz")


def run_once(structures: Path, out: Path, model: str | None) -> dict:
    cmd = ["/usr/bin/time", "-v", "screen", "run", "--structures", str(structures), "-o", str(out),
           "--quiet", *(["--model", model] if model else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    text = proc.stdout + proc.stderr
    n_read = int(re.search(r"read (\d+)", text).group(1))
    wall = _seconds(re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    line = re.search(r"stage time[^:]*: (.*)", text).group(1)
    stages = {name: float(sec) for name, sec in re.findall(r"(\w+) ([\d.]+) s", line)}
    return {"n": n_read, "wall": wall, "rss_mb": rss_kb / 1024, "stages": stages}


def _seconds(clock: str) -> float:
    parts = [float(p) for p in clock.split(":")]
    return sum(p * 60**i for i, p in enumerate(reversed(parts)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--inputs", nargs="+", default=DEFAULT_INPUTS)
    args = parser.parse_args()
    results = {}
    for name in args.inputs:
        with tempfile.TemporaryDirectory() as tmp:
            r = results[name] = run_once(DATA / name, Path(tmp) / "out", args.model)
        shares = ", ".join(f"{k} {v / r['wall']:.0%}" for k, v in r["stages"].items())
        slowest = max(v for k, v in r["stages"].items() if k != "ray_start")
        print(f"{name}: {r['n']} structures, wall {r['wall']:.1f} s, {r['n'] / r['wall']:.1f} structures/s, "
              f"peak RSS {r['rss_mb']:.0f} MB; stage time / wall: {shares}; "
              f"wall / slowest stage {r['wall'] / slowest:.2f}")
    small, large = (results[n] for n in args.inputs[:2]) if len(results) > 1 else (None, None)
    ratio = f", RSS {args.inputs[1]} / {args.inputs[0]} {large['rss_mb'] / small['rss_mb']:.2f}" if small else ""
    print("SUMMARY " + "; ".join(f"{n}: {r['n'] / r['wall']:.1f}/s, {r['rss_mb']:.0f} MB"
                                  for n, r in results.items()) + ratio)


if __name__ == "__main__":
    sys.exit(main())
