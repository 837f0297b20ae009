"""python -m pipelines export RUN [formats=saved_model,tflite] [quantize=none,int8,...]."""

from __future__ import annotations

from pipelines import _cli

SUMMARY = "export a run as SavedModel and TFLite (none, fp16, dynamic, int8, int8_full), each checked"


def main(argv: list[str] | None = None) -> int:
    p = _cli.parser("export", SUMMARY, "RUN_DIR [formats=saved_model,tflite] "
                    "[quantize=none,fp16,dynamic,int8,int8_full] [representative=256] [check=64] "
                    "[out=saved_models]", with_keys=False)
    p.add_argument("run", help="a finished run directory")
    p.add_argument("args", nargs="*", help="formats=..., quantize=..., representative=N "
                   "(calibration images from the training split), check=N (validation images "
                   "for the parity check), out=DIR")
    args = p.parse_args(argv)

    def handle(args):
        from tfkarpa.errors import TfkarpaError
        from tfkarpa.export import export_run

        overrides, words = _cli.split_overrides(args.args)
        if words:
            raise TfkarpaError(f"unexpected argument(s): {' '.join(words)} (expected key=value)")
        options = {"formats": "saved_model,tflite", "quantize": "none,int8", "representative": "256",
                   "check": "64", "out": ""}
        for item in overrides:
            key, _, value = item.partition("=")
            if key not in options:
                import difflib

                close = difflib.get_close_matches(key, list(options), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise TfkarpaError(f"unknown export option '{key}'{hint}")
            options[key] = value
        for key in ("representative", "check"):
            if not options[key].isdigit():
                raise TfkarpaError(f"export option '{key}' must be a whole number, got '{options[key]}'")
        split = lambda text: [v.strip() for v in text.split(",") if v.strip()]  # noqa: E731
        result = export_run(args.run, split(options["formats"]), split(options["quantize"]),
                            options["out"] or None, int(options["representative"]),
                            int(options["check"]))
        metrics = {}
        for name, fig in result["parity"].items():
            metrics[f"{name}_max_abs_diff"] = fig["max_abs_diff"]
            metrics[f"{name}_top1_agreement"] = fig["top1_agreement"]
        return {"run_dir": args.run, "artifacts": result["artifacts"], "metrics": metrics}

    return _cli.run_verb("export", args, handle)


if __name__ == "__main__":
    raise SystemExit(main())
