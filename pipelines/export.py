"""python -m pipelines export RUN [formats=saved_model,tflite] [quantize=none,int8,...]."""

from __future__ import annotations

from pipelines import _cli

SUMMARY = "export a run as SavedModel and TFLite (none, fp16, dynamic, int8, int8_full), each checked"


def main(argv: list[str] | None = None) -> int:
    p = _cli.parser("export", SUMMARY, "RUN_DIR [formats=saved_model,tflite] "
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
        from tfkarpa.export import export_run

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
        quantize = options["quantize"]
        if not quantize:  # full int8 costs a detector more than the 1-point check allows
            from tfkarpa.export import run_task

            quantize = "none,dynamic" if run_task(args.run) == "detect" else "none,int8"
        result = export_run(args.run, _cli.comma_list(options["formats"]),
                            _cli.comma_list(quantize), options["out"] or None,
                            int(options["representative"]), int(options["check"]),
                            per_channel=options["per_channel"] == "true")
        if "checks" in result:  # a detector: mAP of each file against the Keras model's
            metrics = {"keras_val_map": result["reference"]["map"]}
            for name, fig in result["checks"].items():
                metrics[f"{name}_val_map"] = fig["export_map"]
            return {"run_dir": args.run, "artifacts": result["artifacts"], "metrics": metrics}
        metrics = {}
        for name, fig in result["parity"].items():
            metrics[f"{name}_max_abs_diff"] = fig["max_abs_diff"]
            metrics[f"{name}_top1_agreement"] = fig["top1_agreement"]
        return {"run_dir": args.run, "artifacts": result["artifacts"], "metrics": metrics}

    return _cli.run_verb("export", args, handle)


if __name__ == "__main__":
    raise SystemExit(main())
