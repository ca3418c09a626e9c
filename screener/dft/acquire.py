"""Which structures to label next: those the model's gap ensemble disagrees on most.

A label teaches most where the model is least sure. The gap head's members were fitted on
bootstrap resamples, so where they disagree the training data said little. Each member's
expected gap, (1 - P_m(metal)) * gap_m, folds its metal call and its gap into one number in
eV, so a structure counts as uncertain when the members disagree on either; confident metals
score near zero instead of by the unconstrained gaps members give them. Near-equal scores
are broken by element coverage: the structure whose rarest element the labelled set holds
least often goes first, so new chemistry is not starved by one family the model finds hard.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from screener.graphs import build_graphs
from screener.model import load_checkpoint
from screener.predict import predict

# Scores closer than this (eV) count as tied, so element coverage decides between them.
TIE_EV = 0.05


def disagreement(gaps: np.ndarray, logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Spread (std, eV) over members of each member's expected gap; gaps and logits (n, members)."""
    expected = (1 - 1 / (1 + np.exp(-np.asarray(logits, np.float64) / temperature))) * gaps
    return expected.std(1)


def ensemble_disagreement(model_path: str | Path, structures: Sequence,
                          batch_size: int = 64) -> np.ndarray:
    """`disagreement` of the model at `model_path` for each structure (anything with lattice,
    positions and numbers); NaN where a structure has no graph."""
    model, _ = load_checkpoint(model_path)
    head = getattr(model, "gap_head", None)
    if head is None:
        raise ValueError(f"{model_path}: ordering by uncertainty needs a model with a gap head "
                         "(screen gap-head)")
    graphs = build_graphs([(s.lattice, s.positions, s.numbers) for s in structures])
    good = [i for i, graph in enumerate(graphs) if not isinstance(graph, ValueError)]
    scores = np.full(len(structures), np.nan)
    found = predict(model, [graphs[i] for i in good], batch_size)
    if good:
        scores[good] = disagreement(found.gaps, found.logits, float(head.temperature))
    return scores


def element_counts(labelled: Iterable[np.ndarray]) -> Counter:
    """How many labelled structures hold each element (atomic numbers per structure)."""
    return Counter(int(z) for numbers in labelled for z in set(np.asarray(numbers).tolist()))


def uncertainty_order(scores: np.ndarray, numbers: Sequence[np.ndarray],
                      counts: Counter) -> np.ndarray:
    """Indices, most uncertain first; within a TIE_EV step, the rarest element first, then
    input order. NaN scores (no graph) go last."""
    steps = np.where(np.isfinite(scores), np.floor(np.nan_to_num(scores) / TIE_EV), -np.inf)
    rarity = np.array([min(counts.get(int(z), 0) for z in np.unique(n)) for n in numbers])
    return np.lexsort((np.arange(len(scores)), rarity, -steps))
