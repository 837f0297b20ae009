"""`compress`: new runs from a finished one, one per compression stage, through the fit loop.

`compress_run("runs/demo", ["prune.sparsity=0.8", "qat=true"])` makes `runs/demo-prune80`
(pruned, stripped) and then `runs/demo-prune80-qat` (QAT with the prune-preserving scheme) from
it. Each stage starts from the previous stage's final weights and inherits its config, so a
stage run can be evaluated, exported or compressed further like any run. Fine-tuning defaults to
a third of the source's epochs at a tenth of its learning rate, without warm-up; any key given
on the command line wins.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tfkarpa import config as config_lib
from tfkarpa import runs
from tfkarpa.core import fit
from tfkarpa.errors import TfkarpaError
from tfkarpa.optimize import requested_stages
from tfkarpa.tasks.classify.task import TASK

log = logging.getLogger(__name__)


def _stage_tag(stage: str, cfg: config_lib.Config) -> str:
    if stage == "prune":
        return "prune24" if cfg.prune.structure == "2:4" else f"prune{round(cfg.prune.sparsity * 100)}"
    if stage == "cluster":
        return f"cluster{cfg.cluster.clusters}"
    return "qat"


def _finished_run(path: Path) -> dict:
    if not (path / "config.yaml").is_file():
        raise TfkarpaError(f"'{path}' is not a run directory (no config.yaml)")
    if not (path / "metrics.json").is_file() or not (path / "checkpoints" / "final.weights.h5").is_file():
        raise TfkarpaError(f"run '{path}' has not finished (no metrics.json or final weights); "
                           "compress starts from a finished run")
    stored = config_lib.to_dict(runs.read_config(path))
    if stored["task"] != TASK.name:
        raise TfkarpaError(f"run '{path}' is a {stored['task']} run; compress takes "
                           "classification runs (export detectors to int8 TFLite with "
                           "`export quantize=int8`)")
    return stored


def _export_root(source: Path, overrides: list[str]) -> tuple[Path, list[str]]:
    """Where each stage's SavedModel goes (`export_dir=DIR` gives DIR/<stage run>; by default
    the folder holding the source run's own export), and the overrides without that key."""
    export_root = None
    for o in overrides:
        key, _, value = o.partition("=")
        if key.strip() == "export_dir":
            export_root = Path(value.strip()) if value.strip() else None
    overrides = [o for o in overrides if o.partition("=")[0].strip() != "export_dir"]
    if export_root is None:
        try:
            done_info = json.loads((source / "metrics.json").read_text())
            export_root = Path(done_info["artifacts"]["saved_model"]).parent
        except (KeyError, ValueError, OSError):
            export_root = Path("saved_models")
    return export_root, overrides


def compress_run(source: str | Path, overrides: list[str], verbose: int = 2) -> dict:
    """Run every requested stage in order; returns the last stage's result plus all run dirs."""
    source = Path(source)
    if not source.exists():
        raise TfkarpaError(f"run '{source}' does not exist")
    base = _finished_run(source)
    done = list(base.get("stages") or [])
    if "qat" in done:
        raise TfkarpaError(f"run '{source}' is already quantization-aware; compress its source "
                           "run instead")
    if any(o.split("=", 1)[0].strip() in ("stages", "model.weights", "run_dir", "name")
           for o in overrides):
        raise TfkarpaError("compress sets stages, model.weights, run_dir and name itself")
    export_root, overrides = _export_root(source, overrides)
    wanted = requested_stages(config_lib.build(base=base, overrides=overrides))
    todo = [s for s in wanted if s not in done]
    if not todo:
        raise TfkarpaError("nothing to compress: give prune.sparsity=0.8, prune.structure=2:4, "
                           "cluster.clusters=16 and/or qat=true")
    order = ("prune", "cluster", "qat")
    if done and order.index(todo[0]) < order.index(done[-1]):
        raise TfkarpaError(f"run '{source}' went through {', '.join(done)}; {todo[0]} must come "
                           "before those (TF-MOT's order is prune, cluster, QAT)")
    defaults = [f"epochs={max(2, round(base['epochs'] / 3))}",
                f"optimizer.lr={base['optimizer']['lr'] * 0.1:g}", "optimizer.warmup_epochs=0"]
    results, current, current_cfg = [], source, base
    for stage in todo:
        probe = config_lib.build(base=current_cfg, overrides=overrides)
        name = f"{current.name}-{_stage_tag(stage, probe)}"
        cfg = config_lib.build(base=current_cfg, overrides=[
            *defaults, *overrides, f"stages={','.join([*done, stage])}", "run_dir=", f"name={name}",
            f"model.weights={current / 'checkpoints' / 'final.weights.h5'}",
            f"export_dir={export_root / name}"])
        result = runs.finished_twin(cfg.runs_root, name, config_lib.to_dict(cfg))
        if result:  # the same command ran before and was stopped in a later stage
            log.info("compress stage %s: %s is done already; going on from it", stage,
                     result["run_dir"])
        else:
            log.info("compress stage %s: %s -> %s", stage, current, name)
            result = fit.run(cfg, TASK, verbose=verbose)
        results.append(result)
        done.append(stage)
        current = Path(result["run_dir"])
        current_cfg = config_lib.to_dict(cfg)
    last = results[-1]
    last["artifacts"]["stage_runs"] = ",".join(r["run_dir"] for r in results)
    last["metrics"]["source_run"] = str(source)
    return last
