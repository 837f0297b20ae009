"""python -m pipelines demo [quick=true] [runs_root=runs] [budget=15] [pretrain=auto]."""

from __future__ import annotations

import sys

from pipelines import _cli

SUMMARY = ("the whole path on embedded data: train a classifier, prune and quantize it, export "
           "SavedModel and TFLite int8, benchmark them, train a small detector, a short SimCLR "
           "pretraining if the budget allows, and one report over every run")


def main(argv: list[str] | None = None) -> int:
    p = _cli.parser("demo", SUMMARY, "[quick=true] [runs_root=runs] [budget=15] "
                    "[pretrain=auto|true|false]", with_keys=False)
    p.add_argument("args", nargs="*", help="quick=true: tiny sizes, under 5 minutes; budget=MIN: "
                   "the time budget that decides whether the pretraining runs")
    args = p.parse_intermixed_args(argv)

    def handle(args):
        from tfkarpa.errors import TfkarpaError
        from tfkarpa.tasks import demo

        options, _, words = _cli.verb_options(
            "demo", args.args, {"quick": "false", "runs_root": "runs", "budget": "15",
                                "pretrain": "auto"})
        if words:
            raise TfkarpaError(f"unexpected argument(s): {' '.join(words)} (expected key=value)")
        if options["quick"] not in ("true", "false"):
            raise TfkarpaError(f"demo option 'quick' must be true or false, got '{options['quick']}'")
        try:
            budget = float(options["budget"])
        except ValueError:
            raise TfkarpaError(f"demo option 'budget' must be a number of minutes, got "
                               f"'{options['budget']}'") from None
        verbose = 0 if args.quiet else (1 if sys.stdout.isatty() else 2)
        return demo.run(_cli.resolve_recipe, options["quick"] == "true", options["runs_root"],
                        budget, options["pretrain"], verbose=verbose)

    return _cli.run_verb("demo", args, handle)


if __name__ == "__main__":
    raise SystemExit(main())
