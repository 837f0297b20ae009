"""python -m pipelines train [RECIPE] [key=value ...]: fit, evaluate on test, export."""

from __future__ import annotations

import sys

from pipelines import _cli

SUMMARY = ("train a classifier (or a detector: task=detect), evaluate it on the test split and "
           "export a SavedModel")


def main(argv: list[str] | None = None) -> int:
    p = _cli.parser("train", SUMMARY, "[RECIPE | FILE.yaml] [--config FILE.yaml] [key=value ...]")
    p.add_argument("args", nargs="*", help="a recipe name or YAML file, then key=value overrides")
    p.add_argument("--config", help="a YAML config file (applied after the recipe)")
    args = p.parse_intermixed_args(argv)

    def handle(args):
        from tfkarpa import tasks

        overrides, words = _cli.split_overrides(args.args)
        recipe = _cli.task_recipe(overrides)
        if not words and not args.config and recipe:
            words = [recipe]
        cfg = _cli.build_config(args, words, overrides)
        verbose = 0 if args.quiet else (1 if sys.stdout.isatty() else 2)
        return tasks.run(cfg, verbose=verbose)

    return _cli.run_verb("train", args, handle)


if __name__ == "__main__":
    raise SystemExit(main())
