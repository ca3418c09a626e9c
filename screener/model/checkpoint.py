"""Model checkpoints: one torch file with the weights, the architecture and config that rebuild
the model, and the energy grid and normalization its outputs are on.

The contents are tensors, dicts, lists, strings and numbers only, so `torch.load(weights_only=True)`
reads them: opening a checkpoint never runs pickled code.
"""
from __future__ import annotations

import io
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from screener.dos import ENERGY_GRID
from screener.errors import ScreenerError
from screener.io.files import atomic_path, file_sha256
from screener.model.alignn import ALIGNN, ALIGNNConfig
from screener.model.autoencoder import AEALIGNN

FORMAT = 1
NORMALIZATION = "states/eV per spin per valence electron"
KEYS = ("format", "arch", "config", "state_dict", "energy_grid", "normalization", "meta")


class CheckpointError(ScreenerError, ValueError):
    """A file that is not a usable dos-screener checkpoint."""


def build_model(arch: str, config: dict) -> nn.Module:
    """A freshly initialised model. `config` holds ALIGNNConfig fields (absent ones default);
    for "ae-alignn" also AEALIGNN's `latent` and `ae_hidden`."""
    if arch not in ("d-alignn", "ae-alignn"):
        raise ValueError(f"unknown arch {arch!r}: expected 'd-alignn' or 'ae-alignn'")
    names = {f.name for f in fields(ALIGNNConfig)}
    alignn = ALIGNNConfig(**{k: v for k, v in config.items() if k in names})
    rest = {k: v for k, v in config.items() if k not in names}
    if arch == "ae-alignn":
        return AEALIGNN(alignn, **rest)
    if rest:
        raise ValueError(f"d-alignn config has unknown keys {sorted(rest)}")
    return ALIGNN(alignn)


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict) -> str:
    """Write `model` with `meta` (may set energy_grid and normalization); returns the file's
    sha256. Written to a temporary file and renamed, so a crash never leaves half a checkpoint."""
    path = Path(path)
    meta = dict(meta)
    grid = np.asarray(meta.pop("energy_grid", ENERGY_GRID), dtype=np.float64)
    payload = {
        "format": FORMAT,
        "arch": model.arch,
        "config": model.config_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "energy_grid": torch.from_numpy(grid.copy()),
        "normalization": str(meta.pop("normalization", NORMALIZATION)),
        "meta": _plain(meta, "meta"),
    }
    buffer = io.BytesIO()  # not the file itself: torch names the archive after it
    torch.save(payload, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return file_sha256(path)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode on `device`, meta); loads on any device whatever it was saved from.

    meta is the saved meta plus arch, config, model_id (saved, else the file stem), hash (sha256
    of the file), energy_grid and normalization.
    """
    payload, meta = _read(path)
    model = build_model(payload["arch"], payload["config"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: weights do not fit its {payload['arch']} config: {exc}") from exc
    return model.to(device).eval(), meta


def checkpoint_info(path: str | Path) -> dict:
    """The meta of `load_checkpoint`, without building the model."""
    return _read(path)[1]


def _read(path: str | Path) -> tuple[dict, dict]:
    """(raw payload, meta) of a checkpoint file, or CheckpointError naming the file."""
    path = Path(path)
    data = path.read_bytes()
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a dos-screener checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or not set(KEYS) <= payload.keys():
        raise CheckpointError(f"{path} is not a dos-screener checkpoint: it lacks "
                              f"{', '.join(KEYS)}")
    if payload["format"] != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {payload['format']!r}, "
                              f"this dos-screener reads format {FORMAT}")
    meta = {
        **payload["meta"],
        "arch": payload["arch"],
        "config": payload["config"],
        "model_id": payload["meta"].get("model_id") or path.stem,
        "hash": file_sha256(path),
        "energy_grid": payload["energy_grid"].numpy(),
        "normalization": payload["normalization"],
    }
    return payload, meta


def _plain(value: object, where: str) -> object:
    """`value` in types `torch.load(weights_only=True)` accepts: numpy values become Python's."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (np.ndarray, np.generic)):
        return _plain(value.tolist(), where)
    if isinstance(value, dict):
        return {_plain(k, where): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    for kind in (bool, int, float, str, bytes):
        if isinstance(value, kind):
            return kind(value)
    if value is None:
        return None
    raise TypeError(f"{where}: a {type(value).__name__} cannot go into a checkpoint "
                    f"(use numbers, strings, lists, dicts or tensors)")
