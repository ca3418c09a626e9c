"""The trained models shipped inside the package, by name; no torch or Ray import, so that the
CLI resolves --model cheaply."""
from pathlib import Path

SHIPPED_MODELS = {"d-alignn": "default_model.pt", "ae-alignn": "ae_model.pt"}


def shipped_model(name: str = "d-alignn") -> Path:
    """A trained model shipped inside the package. D-ALIGNN, the default, has the closer spectra;
    AE-ALIGNN the closer band gaps (see the model card), so it is there for gap screens."""
    path = Path(__file__).parent / "data" / SHIPPED_MODELS[name]
    if not path.exists():
        raise FileNotFoundError(f"no shipped {name} model at {path}: pass --model PATH")
    return path
