"""Ray Train for D-ALIGNN and AE-ALIGNN: DDP workers, early stopping, resumable checkpoints.

Every worker reads the training set itself and keeps only its shard of the train and
validation splits. Each epoch ends in a Ray checkpoint (weights, optimizer and scheduler state,
history); running `train` again on the same out_dir resumes from the latest one. The best
validation weights end up in out_dir/model.pt, loadable with `load_checkpoint`.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from screener.dataset import (
    SPLIT_METHOD,
    SPLIT_SEED,
    read_set_graphs,
    read_training_set,
    training_set_sha256,
)
from screener.errors import ScreenerError
from screener.gap_set import bounds_excess, read_gap_set, spectrum_bounds
from screener.graphs import collate
from screener.metrics import baseline_spectrum, spectrum_mae
from screener.model import (
    DOSAutoencoder,
    build_model,
    load_checkpoint,
    save_checkpoint,
    to_tensors,
)
from screener.pipeline import connect
from screener.store import file_sha256
from screener.structures import discover

ARCHS = ("d-alignn", "ae-alignn")
LOSSES = {"mse": nn.functional.mse_loss, "l1": nn.functional.l1_loss}
LATENT_SWEEP = (8, 12, 16, 20)
RUN_NAME = "ray"
AE_BATCH = 32
AE_FORMAT = 4  # 3: log spectra; 4: target_scale stored; an older autoencoder.pt is retrained
WEIGHT_DECAY = 1e-5
# Gap-set structures per labelled structure in an epoch, drawn afresh each epoch: the gap set
# is ~6x the labelled one, and a full pass over it per epoch made epochs 7x slower.
GAP_SHARE = 1
# Chosen on the gap set's validation split: with 237 GPAW spectra, at 1 early stopping kept an
# epoch that predicted every structure metallic, 5 and 10 found 14 and 13 of 17 gapped; with
# 271, 5 and 10 found 17 and 18 of 23 (patience 60).
GAP_WEIGHT = 10.0
# A resumed run must train the same thing the same way, or its checkpoint means nothing.
RESUME_KEYS = ("data_hash", "arch", "latent", "ae_epochs", "config", "batch_size", "lr", "epochs",
               "loss", "workers", "seed", "gaps_hash", "gap_weight", "gap_exclude", "hold_out")


class ResumeError(ScreenerError, ValueError):
    """out_dir holds a run with other settings, which this one must not continue."""


def train(data_path: str | Path, out_dir: str | Path, arch: str = "d-alignn", latent: int = 12,
          workers: int = 1, gpus_per_worker: float = 0, batch_size: int = 32, lr: float = 1e-3,
          epochs: int = 300, patience: int = 30, loss: str = "mse", amp: bool = False,
          config: dict | None = None, address: str | None = None, seed: int = 0,
          ae_epochs: int = 200, gaps: str | Path | None = None, hold_out: Sequence[str | Path] = (),
          gap_weight: float = GAP_WEIGHT, cpus_per_worker: int | None = None) -> dict:
    """Train one model into out_dir (resuming what is there) and return its final metrics.

    `gaps`: a JARVIS record file whose known gaps bound the predicted spectra of structures
    without a DOS label (screener.gap_set); every structure of the training set is left out of
    it. The `hold_out` inputs (e.g. what the model will screen) are left out of everything:
    the gap set and every split of the training set. `cpus_per_worker`:
    each DDP worker's CPUs and torch threads, by default worker_cpus' rule.
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if arch not in ARCHS or loss not in LOSSES or epochs < 1 or workers < 1:
        raise ValueError(f"need arch in {ARCHS}, loss in {tuple(LOSSES)}, epochs >= 1, "
                         f"workers >= 1; got {arch!r}, {loss!r}, {epochs}, {workers}")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = Path(data_path).resolve()
    settings = {"data": str(data), "data_hash": training_set_sha256(data), "arch": arch,
                "latent": latent if arch == "ae-alignn" else None, "config": dict(config or {}),
                "batch_size": batch_size, "lr": lr, "epochs": epochs, "patience": patience,
                "loss": loss, "amp": amp, "workers": workers, "seed": seed,
                "ae_epochs": ae_epochs if arch == "ae-alignn" else None,
                "hold_out": held_out_ids(hold_out)}
    settings.update(gap_settings(data, gaps, settings["hold_out"], gap_weight))
    resume = latest_checkpoint(out)
    state = resumable_state(resume, settings) if resume else new_state(settings)
    settings["resume_from"] = str(resume) if resume else None
    if arch == "ae-alignn":
        settings["autoencoder"] = str(fit_autoencoder(settings, out))
    if not state["early_stopped"] and state["epoch"] < epochs:
        connect(address, worker_logs=True, dashboard=True)
        gpu = {"GPU": gpus_per_worker} if gpus_per_worker else {}
        cpus = cpus_per_worker or worker_cpus(workers, gpus_per_worker)
        TorchTrainer(
            train_loop,
            train_loop_config=settings,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(gpus_per_worker),
                                         resources_per_worker={"CPU": cpus, **gpu}),
            run_config=RunConfig(name=RUN_NAME, storage_path=str(out),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
        ).fit()
    return finish(latest_checkpoint(out), settings, out)


def worker_cpus(workers: int, gpus_per_worker: float) -> int:
    """CPUs, and so torch threads, per DDP worker by default: on a one-node Ray without GPUs
    the workers share the CPUs free now (one worker on one thread left the second core of this
    machine idle: 33 s an epoch, 19.5 s on two threads); one each beside GPUs and on a cluster
    of several nodes, which may differ in size."""
    import ray

    if gpus_per_worker or sum(node["Alive"] for node in ray.nodes()) != 1:
        return 1
    return max(1, int(ray.available_resources().get("CPU", 1)) // workers)


def held_out_ids(paths: Sequence[str | Path]) -> list[str]:
    """The ids of the structures under `paths`, sorted (a resumed run compares them)."""
    return sorted({source.id for path in paths for source in discover(path)})


def gap_settings(data: Path, gaps: str | Path | None, hold_out: list[str], weight: float) -> dict:
    """The gap set's file, hash and weight, and the ids it leaves out (sorted): the training
    set's and the held-out ones."""
    if gaps is None:
        return {"gaps": None, "gaps_hash": None, "gap_weight": None, "gap_exclude": None}
    gaps = Path(gaps).resolve()
    exclude = {str(i) for i in read_training_set(data, graphs=False).ids} | set(hold_out)
    return {"gaps": str(gaps), "gaps_hash": file_sha256(gaps), "gap_weight": weight,
            "gap_exclude": sorted(exclude)}


def latent_sweep(data_path: str | Path, out_dir: str | Path, latents=LATENT_SWEEP,
                 **options) -> list[dict]:
    """AE-ALIGNN for each latent size k (paper Table 1), one out_dir/k<k> each."""
    return [{"latent": k, **train(data_path, Path(out_dir) / f"k{k}", arch="ae-alignn",
                                   latent=k, **options)} for k in latents]


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


def load_gap_parts(settings: dict, rank: int, world: int) -> tuple[Part | None, Part | None]:
    """This rank's shards of the gap set's train and validation splits, from one read of it;
    (None, None) without a gap set."""
    if not settings["gaps"]:
        return None, None
    gap_set = read_gap_set(settings["gaps"], settings["gap_exclude"])
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


def train_epoch(net: nn.Module, task: Task, part: Part, gap_part: Part | None, optimizer,
                scheduler, settings: dict, order: np.ndarray, gap_order: np.ndarray,
                device) -> float:
    """One pass over this rank's shard; returns the mean training loss.

    With a gap set, each step also takes an equal share of `gap_order`; both go through one
    forward pass (DDP allows one per backward). The bounds term covers every structure that
    has bounds, labelled ones included, weighed by gap_weight x the task's target scale.
    """
    net.train()
    total, steps = 0.0, 0
    batch_size = settings["batch_size"]
    picks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    gap_picks = np.array_split(gap_order, len(picks)) if gap_part else [order[:0]] * len(picks)
    for pick, gap_pick in zip(picks, gap_picks):
        graphs = graphs_of(part, pick) + (graphs_of(gap_part, gap_pick) if gap_part else [])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings["amp"]):
            pred = net(to_tensors(collate(graphs), device)).float()
        targets = torch.as_tensor(part.targets[pick], device=device)
        loss = LOSSES[settings["loss"]](pred[:len(pick)], targets)
        own = part.bounds is not None
        bounds = ([part.bounds[pick]] if own else []) + (
            [gap_part.bounds[gap_pick]] if len(gap_pick) else [])
        if bounds:
            bounded = task.decode(pred if own else pred[len(pick):])
            excess = bounds_excess(bounded, torch.as_tensor(np.concatenate(bounds), device=device))
            loss = loss + settings["gap_weight"] * task.target_scale * excess.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total, steps = total + loss.item(), steps + 1
    return total / max(steps, 1)


@torch.no_grad()
def validation_mean(net: nn.Module, decode, part: Part | None, batch_size: int, device,
                    amp: bool) -> float:
    """Mean over all ranks' validation structures of the spectrum MAE, or for a gap set of
    the bounds excess; NaN for none.

    `net` is the bare module, not DDP: ranks hold different numbers of validation batches,
    and a DDP forward would wait for the others.
    """
    net.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for graphs, dos, bounds in batches(part, batch_size, device) if part else ():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred = decode(net(graphs)).float()
        errors = bounds_excess(pred, bounds) if dos is None else (pred - dos).abs().mean(1)
        sums += torch.stack([errors.sum().double(),
                             torch.tensor(len(errors), dtype=torch.float64, device=device)])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    return float(sums[0] / sums[1]) if sums[1] else float("nan")


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


def make_task(settings: dict) -> Task:
    """D-ALIGNN learns spectra; AE-ALIGNN learns the latent of a frozen, pre-trained autoencoder."""
    if settings["arch"] == "d-alignn":
        model = build_model("d-alignn", settings["config"])
        return Task(model, model, lambda out: out, lambda dos: dos)
    saved = torch.load(settings["autoencoder"], weights_only=True)
    autoencoder = DOSAutoencoder(settings["latent"])
    autoencoder.load_state_dict(saved["weights"])
    model = build_model("ae-alignn", {**settings["config"], "latent": settings["latent"]})
    model.decoder.load_state_dict(autoencoder.decoder.state_dict())
    model.decoder.requires_grad_(False)
    return Task(model, model.alignn, model.decoder, lambda dos: encode(autoencoder, dos),
                saved["target_scale"])


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


def fit_autoencoder(settings: dict, out: Path) -> Path:
    """Train the DOS autoencoder on the training spectra (MSE in standard scores of log DOS),
    keeping the weights with the best validation reconstruction MAE. Runs in the driver: it is
    small next to ALIGNN. The loss's target_scale is stored with the weights, so workers need not
    read the spectra again. A rerun of the same run reuses out_dir/autoencoder.pt."""
    path = out / "autoencoder.pt"
    key = {"format": AE_FORMAT,
           **{name: settings[name] for name in ("data_hash", "latent", "seed", "ae_epochs", "loss")}}
    if path.exists() and torch.load(path, weights_only=True)["key"] == key:
        return path
    data = read_training_set(settings["data"], graphs=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_dos, val_dos = (torch.as_tensor(data.dos[data.split[name]], device=device)
                          for name in ("train", "val"))
    torch.manual_seed(settings["seed"])
    model = DOSAutoencoder(settings["latent"]).to(device)
    model.fit_scale(train_dos)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=WEIGHT_DECAY)
    order = np.random.default_rng(settings["seed"])
    best, best_epoch, weights = math.inf, 0, None
    for epoch in range(1, settings["ae_epochs"] + 1):
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
        elif epoch - best_epoch >= settings["patience"]:
            break
    tmp = path.with_name(path.name + ".tmp")
    model.load_state_dict(weights)
    spectra = train_dos.cpu().numpy()
    scale = target_scale(encode(model.cpu(), spectra), spectra, settings["loss"])
    torch.save({"key": key, "weights": weights, "val_mae": best, "best_epoch": best_epoch,
                "target_scale": scale}, tmp)
    tmp.replace(path)
    return path


def new_state(settings: dict) -> dict:
    return {"epoch": 0, "best_epoch": 0, "best_val_mae": math.inf, "best_weights": None,
            "history": [], "early_stopped": False, "resumed_at": [],
            "settings": {key: settings[key] for key in RESUME_KEYS}}


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete epoch checkpoint in out_dir; a partly copied one is passed over."""
    found = {}
    for state_file in (out / RUN_NAME).glob("checkpoint_*/state.pt"):
        try:
            found[torch.load(state_file, weights_only=True)["epoch"]] = state_file.parent
        except (RuntimeError, EOFError, KeyError, OSError):
            continue
    return found[max(found)] if found else None


def resumable_state(checkpoint: Path, settings: dict) -> dict:
    """The saved state of a run, refusing to continue one that trained something else."""
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    changed = [key for key in RESUME_KEYS if state["settings"].get(key) != settings[key]]
    if changed:
        raise ResumeError(f"{checkpoint.parent.parent} holds a run with other "
                         f"{', '.join(changed)}: train into a new out_dir")
    return state


def train_loop(settings: dict) -> None:
    """Ray Train worker: resume from the latest checkpoint, then run epochs until the last one
    or until validation MAE has not improved for `patience` epochs."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    threads = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    torch.set_num_threads(threads)
    torch.manual_seed(settings["seed"])
    task = make_task(settings)
    train_part, val_part = load_parts(settings["data"], rank, world, task.targets_of,
                                      bounded=bool(settings["gaps"]),
                                      hold_out=settings["hold_out"])
    gap_train, gap_val = load_gap_parts(settings, rank, world)
    resume = settings.get("resume_from")
    if not resume:
        start_at_mean(task.trainable, train_part.targets)
    state = restore(task.model, Path(resume)) if resume else new_state(settings)
    task.model.to(device)
    log(rank, f"{world} worker(s); rank 0 trains on {device} with {threads} torch threads")
    net = ray.train.torch.prepare_model(  # the last layers' edge updates feed no output
        task.trainable, parallel_strategy_kwargs={"find_unused_parameters": True})
    steps = -(-len(train_part.rows) // settings["batch_size"])
    optimizer, scheduler = optimizers(task.trainable, settings, steps)
    if resume:
        optimizer.load_state_dict(state.pop("optimizer"))
        scheduler.load_state_dict(state.pop("scheduler"))
        log(rank, f"resumed after epoch {state['epoch']} from {resume}")
    for epoch in range(state["epoch"] + 1, settings["epochs"] + 1):
        start = time.perf_counter()
        order = np.random.default_rng([settings["seed"], epoch, rank]).permutation(
            len(train_part.rows))
        gap_order = (np.random.default_rng([settings["seed"], epoch, rank, 1]).permutation(
            len(gap_train.rows))[:GAP_SHARE * len(order)] if gap_train else order[:0])
        loss = train_epoch(net, task, train_part, gap_train, optimizer, scheduler,
                           settings, order, gap_order, device)
        val, val_gap = (validation_mean(task.trainable, task.decode, part, settings["batch_size"],
                                        device, settings["amp"]) for part in (val_part, gap_val))
        row = {"epoch": epoch, "train_loss": mean_over_ranks(loss, device), "val_mae": val,
               "val_gap_excess": val_gap, "val_score": val_score(val, val_gap, settings),
               "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - start,
               "threads": threads}
        advance(state, row, task.model, settings["patience"])
        report(state, task.model, optimizer, scheduler, rank)
        log(rank, "epoch {epoch:4d}  loss {train_loss:.5f}  val MAE {val_mae:.5f}  "
                  "gap excess {val_gap_excess:.5f}  lr {lr:.2e}  {seconds:.1f} s".format(**row))
        if state["early_stopped"]:
            log(rank, f"early stop: no better validation score for {settings['patience']} epochs")
            break


def val_score(val_mae: float, val_gap: float, settings: dict) -> float:
    """What early stopping and the kept weights follow: the training objective on validation,
    spectrum MAE plus gap weight x gap-set bounds excess."""
    return val_mae if math.isnan(val_gap) else val_mae + settings["gap_weight"] * val_gap


def restore(model: nn.Module, checkpoint: Path) -> dict:
    """Weights into `model`; returns the saved state (history, best, optimizer, scheduler)."""
    saved, _ = load_checkpoint(checkpoint / "model.pt")
    model.load_state_dict(saved.state_dict())
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    state["resumed_at"].append(state["epoch"] + 1)
    return state


def optimizers(module: nn.Module, settings: dict, steps_per_epoch: int):
    """AdamW with a one-cycle schedule over all planned steps (early stopping just cuts it)."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings["lr"], total_steps=settings["epochs"] * steps_per_epoch)
    return optimizer, scheduler


def mean_over_ranks(value: float, device) -> float:
    if not torch.distributed.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return float(tensor) / torch.distributed.get_world_size()


def advance(state: dict, row: dict, model: nn.Module, patience: int) -> None:
    """Record an epoch; keep the weights when the validation score improved (or cannot be
    measured). best_val_mae is the spectrum MAE of the kept epoch."""
    state["history"].append(row)
    state["epoch"] = row["epoch"]
    best = state.get("best_val_score", state["best_val_mae"])
    if math.isnan(row["val_score"]) or row["val_score"] < best:
        state["best_epoch"], state["best_val_mae"] = row["epoch"], row["val_mae"]
        state["best_val_score"] = row["val_score"]
        state["best_weights"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    state["early_stopped"] = row["epoch"] - state["best_epoch"] >= patience


def report(state: dict, model: nn.Module, optimizer, scheduler, rank: int) -> None:
    """Every rank reports the epoch; rank 0 attaches the checkpoint directory."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            write_checkpoint(Path(tmp), state, model, optimizer, scheduler)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(state["history"][-1], checkpoint=checkpoint)


def write_checkpoint(folder: Path, state: dict, model: nn.Module, optimizer, scheduler) -> None:
    """model.pt (a normal checkpoint, usable on its own) and state.pt (all a resume needs)."""
    save_checkpoint(folder / "model.pt", model, {"epoch": state["epoch"]})
    torch.save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               folder / "state.pt")


def log(rank: int, line: str) -> None:
    """Progress from rank 0 through logging: Ray Train shows a worker's print twice."""
    if rank == 0:
        logging.getLogger(__name__).info(line)


def finish(checkpoint: Path, settings: dict, out: Path) -> dict:
    """out_dir/model.pt: the best weights, with the split, data hash and metrics in its meta."""
    model, _ = load_checkpoint(checkpoint / "model.pt")
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    model.load_state_dict(state["best_weights"])
    data = read_training_set(settings["data"], graphs=False)
    best = state["history"][state["best_epoch"] - 1] if state["best_epoch"] else {}
    metrics = {"best_epoch": state["best_epoch"], "val_mae": state["best_val_mae"],
               "val_gap_excess": best.get("val_gap_excess", math.nan),
               "baseline_val_mae": baseline_mae(data, settings["hold_out"]), "epochs_run": state["epoch"],
               "early_stopped": state["early_stopped"], "resumed_at": state["resumed_at"]}
    if settings["arch"] == "ae-alignn":
        metrics["reconstruction_val_mae"] = torch.load(settings["autoencoder"],
                                                       weights_only=True)["val_mae"]
    created = datetime.now(timezone.utc)
    meta = {"model_id": f"{settings['arch']}-{settings['data_hash'][:8]}-{created:%Y%m%dT%H%M%S}",
            "created": created.isoformat(timespec="seconds"), "data": settings["data"],
            "data_hash": settings["data_hash"], "data_provenance": data.attrs,
            "split": {name: rows.tolist() for name, rows in data.split.items()},
            "training": {key: settings[key] for key in (*RESUME_KEYS, "patience", "amp", "gaps")
                         if key != "gap_exclude"},
            "gap_set": gap_meta(settings),
            "metrics": metrics, "history": state["history"]}
    save_checkpoint(out / "model.pt", model, meta)
    write_metrics(out, state["history"], metrics)
    return metrics


def gap_meta(settings: dict) -> dict | None:
    """How to rebuild the gap set and its split, which `screen evaluate` scores."""
    if not settings["gaps"]:
        return None
    return {"path": settings["gaps"], "hash": settings["gaps_hash"], "seed": SPLIT_SEED,
            "split": SPLIT_METHOD, "exclude": settings["gap_exclude"], "weight": settings["gap_weight"]}


def baseline_mae(data, hold_out: Sequence[str] = ()) -> float:
    """Validation MAE of the mean training spectrum, the number a model has to beat, over the
    rows training used (held-out ids left out)."""
    train, val = (rows[~np.isin(data.ids[rows].astype(str), list(hold_out))]
                  for rows in (data.split["train"], data.split["val"]))
    return float(spectrum_mae(baseline_spectrum(data.dos[train]), data.dos[val]).mean())


def write_metrics(out: Path, history: list[dict], metrics: dict) -> None:
    """metrics.csv has every column any epoch has: a run resumed across versions may add one."""
    columns = list(dict.fromkeys(key for row in history for key in row))
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    (out / "metrics.json").write_text(json.dumps({"final": metrics, "history": history}, indent=1))
