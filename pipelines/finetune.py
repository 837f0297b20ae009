"""python -m pipelines finetune from=RUN [labels=10%] [key=value ...]: the whole encoder."""

from __future__ import annotations

import sys
from pathlib import Path

from pipelines import _cli

SUMMARY = "fine-tune a contrastive run's encoder with a classifier head on some of the labels"


def transfer(verb: str, summary: str, argv: list[str] | None, defaults: list[str]) -> int:
    """finetune and linear-eval: a classification run whose backbone is a pretraining run's
    encoder, on that run's data and model, with `labels=` of the training labels."""
    p = _cli.parser(verb, summary, "from=RUN [labels=10% | labels=25] [key=value ...]")
    p.add_argument("args", nargs="*", help="from=RUN (a pretrain run), labels=PERCENT or a "
                   "count per class (default 100%%), then config key=value overrides")
    args = p.parse_intermixed_args(argv)

    def handle(args):
        from tfkarpa import config as config_lib
        from tfkarpa import contrastive, train
        from tfkarpa.errors import TfkarpaError

        options, overrides, words = _cli.verb_options(
            verb, args.args, {"from": "", "labels": "100%"}, allow_config=True)
        if words:
            raise TfkarpaError(f"unexpected argument(s): {' '.join(words)} (expected key=value)")
        if not options["from"]:
            raise TfkarpaError(f"{verb} needs from=RUN, a run made by `python -m pipelines pretrain`")
        config_lib.parse_label_budget(options["labels"])
        pre = config_lib.to_dict(contrastive.read_pretrain_run(options["from"]))
        base = {key: pre[key] for key in ("data", "model", "seed", "runs_root")}
        tag = options["labels"].replace("%", "pct")
        name = f"{Path(options['from']).name}-{verb}-{tag}"
        cfg = config_lib.build([], ["task=classify", f"backbone={options['from']}",
                                    f"data.labels={options['labels']}", f"name={name}",
                                    *defaults, *overrides], base=base)
        verbose = 0 if args.quiet else (1 if sys.stdout.isatty() else 2)
        return train.run(cfg, verbose=verbose)

    return _cli.run_verb(verb, args, handle)


def main(argv: list[str] | None = None) -> int:
    return transfer("finetune", SUMMARY, argv, [])


if __name__ == "__main__":
    raise SystemExit(main())
