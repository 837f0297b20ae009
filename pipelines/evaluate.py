"""python -m pipelines evaluate PATH [split=test] [out=DIR] [key=value ...]."""

from __future__ import annotations

from pipelines import _cli

SUMMARY = ("evaluate a run, SavedModel or TFLite file: accuracy, top-k, per-class table, confusion "
           "matrix, calibration, robust accuracy under attack=; for detectors COCO mAP "
           "(pycocotools) with per-class AP")
ATTACK = {"attack": "", "eps": "", "attack_steps": "", "attack_from": ""}


def main(argv: list[str] | None = None) -> int:
    p = _cli.parser("evaluate", SUMMARY, "RUN_DIR | SAVED_MODEL [split=test] [out=DIR] [key=value ...]")
    p.add_argument("path", help="a run directory or a SavedModel exported by tfkarpa")
    p.add_argument("args", nargs="*",
                   help="split=train|val|test|all, out=DIR (reports); classifiers: "
                        "attack=fgsm|pgd (robust accuracy beside clean), eps=2/255 (L-inf, share "
                        "of the pixel range), attack_steps=10 (pgd), attack_from=RUN (the Keras "
                        "run a SavedModel/TFLite file's attack is made on; default: its own); "
                        "then config overrides such as data.data_dir=... or data=coco:OTHER.json")
    args = p.parse_intermixed_args(argv)

    def handle(args):
        from pathlib import Path

        from tfkarpa import tasks
        from tfkarpa.errors import TfkarpaError
        from tfkarpa.runs import check_output_dir, ensure_writable

        options, rest, words = _cli.verb_options(
            "evaluate", args.args, {"split": "test", "out": "", **ATTACK}, allow_config=True)
        if words:
            raise TfkarpaError(f"unexpected argument(s): {' '.join(words)} (expected key=value)")
        attack = {k: options[k] for k in ATTACK if options[k]}
        if attack and "attack" not in attack:
            raise TfkarpaError(f"evaluate option(s) {', '.join(f'{k}=' for k in attack)} "
                               "need attack=fgsm|pgd")
        keys = {item.split("=", 1)[0] for item in rest}
        if keys & {"data", "data.source"}:  # another source: the run's own split files go
            rest = [*(f"{k}=" for k in ("data.val", "data.test") if k not in keys), *rest]
        predictor = tasks.load_predictor(args.path, rest)
        target = Path(args.path)
        default = (target / "eval" / options["split"] if predictor.kind == "keras" else
                   target.parent / f"{target.name}.eval" / options["split"])
        out = Path(options["out"] or default)
        ensure_writable(out, "evaluate out")
        check_output_dir(out, "evaluation", "evaluate out")  # before the work, not after
        tb = Path(args.path) / "logs" / "eval" if predictor.kind == "keras" else None
        task = tasks.get(predictor.task)
        m = task.evaluate(predictor, options["split"], out_dir=out, tensorboard_dir=tb,
                          options=attack or None)
        metrics, files = task.evaluation_summary(m, out)
        return {
            "run_dir": str(args.path) if predictor.kind == "keras" else None,
            "artifacts": files,
            "metrics": metrics,
            "lines": ["", (out / "report.md").read_text()] if not args.quiet else [],
        }

    return _cli.run_verb("evaluate", args, handle)


if __name__ == "__main__":
    raise SystemExit(main())
