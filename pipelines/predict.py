"""python -m pipelines predict MODEL IMAGE_OR_FOLDER... [top_k=5]: top-k labels per image."""

from __future__ import annotations

from pipelines import _cli

SUMMARY = ("predict top-k labels (classifiers) or boxes (detectors: COCO-format JSON and annotated "
           "images in out=DIR, min_score=0.3; coco=ANNOTATIONS.json gives the results that "
           "file's image and category ids) for images or folders with a run or an export")


def main(argv: list[str] | None = None) -> int:
    p = _cli.parser("predict", SUMMARY, "RUN_DIR | SAVED_MODEL IMAGE_OR_FOLDER... [top_k=5]",
                    with_keys=False)
    p.add_argument("model", help="a run directory or a SavedModel exported by tfkarpa")
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively); top_k=N")
    args = p.parse_intermixed_args(argv)

    def handle(args):
        from tfkarpa import tasks
        from tfkarpa.errors import TfkarpaError

        options, _, inputs = _cli.verb_options(
            "predict", args.inputs, {"top_k": "5", "out": "", "min_score": "0.3", "coco": ""},
            numbers=("top_k",))
        if not inputs:
            raise TfkarpaError("give at least one image file or folder")
        predictor = tasks.load_predictor(args.model)
        return tasks.get(predictor.task).predict(predictor, inputs, options)

    return _cli.run_verb("predict", args, handle)


if __name__ == "__main__":
    raise SystemExit(main())
