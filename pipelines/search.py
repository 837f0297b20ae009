"""python -m pipelines search RECIPE space=SPACE.yaml [trials=20] [workers=1] [objective=...] ..."""

from __future__ import annotations

from pipelines import _cli

SUMMARY = ("search config keys with Optuna: every trial an ordinary run in the study folder, "
           "bad trials pruned early, the best config written as a recipe")
OPTIONS = {"space": "", "study": "", "trials": "20", "workers": "1", "objective": "",
           "pruner": "median", "sampler": "tpe", "storage": "", "export_best": "false",
           "heartbeat": "30"}
EPILOG = """search options:
  space=FILE.yaml     keys to vary, dotted or nested as in recipes, each a list or a range:
                      `optimizer.lr: loguniform(1e-4, 1e-1)`, `model.width: [0.5, 1.0]`,
                      `epochs: int(4, 12)`
  study=DIR           the study folder (default: <runs_root>/<data>-<model>-search); the same
                      command goes on with it, and several processes on it share its trials
  trials=N            finished trials (complete or pruned) the study stops at [20]
  workers=N           processes on this machine, each with its share of the cores [1]
  objective=A[,B]     validation figures to maximise (accuracy, map, knn_accuracy, val_loss:min)
                      and edge figures to minimise: int8_latency_ms, int8_kb (each trial exported
                      as int8 TFLite and timed here); several = a Pareto front [the task's]
  pruner=P            median | hyperband | none: stop bad trials early (one objective) [median]
  sampler=S           tpe | random [tpe]
  storage=URL         an RDB URL Optuna takes, e.g. postgresql://user@host/db [sqlite in study]
  export_best=true    export the best trial (every front trial) to saved_models/<study>/
  heartbeat=SECONDS   a running trial's heartbeat; one silent for twice this is re-run [30]

"""


def main(argv: list[str] | None = None) -> int:
    p = _cli.parser("search", SUMMARY, "[RECIPE | FILE.yaml] space=SPACE.yaml [trials=N] "
                    "[workers=N] [objective=...] [key=value ...]")
    p.epilog = EPILOG + (p.epilog or "")
    p.add_argument("args", nargs="*", help="a recipe name or YAML file, search options, then "
                   "key=value config overrides for every trial")
    p.add_argument("--config", help="a YAML config file (applied after the recipe)")
    args = p.parse_intermixed_args(argv)

    def handle(args):
        from pathlib import Path

        from tfkarpa.core.fit import default_name
        from tfkarpa.errors import TfkarpaError
        from tfkarpa.tasks import search

        options, overrides, words = _cli.verb_options(
            "search", args.args, OPTIONS, numbers=("trials", "workers", "heartbeat"),
            allow_config=True)
        if not options["space"]:
            raise TfkarpaError("search needs space=FILE.yaml: the config keys to vary and over "
                               "what (python -m pipelines search --help shows the forms)")
        if options["export_best"] not in ("true", "false"):
            raise TfkarpaError("search option 'export_best' must be true or false, got "
                               f"'{options['export_best']}'")
        recipe = _cli.task_recipe(overrides)
        if not words and not args.config and recipe:
            words = [recipe]
        cfg = search.base_config(_cli.build_config(args, words, overrides))
        study = options["study"] or str(Path(cfg.runs_root) / default_name(cfg, "-search"))
        return search.run(cfg, options["space"], study, search.Options(
            trials=int(options["trials"]), workers=int(options["workers"]),
            objective=options["objective"], pruner=options["pruner"],
            sampler=options["sampler"], storage=options["storage"],
            export_best=options["export_best"] == "true", heartbeat=int(options["heartbeat"]),
            verbose=0 if args.quiet else 2 if options["workers"] == "1" else 0))

    return _cli.run_verb("search", args, handle)


if __name__ == "__main__":
    raise SystemExit(main())
