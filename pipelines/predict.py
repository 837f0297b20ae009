"""python -m pipelines predict MODEL IMAGE_OR_FOLDER... [top_k=5]: top-k labels per image."""

from __future__ import annotations

from pipelines import _cli

SUMMARY = ("predict top-k labels (classifiers) or boxes (detectors: COCO-format JSON and annotated "
           "images in out=DIR, min_score=0.3) for images or folders with a run or an export")


def main(argv: list[str] | None = None) -> int:
    p = _cli.parser("predict", SUMMARY, "RUN_DIR | SAVED_MODEL IMAGE_OR_FOLDER... [top_k=5]",
                    with_keys=False)
    p.add_argument("model", help="a run directory or a SavedModel exported by tfkarpa")
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively); top_k=N")
    args = p.parse_intermixed_args(argv)

    def handle(args):
        from tfkarpa.errors import TfkarpaError
        from tfkarpa.infer import load_predictor, predict_files

        options, _, inputs = _cli.verb_options(
            "predict", args.inputs, {"top_k": "5", "out": "", "min_score": "0.3"},
            numbers=("top_k",))
        top_k = int(options["top_k"])
        if not inputs:
            raise TfkarpaError("give at least one image file or folder")
        predictor = load_predictor(args.model)
        if getattr(predictor, "task", "classify") == "detect":
            return _detection(predictor, inputs, options)
        results = predict_files(predictor, inputs, top_k)
        lines = [""]
        for r in results:
            labels = "  ".join(f"{t['label']} {t['score']:.3f}" for t in r["top_k"])
            lines.append(f"{r['image']}  {labels}")
        return {"artifacts": {}, "metrics": {"images": len(results)}, "predictions": results,
                "lines": lines}

    return _cli.run_verb("predict", args, handle)


def _detection(predictor, inputs, options) -> dict:
    from pathlib import Path

    from tfkarpa.detection import predict_files
    from tfkarpa.errors import TfkarpaError
    from tfkarpa.runs import ensure_writable

    try:
        min_score = float(options["min_score"])
    except ValueError:
        min_score = -1.0
    if not 0.0 <= min_score <= 1.0:
        raise TfkarpaError(f"predict option 'min_score' must be in [0, 1], got '{options['min_score']}'")
    out = Path(options["out"] or Path("predictions") / predictor.path.name)
    ensure_writable(out.parent, "predict out")
    results = predict_files(predictor, inputs, out, min_score)
    lines = [""]
    for r in results:
        found = ", ".join(f"{d['class_name']} {d['score']:.2f}" for d in r["detections"][:6])
        more = f" (+{len(r['detections']) - 6})" if len(r["detections"]) > 6 else ""
        lines.append(f"{r['image']}  {len(r['detections'])} object(s): {found}{more}")
    return {"artifacts": {"detections": str(out / "detections.json"), "annotated_images": str(out)},
            "metrics": {"images": len(results),
                        "detections": sum(len(r["detections"]) for r in results)},
            "predictions": results, "lines": lines}


if __name__ == "__main__":
    raise SystemExit(main())
