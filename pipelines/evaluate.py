"""python -m pipelines evaluate PATH [split=test] [out=DIR] [key=value ...]."""

from __future__ import annotations

from pipelines import _cli

SUMMARY = ("evaluate a run, SavedModel or TFLite file: accuracy, top-k, per-class table, confusion "
           "matrix; for detectors COCO mAP (pycocotools) with per-class AP")


def main(argv: list[str] | None = None) -> int:
    p = _cli.parser("evaluate", SUMMARY, "RUN_DIR | SAVED_MODEL [split=test] [out=DIR] [key=value ...]")
    p.add_argument("path", help="a run directory or a SavedModel exported by tfkarpa")
    p.add_argument("args", nargs="*",
                   help="split=train|val|test, out=DIR (reports), then config overrides "
                        "such as data.data_dir=...")
    args = p.parse_intermixed_args(argv)

    def handle(args):
        from pathlib import Path

        from tfkarpa.errors import TfkarpaError
        from tfkarpa.evaluate import evaluate
        from tfkarpa.infer import load_predictor

        options, rest, words = _cli.verb_options("evaluate", args.args, {"split": "test", "out": ""},
                                                 allow_config=True)
        if words:
            raise TfkarpaError(f"unexpected argument(s): {' '.join(words)} (expected key=value)")
        predictor = load_predictor(args.path, rest)
        target = Path(args.path)
        default = (target / "eval" / options["split"] if predictor.kind == "keras" else
                   target.parent / f"{target.name}.eval" / options["split"])
        out = Path(options["out"] or default)
        from tfkarpa.runs import ensure_writable

        ensure_writable(out, "evaluate out")
        tb = Path(args.path) / "logs" / "eval" if predictor.kind == "keras" else None
        if getattr(predictor, "task", "classify") == "detect":
            return _detection(predictor, options["split"], out, tb, args)
        m = evaluate(predictor, options["split"], out_dir=out, tensorboard_dir=tb)
        metrics = {k: v for k, v in m.items() if k in ("examples", "accuracy") or k.startswith("top")}
        metrics["macro_f1"] = m["macro_avg"]["f1-score"]
        return {
            "run_dir": str(args.path) if predictor.kind == "keras" else None,
            "artifacts": {"report": str(out / "report.md"), "report_json": str(out / "report.json"),
                          "confusion_matrix": str(out / "confusion_matrix.png")},
            "metrics": metrics,
            "lines": ["", (out / "report.md").read_text()] if not args.quiet else [],
        }

    return _cli.run_verb("evaluate", args, handle)


def _detection(predictor, split, out, tb, args) -> dict:
    from tfkarpa.detection import evaluate_artifact

    m = evaluate_artifact(predictor, split, out, tensorboard_dir=tb)
    keys = ("map", "map50", "map75", "map_small", "map_medium", "map_large", "ar100")
    return {
        "run_dir": str(args.path) if predictor.kind == "keras" else None,
        "artifacts": {"report": str(out / "report.md"), "metrics": str(out / "metrics.json"),
                      "detections": str(out / "detections.json"), "images": str(out / "images")},
        "metrics": {"images": m["images"], **{k: m[k] for k in keys}},
        "lines": ["", (out / "report.md").read_text()] if not args.quiet else [],
    }


if __name__ == "__main__":
    raise SystemExit(main())
