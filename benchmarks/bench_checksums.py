"""Benchmark: what the checksums on every read cost a query.

Makes the results dir of the 18,928 perovskites as bench_startup does (stand-in spectra: a
query's cost depends on the rows, not the values), then a copy of it laid out as shards were
before checksums (variable-length strings, no fletcher32, the earliest HDF5 format). Times the
same queries on both, in this process, alternating the two so that a busy machine slows both
alike; reports the best of the repeats and their ratio.

    python benchmarks/bench_checksums.py [--repeats 7] [--data ../shared/data/perov5_structures.json.gz]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
from bench_startup import make_results

from screener.results.hdf5 import attr
from screener.results.manifest import Manifest
from screener.results.query import query, read_predictions
from screener.results.shards import shard_info

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "perov5_structures.json.gz"
QUERIES = {
    "query --bandgap 1.4:1.6 --elements O": {"bandgap": (1.4, 1.6), "elements": ["O"]},
    "query (every row, sorted by gap)": {},
    "query --bandgap 0:1 with dos": {"bandgap": (0, 1), "with_dos": True},
    "read_predictions (every column, dos too)": None,
}


def unchecked_copy(source: Path, target: Path) -> None:
    """`source` as written before checksums."""
    with h5py.File(source, "r") as old, h5py.File(target, "w") as new:
        for key in old.attrs:
            new.attrs[key] = attr(old, key)

        def copy(name: str, obj) -> None:
            if isinstance(obj, h5py.Dataset):
                if h5py.check_string_dtype(obj.dtype) is not None:
                    new.create_dataset(name, data=obj.asstr()[()].astype(object),
                                       dtype=h5py.string_dtype())
                elif obj.size == 0:
                    new.create_dataset(name, data=obj[()])
                else:
                    new.create_dataset(name, data=obj[()], chunks=obj.chunks,
                                       compression=obj.compression,
                                       compression_opts=obj.compression_opts)
        old.visititems(copy)


def unchecked_results(results: Path, target: Path) -> None:
    checked = Manifest.load(results)
    manifest = Manifest.create(target, checked.config)
    (target / "predictions").mkdir()
    for name in checked.complete("predictions"):
        unchecked_copy(results / name, target / name)
        manifest.add(name, shard_info(target / name))


def seconds(results: Path, criteria: dict | None) -> float:
    start = time.perf_counter()
    if criteria is None:
        read_predictions(results)
    else:
        query(results, **criteria)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checked, unchecked = Path(tmp) / "checked", Path(tmp) / "unchecked"
        n_rows = make_results(checked, args.data)
        unchecked_results(checked, unchecked)
        sizes = [sum(p.stat().st_size for p in (d / "predictions").iterdir())
                 for d in (checked, unchecked)]
        print(f"{n_rows} rows in {len(Manifest.load(checked).shards)} shards; "
              f"{sizes[0] / 1e6:.2f} MB with checksums, {sizes[1] / 1e6:.2f} MB without")
        print(f"best of {args.repeats}, the two layouts alternating")
        for label, criteria in QUERIES.items():
            best = {checked: float("inf"), unchecked: float("inf")}
            for _ in range(args.repeats):
                for results in (checked, unchecked):
                    best[results] = min(best[results], seconds(results, criteria))
            print(f"{label:42s} with {best[checked] * 1e3:7.1f} ms  without "
                  f"{best[unchecked] * 1e3:7.1f} ms  ratio {best[checked] / best[unchecked]:.2f}")


if __name__ == "__main__":
    main()
