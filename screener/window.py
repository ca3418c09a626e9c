"""Windows of values: LO:HI text, inclusive ranges, P(LO <= gap <= HI), and the shortlist rule.

P(gap in window) comes from a predicted P(metal) and a non-metal gap's mean and spread.

A metal's gap is 0; a non-metal's is a normal distribution (the gap head's calibrated
ensemble mean and spread) cut off below dos.METAL_BELOW_EV, the smallest gap a spectrum
on the grid can show. A spread of 0 (a model without a gap head) makes the probability 1 or
0: whether the point gap lies in the window, inclusive at float32 precision as queries are.
"""
from __future__ import annotations

import math

import numpy as np

from screener.dos import METAL_BELOW_EV

_erf = np.frompyfunc(math.erf, 1, 1)  # numpy has no erf, and scipy slows `screen query`'s start


def p_in_window(p_metal: np.ndarray, mean: np.ndarray, std: np.ndarray, lo: float | None,
                hi: float | None) -> np.ndarray:
    """Per structure, the probability that its gap lies in [lo, hi] eV (None: open end)."""
    p_metal, mean, std = (np.asarray(a, np.float64) for a in (p_metal, mean, std))
    lo_v = -np.inf if lo is None else float(lo)
    hi_v = np.inf if hi is None else float(hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        def cdf(x: float) -> np.ndarray:
            return 0.5 * (1.0 + _erf((x - mean) / (std * math.sqrt(2.0))).astype(np.float64))

        floor = cdf(METAL_BELOW_EV)
        inside = (cdf(hi_v) - cdf(max(lo_v, METAL_BELOW_EV))) / (1.0 - floor)
    if hi_v < METAL_BELOW_EV:
        inside = np.zeros_like(mean)
    exact = in_range(mean.astype(np.float32), (lo, hi))
    inside = np.where(std > 0, np.clip(np.nan_to_num(inside), 0.0, 1.0), exact)
    metal_inside = float(lo_v <= 0.0 <= hi_v)
    return (p_metal * metal_inside + (1.0 - p_metal) * inside).astype(np.float32)


def in_range(values: np.ndarray, bounds: tuple[float | None, float | None]) -> np.ndarray:
    """Inclusive at the stored precision: a bound of 1.4 keeps a float32 1.4. Integers are
    compared with the bound as given, which may be infinite or fractional."""
    lo, hi = bounds
    cast = values.dtype.type if values.dtype.kind == "f" else float
    keep = np.ones(len(values), dtype=bool)
    if lo is not None:
        keep &= values >= cast(lo)
    if hi is not None:
        keep &= values <= cast(hi)
    return keep


def shortlisted(p_window: np.ndarray, gap: np.ndarray, bandgap: tuple[float | None, float | None],
                min_probability: float) -> np.ndarray:
    """Whether each row makes a window's shortlist: its gap (the point estimate) lies inside,
    or P(gap in window) is at least `min_probability`. The point rule keeps narrow windows
    usable, in which a spread of tenths of an eV leaves no P high; the P rule adds structures
    whose gap may well be inside although its estimate is not."""
    return in_range(gap, bandgap) | (p_window >= np.float32(min_probability))


def parse_window(text: str) -> tuple[float, float]:
    """'1.4:1.6' -> (1.4, 1.6); an empty side is unbounded. A ValueError says what is wrong."""
    try:
        lo, hi = text.split(":")
        window = (float(lo) if lo else float("-inf"), float(hi) if hi else float("inf"))
    except ValueError:
        raise ValueError(f"expected LO:HI such as 1.4:1.6, got {text!r}") from None
    if window[0] != window[0] or window[1] != window[1]:
        raise ValueError(f"{text!r}: NaN is no bound; leave a side empty for none")
    if window[0] > window[1]:
        raise ValueError(f"{text!r}: LO is above HI")
    return window
