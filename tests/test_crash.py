"""Crash and resume: commands killed with SIGKILL at different moments, then run again.

With deterministic=true a run that is killed (here: during an epoch, while it writes its
checkpoints, while it exports) and started again with the same command must end with exactly
the numbers of a run that was never interrupted, and leave no temporary files behind.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_process, started

# Every test here runs several commands in processes and kills them (each command waits at most
# 600 s; together they take minutes on a loaded machine).
pytestmark = [pytest.mark.process, pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["data=shapes", "data.count=240", "data.image_size=16", "model.width=0.5",
         "batch_size=32", "data.augment=light", "deterministic=true", "epochs=3"]
COMPRESS = ["prune.sparsity=0.5", "qat=true", "epochs=2"]


def _command(work: Path, verb: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines", verb, *args, "--json", "--quiet"]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _finish(work: Path, verb: str, *args: str) -> dict:
    out = run_process(_command(work, verb, *args), cwd=work, env=_env(), text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _kill_when(work: Path, verb: str, args: list[str], moment, what: str) -> None:
    """Start the command, SIGKILL it as soon as `moment()` holds; the moment must come."""
    with started(_command(work, verb, *args), cwd=work, env=_env(), stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL) as proc:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if moment():
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                return
            time.sleep(0.001)
        raise AssertionError(f"the command ended before the moment to kill it: {what}")


def _rows(history: Path) -> int:
    try:
        return sum(1 for line in history.read_text().splitlines()[1:] if line.strip())
    except OSError:
        return 0


def _temporaries(directory: Path) -> list[str]:
    return [p.name for p in directory.rglob("*") if ".tmp-" in p.name] if directory.exists() else []


def _same_numbers(a: dict, b: dict) -> None:
    for key in ("final_train_loss", "test_accuracy", "test_top5_accuracy", "best_val_accuracy"):
        assert a["metrics"][key] == b["metrics"][key], key


def test_train_killed_three_times_ends_like_an_uninterrupted_run(tmp_path):
    reference = _finish(tmp_path, "train", *TRAIN, "runs_root=ref_runs", "export_dir=ref_sm")

    run = tmp_path / "runs" / "shapes-small_cnn"
    checkpoints, saved = run / "checkpoints", tmp_path / "saved_models"
    # 1. in the middle of epoch 2 (epoch 1's row is in history.csv, its backup written)
    _kill_when(tmp_path, "train", TRAIN,
               lambda: _rows(run / "history.csv") >= 1 and (run / "backup").is_dir()
               and any((run / "backup").rglob("*.index")), "during epoch 2")
    # 2. while the next epoch's weights are being written (a temporary file exists)
    _kill_when(tmp_path, "train", TRAIN,
               lambda: any(".tmp-" in name for name in os.listdir(checkpoints)), "checkpoint write")
    # 3. while the SavedModel is being exported, after training
    _kill_when(tmp_path, "train", TRAIN,
               lambda: saved.is_dir() and any(".tmp-" in n for n in os.listdir(saved)), "export")
    assert not (run / "metrics.json").exists()

    resumed = _finish(tmp_path, "train", *TRAIN)
    assert resumed["run_dir"] == "runs/shapes-small_cnn"  # the same run, not a numbered one
    _same_numbers(resumed, reference)
    assert resumed["metrics"]["epochs_run"] == 3
    epochs = [line.split(",")[0] for line in (run / "history.csv").read_text().splitlines()[1:]]
    assert sorted(set(epochs)) == ["0", "1", "2"]
    assert _temporaries(run) == [] and _temporaries(saved) == []
    assert (saved / "shapes-small_cnn" / "saved_model.pb").is_file()

    # compress, killed in its second stage (QAT), goes on from the finished first stage
    base = tmp_path / reference["run_dir"]
    stage_two = tmp_path / "ref_runs" / "shapes-small_cnn-prune50-qat"
    _kill_when(tmp_path, "compress", [str(base), *COMPRESS],
               lambda: _rows(stage_two / "history.csv") >= 1, "compress stage 2, epoch 2")
    compressed = _finish(tmp_path, "compress", str(base), *COMPRESS)
    assert compressed["artifacts"]["stage_runs"].split(",") == [
        "ref_runs/shapes-small_cnn-prune50", "ref_runs/shapes-small_cnn-prune50-qat"]
    assert not (tmp_path / "ref_runs" / "shapes-small_cnn-prune50-2").exists()
    uninterrupted = _finish(tmp_path, "compress", str(base), *COMPRESS, "runs_root=again")
    _same_numbers(compressed, uninterrupted)


def test_pretrain_killed_in_an_epoch_ends_like_an_uninterrupted_run(tmp_path):
    args = ["data.count=240", "data.image_size=16", "model.width=0.5", "batch_size=32",
            "epochs=3", "deterministic=true"]
    reference = _finish(tmp_path, "pretrain", *args, "runs_root=ref_runs")
    run = tmp_path / "runs" / "shapes-small_cnn-simclr"
    _kill_when(tmp_path, "pretrain", args,
               lambda: _rows(run / "history.csv") >= 1 and (run / "backup").is_dir()
               and any((run / "backup").rglob("*.index")), "during epoch 2")
    assert not (run / "metrics.json").exists()
    resumed = _finish(tmp_path, "pretrain", *args)
    assert resumed["run_dir"] == "runs/shapes-small_cnn-simclr"
    assert resumed["metrics"]["epochs_run"] == 3
    for key in ("final_train_loss", "final_contrastive_accuracy", "test_knn_accuracy",
                "test_linear_probe_accuracy"):
        assert resumed["metrics"][key] == reference["metrics"][key], key
    epochs = [line.split(",")[0] for line in (run / "history.csv").read_text().splitlines()[1:]]
    assert sorted(set(epochs)) == ["0", "1", "2"]
    assert _temporaries(run) == []
