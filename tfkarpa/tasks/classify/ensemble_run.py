"""The `ensemble` verb's run: finished classifier runs combined (`ensemble.combine`),
evaluated on the test split and written as an ordinary run directory: config.yaml (with
`ensemble.members` and `ensemble.method`), each member's config under members/, the combined
weights, the test report and, with export, the checked SavedModel. Everything that takes a run
(evaluate, export, benchmark, report, predict, a distillation teacher) then takes the ensemble.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import tensorflow as tf

from tfkarpa import config as config_lib
from tfkarpa import runs
from tfkarpa.core.export import artifact_metadata
from tfkarpa.core.fit import save_final
from tfkarpa.data import sources
from tfkarpa.errors import TfkarpaError
from tfkarpa.tasks.classify import ensemble, serving
from tfkarpa.tasks.classify import evaluate as evaluate_lib
from tfkarpa.tasks.classify import predict as predict_lib


# Long: one run's steps in the order its directory is written (check, claim, record, combine,
# evaluate, export, finish); split up, that order would be spread over several functions.
def make(paths: list[str], method: str = "mean", name: str = "", runs_root: str = "runs",
         export: bool = True, export_dir: str = "") -> dict:
    """Combine finished runs into one ensemble run; returns {run_dir, artifacts, metrics}."""
    started = time.time()
    if method not in ensemble.METHODS:
        raise TfkarpaError(f"ensemble option 'method': '{method}' is not one of "
                           f"{', '.join(ensemble.METHODS)}")
    members = ensemble.check_members(paths)
    first, first_cfg, _ = members[0]
    cfg = copy.deepcopy(first_cfg)
    cfg.ensemble = config_lib.EnsembleConfig([str(p.resolve()) for p, _, _ in members], method)
    cfg.name = name or f"{first.name}-ensemble"
    cfg.runs_root, cfg.run_dir, cfg.export, cfg.export_dir = runs_root, "", export, export_dir
    if export:
        runs.ensure_writable(Path(export_dir or "saved_models"), "export_dir")
        if export_dir:
            runs.check_output_dir(Path(export_dir), "saved_model", "export_dir")
    classes = runs.class_names(first)
    data = sources.load(cfg.data, cfg.seed)
    model = ensemble.combine(
        [predict_lib.load_run_model(p, c, len(classes)) for p, c, _ in members], method,
        cfg.data.image_size)
    cfg_dict = config_lib.to_dict(cfg)
    run_ = runs.claim(cfg.runs_root, cfg.name, "", cfg_dict)
    try:
        runs.save_config(cfg, run_.dir / "config.yaml")
        for index, (path, _, _) in enumerate(members):
            runs.atomic_write_text(run_.dir / ensemble.MEMBERS / str(index) / "config.yaml",
                                   (path / "config.yaml").read_text())
        scores = [m.get("test_accuracy") for _, _, m in members]
        runs.atomic_write_json(run_.dir / "manifest.json", runs.manifest(cfg_dict, data.summary(), {
            "key_metric": "test_accuracy",
            "model": {"name": model.name, "params": int(model.count_params())},
            "ensemble": {"method": method, "members": [
                {"run": str(p), "model": c.model.name, "test_accuracy": s}
                for (p, c, _), s in zip(members, scores)]}}))
        run_.checkpoints.mkdir(parents=True, exist_ok=True)
        final = save_final(model, run_)
        predictor = predict_lib.Predictor(
            "keras", run_.dir, classes, cfg.data.image_size, cfg,
            lambda x: model(tf.cast(x, tf.float32), training=False), model)
        test = evaluate_lib.evaluate(predictor, "test", out_dir=run_.dir / "eval" / "test",
                                     data=data, tensorboard_dir=run_.logs / "eval")
        best = max(s for s in scores if s is not None) if any(s is not None for s in scores) else None
        metrics = {"test_accuracy": test["accuracy"], "test_ece": test["ece"],
                   **{f"test_{k}": v for k, v in test.items() if k.startswith("top")},
                   "members": len(members), "best_member_test_accuracy": best,
                   "params": int(model.count_params())}
        artifacts = {"run_dir": str(run_.dir), "config": str(run_.dir / "config.yaml"),
                     "final_weights": str(final),
                     "test_report": str(run_.dir / "eval" / "test" / "report.md"),
                     "reliability_diagram": str(run_.dir / "eval" / "test" / "reliability.png")}
        if export:
            target = Path(export_dir or Path("saved_models") / run_.name)
            check = serving.sample_images(data.splits["val"], cfg, data.num_classes, 64, cfg.seed)
            metrics["export_parity"] = serving.export_saved_model(
                model, classes, cfg.data.image_size, target, check,
                artifact_metadata(run_.dir, cfg, ("ensemble",)))
            artifacts["saved_model"] = str(target)
        metrics["total_seconds"] = round(time.time() - started, 2)
        runs.atomic_write_json(run_.dir / runs.DONE, {"metrics": metrics, "artifacts": artifacts,
                                                       "history": {}})
        return {"run_dir": str(run_.dir), "artifacts": artifacts, "metrics": metrics}
    except BaseException:
        run_.discard()
        raise
    finally:
        run_.release()
