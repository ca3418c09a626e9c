"""What a DDP worker holds of the data: its shard of each split, with graphs, targets and bounds."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from screener.graphs import collate
from screener.model import to_tensors
from screener.training.config import TrainConfig
from screener.training.dataset import read_set_graphs, read_training_set
from screener.training.gap_set import read_gap_set, spectrum_bounds


@dataclass
class Part:
    """One worker's share of a split: rows of the set, their graphs, model targets, spectra
    and DOS bounds; a gap set has bounds only, a labelled set bounds only with --gaps."""

    rows: np.ndarray
    graphs: dict[int, dict]
    targets: np.ndarray | None
    dos: np.ndarray | None
    bounds: np.ndarray | None


def shard(indices: np.ndarray, rank: int, world: int, pad: bool) -> np.ndarray:
    """This rank's indices; padding (wrapping around) gives every rank the same step count,
    which DDP needs, while validation stays unpadded so no structure counts twice."""
    if pad and len(indices):
        indices = np.resize(indices, -(-len(indices) // world) * world)
    return indices[rank::world]


def load_parts(path: str, rank: int, world: int, targets_of, bounded: bool = False,
               hold_out: Sequence[str] = ()) -> tuple[Part, Part]:
    """The train and validation shards of this rank without the `hold_out` ids, graphs read
    for those rows only; `bounded` adds the bounds of each spectrum's own gap
    (gap_set.spectrum_bounds)."""
    data = read_training_set(path, graphs=False)
    kept = {name: rows[~np.isin(data.ids[rows].astype(str), list(hold_out))]
            for name, rows in data.split.items()}
    train_rows = shard(kept["train"], rank, world, pad=True)
    val_rows = shard(kept["val"], rank, world, pad=False)
    needed = np.unique(np.concatenate([train_rows, val_rows]))
    graphs = dict(zip(needed.tolist(), read_set_graphs(path, needed)))
    targets = targets_of(data.dos)
    bounds = spectrum_bounds(data.dos) if bounded else None
    return tuple(Part(rows, {int(r): graphs[int(r)] for r in rows}, targets[rows], data.dos[rows],
                      None if bounds is None else bounds[rows])
                 for rows in (train_rows, val_rows))


def load_gap_parts(cfg: TrainConfig, rank: int, world: int) -> tuple[Part | None, Part | None]:
    """This rank's shards of the gap set's train and validation splits, from one read of it;
    (None, None) without a gap set."""
    if not cfg.gaps:
        return None, None
    gap_set = read_gap_set(cfg.gaps, cfg.gap_exclude)
    return tuple(
        Part(rows, {int(r): gap_set.graphs[r] for r in rows}, None, None, gap_set.bounds[rows])
        for rows in (shard(gap_set.split[split], rank, world, pad=split == "train")
                     for split in ("train", "val")))


def batches(part: Part, batch_size: int, device, order: np.ndarray | None = None):
    """(graph batch, spectra or None, bounds or None) tensors in `order` (default: stored)."""
    order = np.arange(len(part.rows)) if order is None else order
    for start in range(0, len(order), batch_size):
        pick = order[start:start + batch_size]
        yield (to_tensors(collate(graphs_of(part, pick)), device),
               *(None if values is None else torch.as_tensor(values[pick], device=device)
                 for values in (part.dos, part.bounds)))


def graphs_of(part: Part, pick: np.ndarray) -> list[dict]:
    return [part.graphs[int(part.rows[i])] for i in pick]
