"""python -m pipelines benchmark RUN_OR_DIR... [out=DIR] [runs=100]: one table over all artifacts."""

from __future__ import annotations

from pipelines import _cli

SUMMARY = ("size, gzip size, test accuracy through each artifact's runtime and batch-1 latency "
           "of every Keras, SavedModel, TFLite and ONNX artifact of some runs")


def main(argv: list[str] | None = None) -> int:
    p = _cli.parser("benchmark", SUMMARY, "RUN_OR_DIR... [out=DIR] [runs=100]", with_keys=False)
    p.add_argument("targets", nargs="+", help="runs, SavedModels, .tflite/.onnx files or folders of them; "
                   "out=DIR for the reports, runs=N timed inferences per artifact")
    args = p.parse_intermixed_args(argv)

    def handle(args):
        from pathlib import Path

        from tfkarpa.tasks import benchmark
        from tfkarpa.errors import TfkarpaError

        options, _, targets = _cli.verb_options("benchmark", args.targets,
                                                {"out": "", "runs": "100"}, numbers=("runs",))
        if not targets:
            raise TfkarpaError("give at least one run, SavedModel, .tflite/.onnx file or folder")
        first = Path(targets[0])
        is_run = (first / "config.yaml").is_file()
        default = first / "benchmark" if is_run else first.parent / f"{first.name.rstrip('/')}.benchmark"
        out = Path(options["out"] or default)
        result = benchmark(targets, out, int(options["runs"]),
                           tensorboard_dir=first / "logs" / "benchmark" if is_run else None)
        return {"run_dir": str(first) if is_run else None, "artifacts": result["artifacts"],
                "metrics": {"artifacts": len(result["rows"])}, "rows": result["rows"],
                "lines": ["", result["markdown"]] if not args.quiet else []}

    return _cli.run_verb("benchmark", args, handle)


if __name__ == "__main__":
    raise SystemExit(main())
