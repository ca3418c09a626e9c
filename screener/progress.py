"""Per-stage progress bars for long runs, fed by the pipeline's stage events."""
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

STAGES = ("graphs", "predict")


@contextmanager
def progress_printer(disable: bool = False) -> Iterator[Callable[[str, int], None]]:
    """Yield `on_progress(stage, n_structures)`; one bar per stage, totals unknown while streaming."""
    bars = {
        stage: tqdm(desc=f"{stage:>8}", unit=" structures", position=i, disable=disable, dynamic_ncols=True)
        for i, stage in enumerate(STAGES)
    }
    try:
        yield lambda stage, n: bars[stage].update(n)
    finally:
        for bar in bars.values():
            bar.close()
