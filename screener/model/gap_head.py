"""Band gap and P(metal) as learned outputs beside the DOS, each with an ensemble spread.

A gap read off a predicted spectrum needs the prediction to fall below a threshold between
the band edges, and a smooth prediction rarely does, so gapped materials come out metals.
This head reads the gap from the pooled graph features and the predicted spectrum instead,
as PET-MAD-DOS does. Its members start from different weights and are fitted on bootstrap
resamples of the known gaps, so their disagreement says how sure a gap is; a temperature and
a spread scale fitted on validation turn that into calibrated probabilities.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from screener.dos import METAL_BELOW_EV

MEMBERS = 8
HIDDEN = 128
LOG_FLOOR = 1e-4  # under dos.GAP_THRESHOLD, so a gap's empty bins stay apart from band edges


class GapHead(nn.Module):
    """`members` small MLPs on `n_in` standardized inputs (for D-ALIGNN, `inputs`: its pooled
    features and log DOS) -> (gap, metal logit).

    A member's gap is for the non-metal case: at least METAL_BELOW_EV, the smallest gap a
    spectrum on the grid can show. The buffers hold the input scaling and the calibration
    that `screener.training.gap_fit` sets, so a checkpoint carries everything a prediction needs.
    """

    def __init__(self, n_in: int, members: int = MEMBERS, hidden: int = HIDDEN):
        super().__init__()
        self.members = nn.ModuleList(
            nn.Sequential(nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden // 2),
                          nn.SiLU(), nn.Linear(hidden // 2, 2))
            for _ in range(members))
        self.register_buffer("center", torch.zeros(n_in))
        self.register_buffer("scale", torch.ones(n_in))
        self.register_buffer("temperature", torch.tensor(1.0))
        self.register_buffer("spread_scale", torch.tensor(1.0))
        self.register_buffer("spread_floor", torch.tensor(0.1))
        self.register_buffer("min_probability", torch.tensor(0.5))

    @staticmethod
    def inputs(pooled: torch.Tensor, dos: torch.Tensor) -> torch.Tensor:
        """What the head reads: pooled graph features beside the log of the predicted DOS."""
        return torch.cat([pooled, torch.log(dos.clamp_min(0) + LOG_FLOOR)], dim=1)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gaps, metal logits), each (B, members), for `inputs` rows."""
        x = (inputs - self.center) / self.scale
        return self.member_outputs(torch.stack([member(x) for member in self.members], dim=1))

    @staticmethod
    def member_outputs(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gap, metal logit) from raw member outputs (..., 2)."""
        return METAL_BELOW_EV + F.softplus(out[..., 0]), out[..., 1]


@dataclass
class GapEstimate:
    """Per structure: the gap (0 where a metal is likelier), P(metal), and for the non-metal
    case the members' mean gap and its calibrated spread, all in eV."""

    gap: np.ndarray
    p_metal: np.ndarray
    mean: np.ndarray
    std: np.ndarray


def estimate(head: GapHead, gaps: torch.Tensor, logits: torch.Tensor) -> GapEstimate:
    """Combine the members: mean logit over the temperature, mean gap, spread scaled and
    floored as calibrated on validation."""
    p_metal = torch.sigmoid(logits.mean(1) / head.temperature)
    mean = gaps.mean(1)
    spread = gaps.std(1, correction=0) if gaps.shape[1] > 1 else torch.zeros_like(mean)
    std = torch.hypot(head.spread_scale * spread, head.spread_floor)
    gap = torch.where(p_metal >= 0.5, torch.zeros_like(mean), mean)
    return GapEstimate(*(t.detach().float().cpu().numpy() for t in (gap, p_metal, mean, std)))
