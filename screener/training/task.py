"""What a worker trains: D-ALIGNN on spectra, or AE-ALIGNN on the latent codes of a DOS
autoencoder fitted first, in the driver."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from screener.io.files import atomic_path
from screener.model import DOSAutoencoder, build_model
from screener.training.config import TrainConfig
from screener.training.dataset import read_training_set

LOSSES = {"mse": nn.functional.mse_loss, "l1": nn.functional.l1_loss}
AE_BATCH = 32
AE_FORMAT = 4  # 3: log spectra; 4: target_scale stored; an older autoencoder.pt is retrained
WEIGHT_DECAY = 1e-5


@dataclass
class Task:
    """What a worker trains: `model` is what gets saved, `trainable` the part DDP wraps,
    `decode` maps its output to a spectrum, `targets_of` maps spectra to its targets and
    `target_scale` is how much larger the loss is in target units than in DOS units."""

    model: nn.Module
    trainable: nn.Module
    decode: object
    targets_of: object
    target_scale: float = 1.0


def make_task(cfg: TrainConfig) -> Task:
    """D-ALIGNN learns spectra; AE-ALIGNN learns the latent of a frozen, pre-trained autoencoder."""
    if cfg.arch == "d-alignn":
        model = build_model("d-alignn", cfg.config)
        return Task(model, model, lambda out: out, lambda dos: dos)
    saved = torch.load(cfg.autoencoder, weights_only=True)
    autoencoder = DOSAutoencoder(cfg.latent)
    autoencoder.load_state_dict(saved["weights"])
    model = build_model("ae-alignn", {**cfg.config, "latent": cfg.latent})
    model.decoder.load_state_dict(autoencoder.decoder.state_dict())
    model.decoder.requires_grad_(False)
    return Task(model, model.alignn, model.decoder, lambda dos: encode(autoencoder, dos),
                saved["target_scale"])


@torch.no_grad()
def start_at_mean(net: nn.Module, targets: np.ndarray) -> None:
    """Set the head's bias so a fresh network predicts the mean training target.

    An untrained softplus head outputs about log 2 = 0.69 per bin against spectra near 0.02,
    so the first epochs would only learn the scale; starting at the mean (the baseline) and a
    small head lets every step go to structure-specific detail.
    """
    mean = torch.as_tensor(targets.mean(0), dtype=net.fc.bias.dtype)
    if net.nonnegative:
        mean = mean.clamp_min(1e-4)
        mean = mean + torch.log(-torch.expm1(-mean))  # inverse softplus
    net.fc.bias.copy_(mean)
    net.fc.weight.mul_(0.1)


def target_scale(targets: np.ndarray, dos: np.ndarray, loss: str) -> float:
    """The mean training target's loss over the mean training spectrum's loss.

    AE-ALIGNN's loss is on latent codes, 130-165x the DOS scale in L1 on the GPAW set, while
    the gap term is on decoded spectra: scaled by this, it weighs against the spectrum loss as
    it does for D-ALIGNN, and --gap-weight means the same for both.
    """
    def baseline(values: np.ndarray) -> float:
        values = torch.as_tensor(values)
        return float(LOSSES[loss](values.mean(0).expand_as(values), values))

    return baseline(targets) / baseline(dos)


@torch.no_grad()
def encode(autoencoder: DOSAutoencoder, dos: np.ndarray) -> np.ndarray:
    return autoencoder.encoder(torch.as_tensor(dos)).numpy()


def fit_autoencoder(cfg: TrainConfig, out: Path) -> Path:
    """Train the DOS autoencoder on the training spectra (MSE in standard scores of log DOS),
    keeping the weights with the best validation reconstruction MAE. Runs in the driver: it is
    small next to ALIGNN. The loss's target_scale is stored with the weights, so workers need not
    read the spectra again. A rerun of the same run reuses out_dir/autoencoder.pt."""
    path = out / "autoencoder.pt"
    key = {"format": AE_FORMAT,
           **{name: getattr(cfg, name) for name in ("data_hash", "latent", "seed", "ae_epochs", "loss")}}
    if path.exists() and torch.load(path, weights_only=True)["key"] == key:
        return path
    data = read_training_set(cfg.data, graphs=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_dos, val_dos = (torch.as_tensor(data.dos[data.split[name]], device=device)
                          for name in ("train", "val"))
    torch.manual_seed(cfg.seed)
    model = DOSAutoencoder(cfg.latent).to(device)
    model.fit_scale(train_dos)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=WEIGHT_DECAY)
    order = np.random.default_rng(cfg.seed)
    best, best_epoch, weights = math.inf, 0, None
    for epoch in range(1, cfg.ae_epochs + 1):
        model.train()
        for pick in np.array_split(order.permutation(len(train_dos)),
                                   -(-len(train_dos) // AE_BATCH)):
            loss = model.loss(train_dos[pick])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val = float((model(val_dos) - val_dos).abs().mean())
        if math.isnan(val) or val < best:
            best, best_epoch = val, epoch
            weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= cfg.patience:
            break
    model.load_state_dict(weights)
    spectra = train_dos.cpu().numpy()
    scale = target_scale(encode(model.cpu(), spectra), spectra, cfg.loss)
    with atomic_path(path) as tmp:
        torch.save({"key": key, "weights": weights, "val_mae": best, "best_epoch": best_epoch,
                    "target_scale": scale}, tmp)
    return path
