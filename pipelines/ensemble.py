"""python -m pipelines ensemble RUN RUN ... [method=mean|vote] [name=NAME]: one model, and one
run, from several finished classification runs."""

from __future__ import annotations

from pipelines import _cli

SUMMARY = ("one model from several finished classifier runs (same classes, input size and test "
           "split): evaluated, reported and exported as one SavedModel, a run like any other")


def main(argv: list[str] | None = None) -> int:
    p = _cli.parser("ensemble", SUMMARY, "RUN RUN ... [method=mean|vote] [name=NAME] "
                    "[runs_root=runs] [export=true] [export_dir=DIR]", with_keys=False)
    p.add_argument("runs", nargs="+", help="finished classification runs; method=mean averages "
                   "their probabilities, method=vote counts their top classes")
    args = p.parse_intermixed_args(argv)

    def handle(args):
        from tfkarpa.errors import TfkarpaError
        from tfkarpa.tasks.classify import ensemble_run

        options, _, members = _cli.verb_options(
            "ensemble", args.runs, {"method": "mean", "name": "", "runs_root": "runs",
                                    "export": "true", "export_dir": ""})
        if options["export"] not in ("true", "false"):
            raise TfkarpaError(f"ensemble option 'export' must be true or false, got "
                               f"'{options['export']}'")
        return ensemble_run.make(members, options["method"], options["name"],
                                 options["runs_root"], options["export"] == "true",
                                 options["export_dir"])

    return _cli.run_verb("ensemble", args, handle)


if __name__ == "__main__":
    raise SystemExit(main())
