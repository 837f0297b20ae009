"""python -m pipelines pretrain [RECIPE] [key=value ...]: SimCLR on the images, labels unused."""

from __future__ import annotations

import sys

from pipelines import _cli

SUMMARY = ("contrastive (SimCLR) pretraining of an encoder on any source; labels only feed the "
           "kNN / linear-probe monitors")
DEFAULT_RECIPE = "shapes_simclr"


def main(argv: list[str] | None = None) -> int:
    p = _cli.parser("pretrain", SUMMARY, "[RECIPE | FILE.yaml] [--config FILE.yaml] [key=value ...]")
    p.add_argument("args", nargs="*", help=f"a recipe (default {DEFAULT_RECIPE}) or YAML file, "
                   "then key=value overrides")
    p.add_argument("--config", help="a YAML config file (applied after the recipe)")
    args = p.parse_intermixed_args(argv)

    def handle(args):
        from tfkarpa import tasks

        overrides, words = _cli.split_overrides(args.args)
        cfg = _cli.build_config(args, words or [DEFAULT_RECIPE], ["task=pretrain", *overrides])
        verbose = 0 if args.quiet else (1 if sys.stdout.isatty() else 2)
        result = tasks.run(cfg, verbose=verbose)
        result.setdefault("lines", []).append(
            f"  next: python -m pipelines finetune from={result['run_dir']} labels=10%")
        return result

    return _cli.run_verb("pretrain", args, handle)


if __name__ == "__main__":
    raise SystemExit(main())
