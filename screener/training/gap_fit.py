"""Fit a D-ALIGNN's gap head on every known gap, calibrate it on validation, save the model.

The backbone stays frozen: the head reads its pooled features and predicted spectrum, so it
trains in minutes on a CPU after the hours the backbone took. Known gaps are the labelled
set's (JARVIS optB88vdW where JARVIS has one, as screens are judged against it, else the
label's own DFT gap) and the gap set's (JARVIS records without a spectrum), both split by id
as the backbone's data were, without the held-out structures.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from screener.dos import METAL_BELOW_EV, band_gap
from screener.model import build_model, load_checkpoint, save_checkpoint
from screener.model.domain import training_domain
from screener.model.gap_head import MEMBERS, GapHead, estimate
from screener.predict import predict
from screener.training.dataset import read_training_set
from screener.training.gap_set import GapSet, read_gap_set
from screener.training.metrics import expected_calibration_error
from screener.training.train import held_out_ids
from screener.window import p_in_window, shortlisted

# The window the default P(in window) threshold is chosen for: the acceptance window of the
# screen's accuracy benchmark, wide enough to hold enough validation structures to choose on.
CHOICE_WINDOW = (1.0, 2.0)
EPOCHS = 300
PATIENCE = 30
BATCH = 128
LR = 1e-3
WEIGHT_DECAY = 1e-4


@dataclass
class KnownGaps:
    """Head inputs and gaps of the structures with a known gap, split into train and val; the
    DOS-read gaps of the frozen model beside them, for comparison."""

    ids: np.ndarray
    inputs: np.ndarray
    dos_gaps: np.ndarray
    gaps: np.ndarray
    train: np.ndarray
    val: np.ndarray
    numbers: list[np.ndarray]


def fit(model_path: str | Path, data_path: str | Path, gaps_path: str | Path | None,
        out_path: str | Path, *, hold_out: Sequence[str | Path] = (), members: int = MEMBERS,
        seed: int = 0, batch_size: int = 64) -> dict:
    """Write `out_path`: the model at `model_path` with a fitted, calibrated gap head and its
    applicability domain; returns the validation metrics stored in its meta."""
    model, meta = load_checkpoint(model_path)
    if meta["arch"] != "d-alignn":
        raise ValueError(f"{model_path}: a gap head needs a d-alignn, not {meta['arch']}")
    known = known_gaps(model, data_path, gaps_path, held_out_ids(hold_out), batch_size)
    head = fit_members(known, members, seed)
    report = calibrate(head, known)
    config = {**meta["config"], "gap_members": members}
    full = build_model("d-alignn", config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("gap_head.")}
    full.load_state_dict({**state, **{f"gap_head.{k}": v for k, v in head.state_dict().items()}})
    keep = {k: v for k, v in meta.items()
            if k not in ("arch", "config", "hash", "energy_grid", "normalization")}
    save_checkpoint(out_path, full, {**keep, "gap_head": report,
                                     "domain": training_domain(known.numbers)})
    return report


def known_gaps(model, data_path, gaps_path, hold_out: list[str], batch_size: int) -> KnownGaps:
    """Head inputs from the frozen model for the labelled and gap-set structures with a gap."""
    data = read_training_set(data_path)
    own = np.where(np.isfinite(data.ref_gap), data.ref_gap, data.extra["gpaw_gap"])
    gap_set = (GapSet.empty() if gaps_path is None
               else read_gap_set(gaps_path, exclude=[*data.ids.astype(str), *hold_out]))
    held = np.isin(data.ids.astype(str), hold_out)
    graphs = data.graphs + gap_set.graphs
    gaps = np.concatenate([own, gap_set.gaps]).astype(np.float64)
    offset = len(data.ids)
    rows = {name: np.concatenate([data.split[name][~held[data.split[name]]],
                                  gap_set.split[name] + offset]) for name in ("train", "val")}
    found = predict(model, graphs, batch_size, pooled=True)
    inputs = GapHead.inputs(torch.as_tensor(found.pooled), torch.as_tensor(found.dos)).numpy()
    numbers = [graphs[i]["numbers"] for i in rows["train"]]
    ids = np.array([*data.ids.astype(str), *gap_set.ids])
    return KnownGaps(ids, inputs, np.asarray(band_gap(found.dos)[0]), gaps, rows["train"],
                     rows["val"], numbers)


def fit_members(known: KnownGaps, members: int, seed: int) -> GapHead:
    """Each member from its own initial weights on its own bootstrap resample of the training
    gaps, kept at its best validation loss. Metals and non-metals weigh equally in the
    classification loss, whatever their shares."""
    torch.manual_seed(seed)
    head = GapHead(known.inputs.shape[1], members)
    x = torch.as_tensor(known.inputs, dtype=torch.float32)
    head.center.copy_(x[known.train].mean(0))
    head.scale.copy_(x[known.train].std(0).clamp_min(1e-6))
    y = torch.as_tensor(known.gaps, dtype=torch.float32)
    metal = (y < METAL_BELOW_EV).float()
    share = metal[known.train].mean()
    balance = torch.where(metal > 0, 0.5 / share, 0.5 / (1 - share))
    rng = np.random.default_rng(seed)
    for member in head.members:
        counts = rng.poisson(1.0, len(known.train))
        rows = np.repeat(known.train, counts)
        fit_member(head, member, x, y, metal, balance, rows, known.val, rng)
    return head


def fit_member(head, member, x, y, metal, balance, rows, val, rng) -> None:
    """Train one member on `rows` (repeats are the bootstrap's), keeping its best weights on
    the validation rows."""
    scaled = (x - head.center) / head.scale

    def loss_of(picked) -> torch.Tensor:
        gap, logit = head.member_outputs(member(scaled[picked]))
        bce = F.binary_cross_entropy_with_logits(logit, metal[picked], reduction="none")
        l1 = (gap - y[picked]).abs() * (1 - metal[picked])
        return ((bce + l1) * balance[picked]).mean()

    optimizer = torch.optim.AdamW(member.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    best, best_epoch, weights = math.inf, 0, None
    for epoch in range(EPOCHS):
        member.train()
        for pick in np.array_split(rng.permutation(rows), max(1, len(rows) // BATCH)):
            loss = loss_of(torch.as_tensor(pick))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        member.eval()
        with torch.no_grad():
            val_loss = float(loss_of(torch.as_tensor(val)))
        if val_loss < best:
            best, best_epoch = val_loss, epoch
            weights = {n: v.detach().clone() for n, v in member.state_dict().items()}
        elif epoch - best_epoch >= PATIENCE:
            break
    member.load_state_dict(weights)


@torch.no_grad()
def calibrate(head: GapHead, known: KnownGaps) -> dict:
    """Set the temperature of P(metal), the spread's scale and floor (least validation
    negative log-likelihood) and the default P(in window) threshold (best validation F1 of
    window.shortlisted in CHOICE_WINDOW); returns those and the validation metrics they give."""
    head.eval()
    gaps, logits = head(torch.as_tensor(known.inputs[known.val], dtype=torch.float32))
    truth = known.gaps[known.val]
    metal = truth < METAL_BELOW_EV
    mean_logit = logits.mean(1).double().numpy()
    temps = np.exp(np.linspace(np.log(0.25), np.log(8.0), 80))
    nll = [np.mean(np.logaddexp(0, -np.where(metal, 1, -1) * mean_logit / t)) for t in temps]
    head.temperature.fill_(float(temps[int(np.argmin(nll))]))
    mean = gaps.mean(1).double().numpy()
    spread = gaps.std(1, correction=0).double().numpy()
    gapped = ~metal
    best = (math.inf, 1.0, 0.1)
    for s in np.exp(np.linspace(np.log(0.3), np.log(30.0), 40)):
        for floor in np.exp(np.linspace(np.log(0.02), np.log(2.0), 40)):
            var = (s * spread[gapped]) ** 2 + floor ** 2
            value = np.mean(0.5 * np.log(var) + (truth[gapped] - mean[gapped]) ** 2 / (2 * var))
            best = min(best, (value, s, floor))
    head.spread_scale.fill_(float(best[1]))
    head.spread_floor.fill_(float(best[2]))
    found = estimate(head, gaps, logits)
    lo, hi = CHOICE_WINDOW
    p_window = p_in_window(found.p_metal, found.mean, found.std, lo, hi)
    inside = (truth >= lo) & (truth <= hi)
    thresholds = np.round(np.arange(0.05, 0.96, 0.05), 2)
    f1 = [_f1(shortlisted(p_window, found.gap, CHOICE_WINDOW, t), inside) for t in thresholds]
    head.min_probability.fill_(float(thresholds[int(np.argmax(f1))]))
    picked = shortlisted(p_window, found.gap, CHOICE_WINDOW, float(head.min_probability))
    return {"members": len(head.members), "n_train": len(known.train),
            "n_val": len(known.val), "temperature": float(head.temperature),
            "spread_scale": float(head.spread_scale), "spread_floor": float(head.spread_floor),
            "min_probability": float(head.min_probability), "choice_window": list(CHOICE_WINDOW),
            "val_gap_mae": float(np.abs(found.gap - truth).mean()),
            "val_metal_accuracy": float(np.mean((found.p_metal >= 0.5) == metal)),
            "val_ece_p_metal": expected_calibration_error(found.p_metal, metal),
            "val_ece_p_in_window": expected_calibration_error(p_window, inside),
            "val_window_precision": float(inside[picked].mean()) if picked.any() else math.nan,
            "val_window_recall": float(picked[inside].mean()) if inside.any() else math.nan}


def _f1(picked: np.ndarray, inside: np.ndarray) -> float:
    hits = float(np.sum(picked & inside))
    return 2 * hits / max(float(picked.sum() + inside.sum()), 1.0)
