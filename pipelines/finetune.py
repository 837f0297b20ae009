"""python -m pipelines finetune from=RUN [labels=10%] [head=new|probe] [key=value ...]: the
whole encoder, from a new head or (head=probe) from a linear probe trained first."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipelines import _cli

log = logging.getLogger(__name__)

SUMMARY = "fine-tune a contrastive run's encoder with a classifier head on some of the labels"
# linear-eval: a linear head on fixed, standardised features; Adam, no decay. The images are
# augmented (flip and shift) as in SimCLR's linear evaluation: with 10% of the shapes labels it
# lifted the head from 82% to 87% in 60 epochs, 89% in 120 (benchmarks/results/
# contrastive_experiments.json, linear_eval_protocol).
LINEAR_DEFAULTS = ["freeze_backbone=true", "model.head_norm=true", "optimizer=adam",
                   "optimizer.lr=0.01", "optimizer.weight_decay=0", "data.augment=light"]
# What head=probe leaves to linear-eval's defaults in its first stage.
_PROBE_OWN = ("optimizer", "data.augment", "freeze_backbone", "model.head_norm")


def transfer(verb: str, summary: str, argv: list[str] | None, defaults: list[str]) -> int:
    """finetune and linear-eval: a classification run whose backbone is a pretraining run's
    encoder, on that run's data and model, with `labels=` of the training labels."""
    usage = "from=RUN [labels=10% | labels=25] [key=value ...]"
    options = {"from": "", "labels": "100%"}
    if verb == "finetune":
        usage = usage.replace(" [key", " [head=new|probe] [key")
        options["head"] = "new"
    p = _cli.parser(verb, summary, usage)
    p.add_argument("args", nargs="*", help="from=RUN (a pretrain run), labels=PERCENT or a "
                   "count per class (default 100%%), then config key=value overrides")
    args = p.parse_intermixed_args(argv)

    def handle(args):
        from tfkarpa import config as config_lib
        from tfkarpa import tasks
        from tfkarpa.errors import TfkarpaError

        opts, overrides, words = _cli.verb_options(verb, args.args, options, allow_config=True)
        if words:
            raise TfkarpaError(f"unexpected argument(s): {' '.join(words)} (expected key=value)")
        if not opts["from"]:
            raise TfkarpaError(f"{verb} needs from=RUN, a run made by `python -m pipelines pretrain`")
        if opts.get("head", "new") not in ("new", "probe"):
            raise TfkarpaError(f"{verb} option 'head' must be new or probe, got '{opts['head']}'")
        config_lib.parse_label_budget(opts["labels"])
        from tfkarpa.tasks.pretrain.task import read_pretrain_run

        pre = config_lib.to_dict(read_pretrain_run(opts["from"]))
        base = {key: pre[key] for key in ("data", "model", "seed", "runs_root")}
        tag = opts["labels"].replace("%", "pct")
        common = ["task=classify", f"backbone={opts['from']}", f"data.labels={opts['labels']}"]
        verbose = 0 if args.quiet else (1 if sys.stdout.isatty() else 2)
        if opts.get("head") != "probe":
            cfg = config_lib.build([], [*common, f"name={Path(opts['from']).name}-{verb}-{tag}",
                                        *defaults, *overrides], base=base)
            return tasks.run(cfg, verbose=verbose)
        return _probe_then_finetune(opts["from"], tag, common, overrides, base, verbose)

    return _cli.run_verb(verb, args, handle)


def _probe_then_finetune(pre_run: str, tag: str, common: list[str], overrides: list[str],
                         base: dict, verbose: int) -> dict:
    """LP-FT (Kumar et al. 2022): train a linear head on the frozen encoder first, then
    fine-tune the whole network from it, so that a random head's first gradients do not pull
    the encoder away from its features. (On the shapes benchmark it beats a new head at 1% of the
    labels on every seed and loses at 10%: benchmarks/results/contrastive.json.) The
    probe stage is a linear-eval run (its optimizer and augmentation; your other keys, such as
    epochs and batch_size, apply to both stages); a finished probe of the same command is
    reused."""
    from tfkarpa import config as config_lib
    from tfkarpa import runs, tasks

    stem = Path(pre_run).name
    own = [o for o in overrides if not o.split("=", 1)[0].startswith(_PROBE_OWN)]
    probe_cfg = config_lib.build([], [*common, f"name={stem}-linear-eval-{tag}", *LINEAR_DEFAULTS,
                                      *own, "export=false"], base=base)
    probe = runs.finished_twin(probe_cfg.runs_root, probe_cfg.name, config_lib.to_dict(probe_cfg))
    if probe:
        log.info("head=probe: %s is done already; fine-tuning from it", probe["run_dir"])
    else:
        log.info("head=probe, stage 1 of 2: a linear head on the frozen encoder")
        probe = tasks.run(probe_cfg, verbose=verbose)
    head = Path(probe["run_dir"]) / "checkpoints" / "final.weights.h5"
    log.info("head=probe, stage 2 of 2: fine-tune everything from %s", head)
    cfg = config_lib.build([], [*common, f"name={stem}-finetune-{tag}-lpft", *overrides,
                                "model.head_norm=true", f"model.weights={head}"], base=base)
    result = tasks.run(cfg, verbose=verbose)
    result["artifacts"]["probe_run"] = probe["run_dir"]
    result["metrics"]["probe_test_accuracy"] = probe["metrics"].get("test_accuracy")
    return result


def main(argv: list[str] | None = None) -> int:
    return transfer("finetune", SUMMARY, argv, [])


if __name__ == "__main__":
    raise SystemExit(main())
