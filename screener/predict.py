"""Batched prediction from prebuilt graphs: spectra, the learned gap, and the columns derived."""
from collections.abc import Sequence
from dataclasses import astuple, dataclass

import numpy as np
import torch

from screener.dos import N_BINS, band_gap, dos_at_ef
from screener.graphs import collate
from screener.model import to_tensors
from screener.model.gap_head import GapHead, estimate


@dataclass
class Prediction:
    """(n, 300) spectra; with a gap head also its (n, members) gaps and metal logits, and the
    (n, hidden) pooled features it read (what `screener.training.gap_fit` fits a head on)."""

    dos: np.ndarray
    pooled: np.ndarray | None = None
    gaps: np.ndarray | None = None
    logits: np.ndarray | None = None


@torch.inference_mode()
def predict(model: torch.nn.Module, graphs: Sequence[dict], batch_size: int = 64,
            device: str = "cpu", pooled: bool = False) -> Prediction:
    """Predict in batches of `batch_size` graphs, which bounds peak memory; `pooled` keeps the
    pooled features (D-ALIGNN only)."""
    head: GapHead | None = getattr(model, "gap_head", None)
    parts: dict[str, list[np.ndarray]] = {"dos": [], "pooled": [], "gaps": [], "logits": []}
    for start in range(0, len(graphs), batch_size):
        batch = to_tensors(collate(list(graphs[start:start + batch_size])), device)
        if head is None and not pooled:
            parts["dos"].append(model(batch).float().cpu().numpy())
            continue
        features = model.pooled(batch)
        dos = model.head(features)
        parts["dos"].append(dos.float().cpu().numpy())
        if pooled:
            parts["pooled"].append(features.float().cpu().numpy())
        if head is not None:
            gaps, logits = head(GapHead.inputs(features, dos))
            parts["gaps"].append(gaps.float().cpu().numpy())
            parts["logits"].append(logits.float().cpu().numpy())
    arrays = {key: np.concatenate(values) if values else None for key, values in parts.items()}
    if arrays["dos"] is None:
        arrays["dos"] = np.empty((0, N_BINS), np.float32)
    return Prediction(**arrays)


def concat(predictions: Sequence[Prediction]) -> Prediction:
    """One Prediction of several, rows in order; none gives zero rows."""
    if not predictions:
        return Prediction(np.empty((0, N_BINS), np.float32))
    return Prediction(*(None if parts[0] is None else np.concatenate(parts)
                        for parts in zip(*(astuple(p) for p in predictions))))


def predict_dos(model: torch.nn.Module, graphs: Sequence[dict], batch_size: int = 64,
                device: str = "cpu") -> np.ndarray:
    """(n, 300) predicted spectra."""
    return predict(model, graphs, batch_size, device).dos


def prediction_columns(model: torch.nn.Module, prediction: Prediction) -> dict[str, np.ndarray]:
    """The shard columns of a prediction, float32: `band_gap` is the learned gap where the
    model has a gap head and the gap read off the spectrum otherwise, which is always kept as
    `dos_band_gap`; band edges and DOS at E_F come from the spectrum; `p_metal` and
    `band_gap_std` (the non-metal gap's mean and spread as `band_gap_mean`) from the head,
    or 1/0 and 0 from the spectrum alone."""
    gap, vbm, cbm = band_gap(prediction.dos)
    columns = {"dos_band_gap": gap, "vbm": vbm, "cbm": cbm, "dos_at_ef": dos_at_ef(prediction.dos)}
    if prediction.gaps is None:
        columns.update(band_gap=gap, band_gap_mean=gap, band_gap_std=np.zeros_like(gap),
                       p_metal=(gap == 0).astype(np.float32))
    else:
        found = estimate(model.gap_head, torch.as_tensor(prediction.gaps),
                         torch.as_tensor(prediction.logits))
        columns.update(band_gap=found.gap, band_gap_mean=found.mean, band_gap_std=found.std,
                       p_metal=found.p_metal)
    return {key: np.asarray(value, dtype=np.float32) for key, value in columns.items()}
