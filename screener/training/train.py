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
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from screener.cluster import connect
from screener.errors import ScreenerError
from screener.graphs import collate
from screener.io import discover
from screener.io.files import portable_path
from screener.model import load_checkpoint, save_checkpoint, to_tensors
from screener.training.config import RESUME_KEYS, TrainConfig, gap_settings
from screener.training.dataset import (
    SPLIT_METHOD,
    SPLIT_SEED,
    read_training_set,
    training_set_sha256,
)
from screener.training.gap_set import bounds_excess
from screener.training.metrics import baseline_spectrum, spectrum_mae
from screener.training.parts import Part, batches, graphs_of, load_gap_parts, load_parts
from screener.training.task import (
    LOSSES,
    WEIGHT_DECAY,
    Task,
    fit_autoencoder,
    make_task,
    start_at_mean,
)

ARCHS = ("d-alignn", "ae-alignn")
LATENT_SWEEP = (8, 12, 16, 20)
RUN_NAME = "ray"
# Gap-set structures per labelled structure in an epoch, drawn afresh each epoch: the gap set
# is ~6x the labelled one, and a full pass over it per epoch made epochs 7x slower.
GAP_SHARE = 1
# Chosen on the gap set's validation split: with 237 GPAW spectra, at 1 early stopping kept an
# epoch that predicted every structure metallic, 5 and 10 found 14 and 13 of 17 gapped; with
# 271, 5 and 10 found 17 and 18 of 23 (patience 60).
GAP_WEIGHT = 10.0


class ResumeError(ScreenerError, ValueError):
    """out_dir holds a run with other settings, which this one must not continue."""


def train(data_path: str | Path, out_dir: str | Path, *, arch: str = "d-alignn", latent: int = 12,
          workers: int = 1, gpus_per_worker: float = 0, batch_size: int = 32, lr: float = 1e-3,
          epochs: int = 300, patience: int = 30, loss: str = "mse", amp: bool = False,
          config: dict | None = None, address: str | None = None, seed: int = 0,
          ae_epochs: int = 200, gaps: str | Path | None = None, hold_out: Sequence[str | Path] = (),
          gap_weight: float = GAP_WEIGHT, cpus_per_worker: int | None = None) -> dict:
    """Train one model into out_dir (resuming what is there) and return its final metrics.

    `gaps`: a JARVIS record file whose known gaps bound the predicted spectra of structures
    without a DOS label (screener.training.gap_set); every structure of the training set is left out of
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
    hold_out_ids = held_out_ids(hold_out)
    cfg = TrainConfig(data=str(data), data_hash=training_set_sha256(data), arch=arch,
                      latent=latent if arch == "ae-alignn" else None, config=dict(config or {}),
                      batch_size=batch_size, lr=lr, epochs=epochs, patience=patience, loss=loss,
                      amp=amp, workers=workers, seed=seed,
                      ae_epochs=ae_epochs if arch == "ae-alignn" else None, hold_out=hold_out_ids,
                      **gap_settings(data, gaps, hold_out_ids, gap_weight))
    resume = latest_checkpoint(out)
    state = resumable_state(resume, cfg) if resume else new_state(cfg)
    cfg = replace(cfg, resume_from=str(resume) if resume else None)
    if arch == "ae-alignn":
        cfg = replace(cfg, autoencoder=str(fit_autoencoder(cfg, out)))
    if not state["early_stopped"] and state["epoch"] < epochs:
        connect(address, worker_logs=True, dashboard=True)
        gpu = {"GPU": gpus_per_worker} if gpus_per_worker else {}
        cpus = cpus_per_worker or worker_cpus(workers, gpus_per_worker)
        TorchTrainer(
            train_loop,
            train_loop_config={"train": cfg},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(gpus_per_worker),
                                         resources_per_worker={"CPU": cpus, **gpu}),
            run_config=RunConfig(name=RUN_NAME, storage_path=str(out),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
        ).fit()
    return finish(latest_checkpoint(out), cfg, out)


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


def latent_sweep(data_path: str | Path, out_dir: str | Path, latents=LATENT_SWEEP,
                 **options) -> list[dict]:
    """AE-ALIGNN for each latent size k (paper Table 1), one out_dir/k<k> each."""
    return [{"latent": k, **train(data_path, Path(out_dir) / f"k{k}", arch="ae-alignn",
                                   latent=k, **options)} for k in latents]


def train_epoch(net: nn.Module, task: Task, part: Part, gap_part: Part | None, optimizer,
                scheduler, cfg: TrainConfig, order: np.ndarray, gap_order: np.ndarray,
                device) -> float:
    """One pass over this rank's shard; returns the mean training loss.

    With a gap set, each step also takes an equal share of `gap_order`; both go through one
    forward pass (DDP allows one per backward). The bounds term covers every structure that
    has bounds, labelled ones included, weighed by gap_weight x the task's target scale.
    """
    net.train()
    total, steps = 0.0, 0
    batch_size = cfg.batch_size
    picks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    gap_picks = np.array_split(gap_order, len(picks)) if gap_part else [order[:0]] * len(picks)
    for pick, gap_pick in zip(picks, gap_picks):
        graphs = graphs_of(part, pick) + (graphs_of(gap_part, gap_pick) if gap_part else [])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            pred = net(to_tensors(collate(graphs), device)).float()
        targets = torch.as_tensor(part.targets[pick], device=device)
        loss = LOSSES[cfg.loss](pred[:len(pick)], targets)
        own = part.bounds is not None
        bounds = ([part.bounds[pick]] if own else []) + (
            [gap_part.bounds[gap_pick]] if len(gap_pick) else [])
        if bounds:
            bounded = task.decode(pred if own else pred[len(pick):])
            excess = bounds_excess(bounded, torch.as_tensor(np.concatenate(bounds), device=device))
            loss = loss + cfg.gap_weight * task.target_scale * excess.mean()
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


def new_state(cfg: TrainConfig) -> dict:
    return {"epoch": 0, "best_epoch": 0, "best_val_mae": math.inf, "best_weights": None,
            "history": [], "early_stopped": False, "resumed_at": [],
            "settings": cfg.resume_keys()}


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete epoch checkpoint in out_dir; a partly copied one is passed over."""
    found = {}
    for state_file in (out / RUN_NAME).glob("checkpoint_*/state.pt"):
        try:
            found[torch.load(state_file, weights_only=True)["epoch"]] = state_file.parent
        except (RuntimeError, EOFError, KeyError, OSError):
            continue
    return found[max(found)] if found else None


def resumable_state(checkpoint: Path, cfg: TrainConfig) -> dict:
    """The saved state of a run, refusing to continue one that trained something else."""
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    wanted = cfg.resume_keys()
    changed = [key for key in RESUME_KEYS if state["settings"].get(key) != wanted[key]]
    if changed:
        raise ResumeError(f"{checkpoint.parent.parent} holds a run with other "
                         f"{', '.join(changed)}: train into a new out_dir")
    return state


def train_loop(loop_config: dict) -> None:
    """Ray Train worker: resume from the latest checkpoint, then run epochs until the last one
    or until validation MAE has not improved for `patience` epochs. `loop_config["train"]` is the
    run's TrainConfig (Ray Train hands a worker a dict)."""
    import ray.train
    import ray.train.torch

    cfg = loop_config["train"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    threads = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    task = make_task(cfg)
    train_part, val_part = load_parts(cfg.data, rank, world, task.targets_of,
                                      bounded=bool(cfg.gaps),
                                      hold_out=cfg.hold_out)
    gap_train, gap_val = load_gap_parts(cfg, rank, world)
    resume = cfg.resume_from
    if not resume:
        start_at_mean(task.trainable, train_part.targets)
    state = restore(task.model, Path(resume)) if resume else new_state(cfg)
    task.model.to(device)
    log(rank, f"{world} worker(s); rank 0 trains on {device} with {threads} torch threads")
    net = ray.train.torch.prepare_model(  # the last layers' edge updates feed no output
        task.trainable, parallel_strategy_kwargs={"find_unused_parameters": True})
    steps = -(-len(train_part.rows) // cfg.batch_size)
    optimizer, scheduler = optimizers(task.trainable, cfg, steps)
    if resume:
        optimizer.load_state_dict(state.pop("optimizer"))
        scheduler.load_state_dict(state.pop("scheduler"))
        log(rank, f"resumed after epoch {state['epoch']} from {resume}")
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        start = time.perf_counter()
        order = np.random.default_rng([cfg.seed, epoch, rank]).permutation(
            len(train_part.rows))
        gap_order = (np.random.default_rng([cfg.seed, epoch, rank, 1]).permutation(
            len(gap_train.rows))[:GAP_SHARE * len(order)] if gap_train else order[:0])
        loss = train_epoch(net, task, train_part, gap_train, optimizer, scheduler,
                           cfg, order, gap_order, device)
        val, val_gap = (validation_mean(task.trainable, task.decode, part, cfg.batch_size,
                                        device, cfg.amp) for part in (val_part, gap_val))
        row = {"epoch": epoch, "train_loss": mean_over_ranks(loss, device), "val_mae": val,
               "val_gap_excess": val_gap, "val_score": val_score(val, val_gap, cfg),
               "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - start,
               "threads": threads}
        advance(state, row, task.model, cfg.patience)
        report(state, task.model, optimizer, scheduler, rank)
        log(rank, "epoch {epoch:4d}  loss {train_loss:.5f}  val MAE {val_mae:.5f}  "
                  "gap excess {val_gap_excess:.5f}  lr {lr:.2e}  {seconds:.1f} s".format(**row))
        if state["early_stopped"]:
            log(rank, f"early stop: no better validation score for {cfg.patience} epochs")
            break


def val_score(val_mae: float, val_gap: float, cfg: TrainConfig) -> float:
    """What early stopping and the kept weights follow: the training objective on validation,
    spectrum MAE plus gap weight x gap-set bounds excess."""
    return val_mae if math.isnan(val_gap) else val_mae + cfg.gap_weight * val_gap


def restore(model: nn.Module, checkpoint: Path) -> dict:
    """Weights into `model`; returns the saved state (history, best, optimizer, scheduler)."""
    saved, _ = load_checkpoint(checkpoint / "model.pt")
    model.load_state_dict(saved.state_dict())
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    state["resumed_at"].append(state["epoch"] + 1)
    return state


def optimizers(module: nn.Module, cfg: TrainConfig, steps_per_epoch: int):
    """AdamW with a one-cycle schedule over all planned steps (early stopping just cuts it)."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
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


def finish(checkpoint: Path, cfg: TrainConfig, out: Path) -> dict:
    """out_dir/model.pt: the best weights, with the split, data hash and metrics in its meta."""
    model, _ = load_checkpoint(checkpoint / "model.pt")
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    model.load_state_dict(state["best_weights"])
    data = read_training_set(cfg.data, graphs=False)
    best = state["history"][state["best_epoch"] - 1] if state["best_epoch"] else {}
    metrics = {"best_epoch": state["best_epoch"], "val_mae": state["best_val_mae"],
               "val_gap_excess": best.get("val_gap_excess", math.nan),
               "baseline_val_mae": baseline_mae(data, cfg.hold_out), "epochs_run": state["epoch"],
               "early_stopped": state["early_stopped"], "resumed_at": state["resumed_at"]}
    if cfg.arch == "ae-alignn":
        metrics["reconstruction_val_mae"] = torch.load(cfg.autoencoder,
                                                       weights_only=True)["val_mae"]
    created = datetime.now(timezone.utc)
    meta = {"model_id": f"{cfg.arch}-{cfg.data_hash[:8]}-{created:%Y%m%dT%H%M%S}",
            "created": created.isoformat(timespec="seconds"), "data": portable_path(cfg.data),
            "data_hash": cfg.data_hash, "data_provenance": data.attrs,
            "split": {name: rows.tolist() for name, rows in data.split.items()},
            "training": {**{key: getattr(cfg, key) for key in (*RESUME_KEYS, "patience", "amp")
                            if key != "gap_exclude"},
                         "gaps": cfg.gaps and portable_path(cfg.gaps)},
            "gap_set": gap_meta(cfg),
            "metrics": metrics, "history": state["history"]}
    save_checkpoint(out / "model.pt", model, meta)
    write_metrics(out, state["history"], metrics)
    return metrics


def gap_meta(cfg: TrainConfig) -> dict | None:
    """How to rebuild the gap set and its split, which `screen evaluate` scores."""
    if not cfg.gaps:
        return None
    return {"path": portable_path(cfg.gaps), "hash": cfg.gaps_hash, "seed": SPLIT_SEED,
            "split": SPLIT_METHOD, "exclude": cfg.gap_exclude, "weight": cfg.gap_weight}


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
