"""The screening job end to end: predict every structure, shortlist a gap window, and optionally
DFT-check the top of the shortlist. The CLI and jobs/ call `screen` and only print."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from screener import pipeline
from screener.errors import ScreenerError
from screener.io import Failure
from screener.progress import progress_printer
from screener.results.manifest import complete_shards
from screener.results.query import default_min_probability, query, read_failures, read_predictions
from screener.results.tables import with_units, write_csv

if TYPE_CHECKING:
    from screener.dft.verify import Verification

SHORTLIST = "shortlist.csv"


class OptionError(ScreenerError, ValueError):
    """Options that do not go together, found before any work; the CLI shows a usage error."""


@dataclass(frozen=True)
class ScreenSummary:
    """What a screen did: the prediction run's counts and times, every failure, and how many
    structures lie outside the model's domain; with a window, the shortlist (columns named with
    their units, as shortlist.csv has them), where it was written, the P(in window) it was cut
    at, and the DFT check of its top."""

    run: pipeline.Summary
    failures: list[Failure]
    n_outside_domain: int
    shortlist: dict[str, np.ndarray] | None = None
    shortlist_path: Path | None = None
    min_probability: float | None = None
    verification: Verification | None = None


def screen(opts: pipeline.RunOptions, *, bandgap: tuple[float, float] | None = None,
           min_probability: float | None = None, strict_domain: bool = False,
           verify_top: int | None = None, progress: bool = True) -> ScreenSummary:
    """Screen every structure under `opts.structures` into `opts.out_dir`; a rerun resumes
    (pipeline.run).

    With `bandgap`, shortlist.csv lists the structures whose gap is inside or whose P(gap in
    window) >= `min_probability` (default: the model's), leaving out those outside the model's
    domain when `strict_domain`. `verify_top` then DFT-checks that many of the shortlist on the
    same Ray (screener.dft.verify); whether it can is checked before any work.
    """
    if verify_top is not None:
        _check_verify(bandgap)
    out_dir = opts.out_dir
    with progress_printer(opts.structures, disable=not progress) as on_progress:
        run = pipeline.run(opts, on_progress)
    failures = read_failures(out_dir)
    outside = int(np.sum(~read_predictions(out_dir, ["in_domain"])["in_domain"]))
    if bandgap is None:
        return ScreenSummary(run, failures, outside)
    if min_probability is None:
        min_probability = default_min_probability(complete_shards(out_dir))
    rows = with_units(query(out_dir, bandgap=bandgap, min_probability=min_probability,
                            in_domain_only=strict_domain))
    path = Path(out_dir) / SHORTLIST
    write_csv(rows, path)
    checked = (None if verify_top is None
               else _verify(out_dir, bandgap, verify_top, opts.address, progress))
    return ScreenSummary(run, failures, outside, rows, path, min_probability, checked)


def _check_verify(bandgap: tuple[float, float] | None) -> None:
    from screener.dft.label import require_gpaw

    if bandgap is None:
        raise OptionError("--verify checks the top of the --bandgap shortlist: give --bandgap")
    require_gpaw()


def _verify(out_dir: str | Path, bandgap: tuple[float, float], n: int, address: str | None,
            progress: bool) -> Verification:
    """The DFT check, its refusals (a results dir labelled with other settings) as one line."""
    from screener.dft import verify

    try:
        return verify.verify(out_dir, bandgap, n, address=address, progress=progress)
    except ValueError as error:
        raise ScreenerError(str(error)) from None
