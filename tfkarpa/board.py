"""TensorBoard over a folder of runs, and the HParams record each run leaves for it.

Every finished run writes one HParams session into its `logs/`: the settings that tell runs
apart (task, data, model, optimizer, epochs, ...) and its final figures as `final/*` scalars.
TensorBoard's HParams tab then shows all runs of a folder side by side, with their per-epoch
scalars (`train/`, `validation/`) as further columns.
"""

from __future__ import annotations

import socket
from pathlib import Path

from tfkarpa.errors import TfkarpaError

# The settings shown in the HParams tab (dotted config keys; absent ones are left out).
HPARAM_KEYS = ("task", "data.source", "data.image_size", "data.count", "data.labels",
               "data.augment", "model.name", "model.width", "epochs", "batch_size",
               "optimizer.name", "optimizer.lr", "optimizer.schedule", "optimizer.weight_decay",
               "label_smoothing", "seed", "mixed_precision", "strategy", "stages")


def hparams_of(cfg_dict: dict) -> dict:
    """The HParams values of a run: scalars only (lists are joined, missing keys skipped)."""
    out = {}
    for key in HPARAM_KEYS:
        value = cfg_dict
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (list, tuple)):
            value = "+".join(map(str, value)) or "none"
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
    return out


def write_hparams(logs_dir: Path, run_name: str, cfg_dict: dict, metrics: dict) -> None:
    """One HParams session in `logs_dir`, with the run's final scalar metrics as `final/*`."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    writer = tf.summary.create_file_writer(str(logs_dir))
    with writer.as_default():
        hp.hparams(hparams_of(cfg_dict), trial_id=run_name)
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                tf.summary.scalar(f"final/{key}", float(value), step=0)
    writer.close()


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start(root: str | Path, port: int = 0, host: str = "localhost") -> str:
    """Serve TensorBoard over `root` in a background thread; returns its URL.

    `port=0` picks a free port. The Python data loader (`load_fast=false`) is used: it needs no
    second process and reads a folder of a few runs quickly.
    """
    from tensorboard import program

    root = Path(root)
    if not root.is_dir():
        raise TfkarpaError(f"runs folder '{root}' does not exist")
    if not any(root.rglob("events.out.tfevents.*")):
        raise TfkarpaError(f"no TensorBoard logs under '{root}': train a run first")
    board = program.TensorBoard()
    try:
        board.configure(argv=[None, "--logdir", str(root), "--host", host,
                              "--port", str(port or free_port(host)), "--load_fast", "false",
                              "--reload_interval", "5"])
        return board.launch()
    except (program.TensorBoardServerException, OSError) as err:
        raise TfkarpaError(f"TensorBoard could not start on {host}:{port}: {err}") from None
