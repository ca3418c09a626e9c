"""Batched DOS prediction from prebuilt graphs, and the spectral columns derived from it."""
from collections.abc import Sequence

import numpy as np
import torch

from screener.dos import band_gap, dos_at_ef
from screener.graphs import collate
from screener.model import to_tensors


@torch.inference_mode()
def predict_dos(
    model: torch.nn.Module, graphs: Sequence[dict], batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """Predict (n, 300) spectra; batches keep peak memory bounded by `batch_size` graphs."""
    out = np.empty((len(graphs), 300), dtype=np.float32)
    for start in range(0, len(graphs), batch_size):
        batch = to_tensors(collate(list(graphs[start : start + batch_size])), device)
        out[start : start + batch_size] = model(batch).float().cpu().numpy()
    return out


def spectral_columns(dos: np.ndarray) -> dict[str, np.ndarray]:
    """Band gap, band edges and DOS at E_F of each spectrum, as float32 columns."""
    gap, vbm, cbm = band_gap(dos)
    return {
        "band_gap": np.asarray(gap, dtype=np.float32),
        "vbm": np.asarray(vbm, dtype=np.float32),
        "cbm": np.asarray(cbm, dtype=np.float32),
        "dos_at_ef": np.asarray(dos_at_ef(dos), dtype=np.float32),
    }
