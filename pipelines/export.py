"""python -m pipelines export RUN [formats=saved_model,tflite,onnx] [quantize=none,int8,...]."""

from __future__ import annotations

from pipelines import _cli

SUMMARY = ("export a run as SavedModel, TFLite (none, fp16, dynamic, int8, int8_full) and ONNX "
           "(classifiers: one per TFLite mode), each checked")


def main(argv: list[str] | None = None) -> int:
    p = _cli.parser("export", SUMMARY, "RUN_DIR [formats=saved_model,tflite,onnx] "
                    "[quantize=none,fp16,dynamic,int8,int8_full] [representative=256] [check=64] "
                    "[per_channel=true] [out=saved_models]; quantize defaults to none,int8 "
                    "(detectors: none,dynamic)", with_keys=False)
    p.add_argument("run", help="a finished run directory")
    p.add_argument("args", nargs="*", help="formats=..., quantize=..., representative=N "
                   "(calibration images from the training split), check=N (validation images "
                   "for the parity check), per_channel=false (one int8 scale per weight tensor: "
                   "smaller, less accurate), out=DIR")
    args = p.parse_intermixed_args(argv)

    def handle(args):
        from tfkarpa.errors import TfkarpaError
        from tfkarpa.tasks import export_run

        options, _, words = _cli.verb_options(
            "export", args.args, {"formats": "saved_model,tflite", "quantize": "",
                                  "representative": "256", "check": "64", "out": "",
                                  "per_channel": "true"},
            numbers=("representative", "check"))
        if words:
            raise TfkarpaError(f"unexpected argument(s): {' '.join(words)} (expected key=value)")
        if options["per_channel"] not in ("true", "false"):
            raise TfkarpaError(f"export option 'per_channel' must be true or false, got "
                               f"'{options['per_channel']}'")
        # No quantize given: the task's default (classifiers none,int8; detectors
        # none,dynamic, as full int8 costs a detector more than its 1-point check allows).
        result = export_run(args.run, _cli.comma_list(options["formats"]),
                            _cli.comma_list(options["quantize"]), options["out"] or None,
                            int(options["representative"]), int(options["check"]),
                            per_channel=options["per_channel"] == "true")
        return {"run_dir": args.run, "artifacts": result["artifacts"],
                "metrics": result["metrics"]}

    return _cli.run_verb("export", args, handle)


if __name__ == "__main__":
    raise SystemExit(main())
