"""Per-stage progress bars for long runs, fed by the pipeline's stage events."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from screener.io import discover

STAGES = ("graphs", "predict")


@contextmanager
def progress_printer(inputs: str | Path | None = None, disable: bool = False
                     ) -> Iterator[Callable[[str, int], None]]:
    """Yield `on_progress(stage, n_structures)`; one bar per stage.

    The pipeline streams its inputs, so it never knows their number; a thread counts the
    inputs at `inputs` (a second walk of the folder, no structure parsed) and gives the bars
    their total, and so an ETA, as soon as it has it.
    """
    bars = {
        stage: tqdm(desc=f"{stage:>8}", unit=" structures", position=i, disable=disable,
                    dynamic_ncols=True)
        for i, stage in enumerate(STAGES)
    }
    if inputs is not None and not disable:
        threading.Thread(target=_set_total, args=(bars, inputs), daemon=True).start()
    try:
        yield lambda stage, n: bars[stage].update(n)
    finally:
        for bar in bars.values():
            bar.close()


def _set_total(bars: dict[str, tqdm], inputs: str | Path) -> None:
    try:
        total = sum(1 for _ in discover(inputs))
    except OSError:  # the run itself reports an unreadable input
        return
    for bar in bars.values():
        bar.total = total
        bar.refresh()
