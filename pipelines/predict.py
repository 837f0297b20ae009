"""python -m pipelines predict MODEL IMAGE_OR_FOLDER... [top_k=5]: top-k labels per image."""

from __future__ import annotations

from pipelines import _cli

SUMMARY = "predict top-k labels for images or folders with a run or an exported SavedModel"


def main(argv: list[str] | None = None) -> int:
    p = _cli.parser("predict", SUMMARY, "RUN_DIR | SAVED_MODEL IMAGE_OR_FOLDER... [top_k=5]",
                    with_keys=False)
    p.add_argument("model", help="a run directory or a SavedModel exported by tfkarpa")
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively); top_k=N")
    args = p.parse_intermixed_args(argv)

    def handle(args):
        from tfkarpa.errors import TfkarpaError
        from tfkarpa.infer import load_predictor, predict_files

        options, _, inputs = _cli.verb_options("predict", args.inputs, {"top_k": "5"},
                                               numbers=("top_k",))
        top_k = int(options["top_k"])
        if not inputs:
            raise TfkarpaError("give at least one image file or folder")
        predictor = load_predictor(args.model)
        results = predict_files(predictor, inputs, top_k)
        lines = [""]
        for r in results:
            labels = "  ".join(f"{t['label']} {t['score']:.3f}" for t in r["top_k"])
            lines.append(f"{r['image']}  {labels}")
        return {"artifacts": {}, "metrics": {"images": len(results)}, "predictions": results,
                "lines": lines}

    return _cli.run_verb("predict", args, handle)


if __name__ == "__main__":
    raise SystemExit(main())
