"""What one training run is, as a typed value, and the part of it a resumed run must share."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from screener.io.files import file_sha256
from screener.training.dataset import read_training_set

# A resumed run must train the same thing the same way, or its checkpoint means nothing.
RESUME_KEYS = ("data_hash", "arch", "latent", "ae_epochs", "config", "batch_size", "lr", "epochs",
               "loss", "workers", "seed", "gaps_hash", "gap_weight", "gap_exclude", "hold_out")


@dataclass(frozen=True)
class TrainConfig:
    """One training run: what `train` was asked, the hashes of its data and gap set, and where
    it resumes from. The RESUME_KEYS fields are stored in every checkpoint (`resume_keys`) and
    must match for a later run to continue it; the model's meta keeps them too."""

    data: str
    data_hash: str
    arch: str
    latent: int | None
    config: dict
    batch_size: int
    lr: float
    epochs: int
    patience: int
    loss: str
    amp: bool
    workers: int
    seed: int
    ae_epochs: int | None
    hold_out: list[str]
    gaps: str | None = None
    gaps_hash: str | None = None
    gap_weight: float | None = None
    gap_exclude: list[str] | None = None
    resume_from: str | None = None
    autoencoder: str | None = None

    def resume_keys(self) -> dict:
        """The RESUME_KEYS fields, as a checkpoint stores them."""
        return {key: getattr(self, key) for key in RESUME_KEYS}


def gap_settings(data: Path, gaps: str | Path | None, hold_out: list[str], weight: float) -> dict:
    """The gap fields of a TrainConfig, as keyword arguments: the gap set's file, hash and
    weight, and the ids it leaves out (sorted), the training set's and the held-out ones."""
    if gaps is None:
        return {"gaps": None, "gaps_hash": None, "gap_weight": None, "gap_exclude": None}
    gaps = Path(gaps).resolve()
    exclude = {str(i) for i in read_training_set(data, graphs=False).ids} | set(hold_out)
    return {"gaps": str(gaps), "gaps_hash": file_sha256(gaps), "gap_weight": weight,
            "gap_exclude": sorted(exclude)}
