"""DOS autoencoder and AE-ALIGNN: ALIGNN predicts a few latent numbers, a decoder the spectrum."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from itertools import pairwise

import torch
from torch import nn

from screener.dos import GAP_THRESHOLD, N_BINS
from screener.model.alignn import ALIGNN, ALIGNNConfig

AE_HIDDEN = (256, 128, 64)
MIN_SCALE = 1e-3
LOG_FLOOR = 0.1 * GAP_THRESHOLD  # far enough below the gap threshold that a gap stays a gap
MAX_LOG = 5.0  # e^5 states/eV per valence electron: no real spectrum comes near


def relu_mlp(sizes: Sequence[int]) -> list[nn.Module]:
    """Linear layers through `sizes`, ReLU between them and none after the last."""
    layers: list[nn.Module] = []
    for n_in, n_out in pairwise(sizes):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return layers[:-1]


class BinScale(nn.Module):
    """Per-bin centre and scale of the training spectra's logarithms, saved with the weights.

    Normalized spectra are ~0.03 per bin; an MLP fed and trained on values that small
    collapses to one output for every input (measured on the GPAW set: zero everywhere).
    Standard scores of the DOS itself fixed that but not gaps: a metal's few states at E_F and
    a gap's zeros differ by less than the reconstruction error, and the autoencoder turned 107
    of 111 training metals gapped. In log(DOS + floor) they lie orders of magnitude apart
    (measured: 108 of 111 kept, 84 of 95 gaps found; validation reconstruction MAE 0.0187
    against 0.0185 before).
    """

    def __init__(self, n_bins: int):
        super().__init__()
        self.register_buffer("center", torch.zeros(n_bins))
        self.register_buffer("scale", torch.ones(n_bins))
        self.register_buffer("floor", torch.tensor(LOG_FLOOR))

    def log(self, dos: torch.Tensor) -> torch.Tensor:
        return torch.log(dos.clamp_min(0) + self.floor)

    @torch.no_grad()
    def fit(self, spectra: torch.Tensor) -> None:
        logs = self.log(spectra)
        self.center.copy_(logs.mean(0))
        self.scale.copy_(logs.std(0).clamp_min(MIN_SCALE))


class Standardize(BinScale):
    def forward(self, dos: torch.Tensor) -> torch.Tensor:
        return (self.log(dos) - self.center) / self.scale


class Destandardize(BinScale):
    """Back to DOS units, clipped at zero: a DOS is never negative."""

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        logs = torch.addcmul(self.center, scores, self.scale).clamp_max(MAX_LOG)
        return torch.relu(torch.exp(logs) - self.floor)


def make_decoder(latent: int, hidden: Sequence[int], n_bins: int) -> nn.Sequential:
    """latent -> reversed(hidden) -> n_bins standard scores of log DOS -> spectrum."""
    return nn.Sequential(*relu_mlp([latent, *reversed(hidden), n_bins]), Destandardize(n_bins))


class DOSAutoencoder(nn.Module):
    """Compresses a spectrum to `latent` numbers (paper: k = 12) and back.

    The encoder ends linear, so latents are unbounded. Call `fit_scale` on the training
    spectra before training.
    """

    def __init__(self, latent: int = 12, hidden: Sequence[int] = AE_HIDDEN, n_bins: int = N_BINS):
        super().__init__()
        self.encoder = nn.Sequential(Standardize(n_bins), *relu_mlp([n_bins, *hidden, latent]))
        self.decoder = make_decoder(latent, hidden, n_bins)

    def fit_scale(self, spectra: torch.Tensor) -> None:
        self.encoder[0].fit(spectra)
        self.decoder[-1].fit(spectra)

    def forward(self, dos: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(dos))

    def loss(self, dos: torch.Tensor) -> torch.Tensor:
        """MSE in standard scores of log DOS, so bins weigh alike whatever their typical DOS."""
        scores = self.encoder[0](dos)
        return nn.functional.mse_loss(self.decoder[:-1](self.encoder[1:](scores)), scores)


class AEALIGNN(nn.Module):
    """AE-ALIGNN: ALIGNN with `latent` linear outputs, then a DOSAutoencoder's decoder.

    `config.outputs` is the spectrum length. The decoder has the autoencoder's layout, so a
    trained one drops in with `model.decoder.load_state_dict(autoencoder.decoder.state_dict())`.
    """

    arch = "ae-alignn"

    def __init__(
        self,
        config: ALIGNNConfig | None = None,
        latent: int = 12,
        ae_hidden: Sequence[int] = AE_HIDDEN,
    ):
        super().__init__()
        self.config = config or ALIGNNConfig()
        self.latent_size = latent
        self.ae_hidden = tuple(ae_hidden)
        self.alignn = ALIGNN(replace(self.config, outputs=latent), nonnegative=False)
        self.decoder = make_decoder(latent, self.ae_hidden, self.config.outputs)

    def config_dict(self) -> dict:
        return {**asdict(self.config), "latent": self.latent_size, "ae_hidden": list(self.ae_hidden)}

    def latent(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, latent): what ALIGNN learns to predict, the encoder's image of the spectrum."""
        return self.alignn(batch)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.decoder(self.latent(batch))
