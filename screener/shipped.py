"""The trained models shipped inside the package, and the one rule that turns a --model value
into a checkpoint file; no torch or Ray import, so that the CLI resolves --model cheaply."""
from pathlib import Path

SHIPPED_MODELS = {"d-alignn": "default_model.pt", "ae-alignn": "ae_model.pt"}


def shipped_model(name: str = "d-alignn") -> Path:
    """A trained model shipped inside the package. D-ALIGNN, the default, has the closer spectra;
    AE-ALIGNN the closer band gaps (see the model card), so it is there for gap screens."""
    path = Path(__file__).parent / "data" / SHIPPED_MODELS[name]
    if not path.exists():
        raise FileNotFoundError(f"no shipped {name} model at {path}: pass --model PATH")
    return path


def resolve_model(value: str | None) -> Path:
    """A checkpoint file, a `screen train` run folder holding model.pt, or a shipped model's
    name (D-ALIGNN when None) -> the checkpoint file; a ValueError names what `value` is not."""
    if value is None or value in SHIPPED_MODELS:
        return shipped_model(value or "d-alignn")
    path = Path(value)
    if path.is_dir() and (path / "model.pt").is_file():
        return path / "model.pt"
    if not path.is_file():
        raise ValueError(f"{value!r} is neither a checkpoint file, a run folder holding "
                         f"model.pt, nor a shipped model ({', '.join(SHIPPED_MODELS)})")
    return path
