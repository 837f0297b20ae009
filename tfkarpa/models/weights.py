"""The one loader of weights files into built models, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

from tfkarpa.errors import TfkarpaError


def load_weights(model, path, about: str = "", fix: str = "") -> None:
    """`model.load_weights(path)` for every weights file tfkarpa reads: a missing, empty,
    truncated or foreign file (another model's, another width's) is one TfkarpaError that names
    the file and says what to do, instead of h5py's or Keras' traceback. `about` says whose
    weights they are (a key, a run); `fix` what to do (default: re-train)."""
    path = Path(path)
    where = f"{about}: " if about else ""
    fix = fix or "train the run again, or restore the file from a copy"
    if not path.is_file():
        raise TfkarpaError(f"{where}weights file '{path}' does not exist; {fix}")
    if path.stat().st_size == 0:
        raise TfkarpaError(f"{where}weights file '{path}' is empty (0 bytes); {fix}")
    try:
        model.load_weights(str(path))
    except (OSError, ValueError, KeyError, IndexError) as err:
        # h5py says "truncated file" or "file signature not found"; Keras a layer count or a
        # shape mismatch when the file belongs to another model.
        text = " ".join(str(err).split())[:240] or type(err).__name__
        raise TfkarpaError(f"{where}weights file '{path}' does not load into {model.name} "
                           f"(damaged, or another model's: {text}); {fix}") from err
