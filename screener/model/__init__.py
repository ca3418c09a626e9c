"""The DOS models in plain torch: D-ALIGNN, the DOS autoencoder and AE-ALIGNN, checkpoints."""
from screener.model.alignn import ALIGNN, ALIGNNConfig, ALIGNNLayer, EdgeGatedGraphConv, to_tensors
from screener.model.autoencoder import AEALIGNN, DOSAutoencoder
from screener.model.checkpoint import (
    CheckpointError,
    build_model,
    checkpoint_info,
    load_checkpoint,
    save_checkpoint,
)

__all__ = [
    "AEALIGNN",
    "ALIGNN",
    "ALIGNNConfig",
    "ALIGNNLayer",
    "CheckpointError",
    "DOSAutoencoder",
    "EdgeGatedGraphConv",
    "build_model",
    "checkpoint_info",
    "load_checkpoint",
    "save_checkpoint",
    "to_tensors",
]
