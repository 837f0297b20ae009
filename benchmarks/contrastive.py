"""Does SimCLR pretraining make scarce labels go further? Measured on the embedded shapes set.

For each seed: pretrain the small CNN's encoder with SimCLR on every training image (labels
unused; the `shapes_simclr` recipe), then with 1% and 10% of the training labels (chosen per
class from the seed): fine-tune the whole encoder from a new head (`finetune`), train a linear
head on the frozen encoder (`linear-eval`), fine-tune from that linear head (LP-FT, `finetune
head=probe`), and, as the baseline, train the same network from scratch on the same labelled
images for the same epochs with the same optimizer. Reported: test accuracies (mean and spread
over seeds), the gain of each fine-tuning over scratch, linear probe against fine-tuning, the
kNN-accuracy curve of pretraining and the wall time of every step on this machine.

    python benchmarks/contrastive.py                 # writes benchmarks/results/contrastive.json
    python benchmarks/contrastive.py --quick         # one seed, short, nothing written
    python benchmarks/contrastive.py --seed 1        # one seed: results/contrastive_seeds/seed-1.json
    python benchmarks/contrastive.py --combine       # contrastive.json from the three seed files
    python benchmarks/contrastive.py --seed 1 --runs DIR   # keep the runs; reuse a pretraining

A seed at a long pretraining outlasts a working session on this CPU, hence --seed and --combine:
the seeds run one at a time, in separate processes or sessions, and are then summarised together.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

from _common import RESULTS, write

from pipelines.finetune import LINEAR_DEFAULTS
from tfkarpa import config, runs, tasks
RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "recipes" / "shapes_simclr.yaml"
PARTS = RESULTS / "contrastive_seeds"  # one file per seed, from --seed
SEEDS = (0, 1, 2)
BUDGETS = ("1%", "10%")
COUNT = 3000  # 2,400 training images: 1% of the labels is 4 images per class
# Pretraining length and the linear head's augmentation (LINEAR) are the levers measured to
# close the linear probe's gap to fine-tuning (10% of the labels, 3 seeds: 22 points after 45
# epochs, 16 after 90, 8.7 after 180 without augmenting the head); a 2x wider encoder, right-angle
# turns or zooming out of the views, other temperatures and max pooling were not (one seed each,
# results/contrastive_experiments.json). At 180 epochs a seed takes 40-45 minutes here: run the
# seeds with --seed, then --combine.
PRETRAIN_EPOCHS = 180
# This CPU has AVX512-BF16: bfloat16 pretraining took 268 s against 434 s in float32 (30 epochs,
# seed 0) with the same test kNN (0.71), so the benchmark pretrains in bfloat16. The recipe
# stays float32: on CPUs without bfloat16 units it is much slower.
PRETRAIN = ["mixed_precision=mixed_bfloat16"]
TRANSFER_EPOCHS = 60
# Transfer runs share one optimizer (from scratch too): batch 16 so that 1% of the labels
# (24 images) still makes two steps an epoch.
TRANSFER = ["batch_size=16", "optimizer=sgd", "optimizer.lr=0.02", "optimizer.weight_decay=5e-4",
            "export=false"]
# Linear evaluation as `linear-eval` runs it (its defaults: the frozen encoder sees flipped and
# shifted images, as in SimCLR's paper), with a longer head: on the 90-epoch encoder of seed 0
# (10% of the labels, results/contrastive_experiments.json) validation accuracy went from 0.82
# without augmentation to 0.89 (60 epochs) and 0.93 (120); 240 epochs added nothing on
# validation, RandAugment was worse.
LINEAR = ["batch_size=16", *LINEAR_DEFAULTS, "export=false"]
LINEAR_EPOCHS = 120
FULL = {"pretrain": PRETRAIN_EPOCHS, "transfer": TRANSFER_EPOCHS, "linear": LINEAR_EPOCHS}
QUICK = {"pretrain": 10, "transfer": 20, "linear": 40}


def recipe_summary() -> str:
    """The pretraining settings as the recipe holds them (the JSON then says what ran)."""
    cfg = config.build([RECIPE])
    o, c = cfg.optimizer, cfg.contrastive
    return (f"{o.name} lr {o.lr} (warm-up {o.warmup_epochs}, {o.schedule}), "
            f"batch {cfg.batch_size}, temperature {c.temperature}, crop_min {c.crop_min}, "
            f"colour strength {c.strength}, grayscale {c.gray_prob}")


def timed(cfg: config.Config) -> tuple[dict, float]:
    start = time.time()
    result = tasks.run(cfg, verbose=0)
    return result, time.time() - start


def one_seed(seed: int, root: str, epochs: dict) -> dict:
    common = [f"seed={seed}", f"runs_root={root}"]
    pre_cfg = config.build([RECIPE], [*common, "task=pretrain", f"data.count={COUNT}",
                                      f"epochs={epochs['pretrain']}", *PRETRAIN,
                                      f"name=simclr-{seed}"])
    # A finished pretraining of exactly this config under --runs is reused (the transfer runs
    # are not): its wall time is the one it recorded when it ran.
    pre = runs.finished_twin(root, pre_cfg.name, config.to_dict(pre_cfg))
    reused = pre is not None
    if reused:
        pre_seconds = pre["metrics"]["total_seconds"]
        print(f"seed {seed}: reusing the finished pretraining {pre['run_dir']}", flush=True)
    else:
        pre, pre_seconds = timed(pre_cfg)
    history = json.loads((Path(pre["run_dir"]) / "metrics.json").read_text())["history"]
    print(f"seed {seed}: pretrained in {pre_seconds:.0f}s, kNN {history['knn_accuracy']}",
          flush=True)
    out = {"pretrain_seconds": round(pre_seconds, 1), "pretrain_reused": reused,
           "pretrain_knn_accuracy_by_epoch": [round(v, 4) for v in history["knn_accuracy"]],
           "pretrain_linear_probe_by_epoch": [round(v, 4) for v in
                                              history["linear_probe_accuracy"]],
           "pretrain_test_knn_accuracy": pre["metrics"]["test_knn_accuracy"],
           "pretrain_test_linear_probe_accuracy": pre["metrics"]["test_linear_probe_accuracy"]}
    base = ["data=shapes", f"data.count={COUNT}", "data.image_size=32", "model=small_cnn",
            f"epochs={epochs['transfer']}", *common]
    backbone = f"backbone={pre['run_dir']}"

    def transfer(kind: str, budget: str, overrides: list[str]) -> dict:
        tag = budget.replace("%", "pct")
        result, seconds = timed(config.build([], [*overrides, f"data.labels={budget}",
                                                  f"name={kind}-{tag}-{seed}"]))
        out[f"{kind}_{tag}_test_accuracy"] = result["metrics"]["test_accuracy"]
        out[f"{kind}_{tag}_seconds"] = round(seconds, 1)
        print(f"seed {seed} {budget} {kind}: {result['metrics']['test_accuracy']:.4f} "
              f"({seconds:.0f}s)", flush=True)
        return result

    for budget in BUDGETS:
        transfer("finetune", budget, [*base, *TRANSFER, backbone])
        linear = transfer("linear", budget,
                          [*base, *LINEAR, f"epochs={epochs['linear']}", backbone])
        # LP-FT, as `finetune head=probe` runs it: from the head the linear run trained
        transfer("lpft", budget, [*base, *TRANSFER, backbone, "model.head_norm=true",
                                  f"model.weights={linear['artifacts']['final_weights']}"])
        transfer("scratch", budget, [*base, *TRANSFER])
    return out


def summarize(per_seed: list[dict]) -> dict:
    def stats(key):
        values = [s[key] for s in per_seed]
        return {"mean": round(statistics.mean(values), 4),
                "stdev": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
                "values": [round(v, 4) for v in values]}

    summary = {}
    for budget in BUDGETS:
        tag = budget.replace("%", "pct")
        for kind in ("finetune", "linear", "lpft", "scratch"):
            summary[f"{kind}_{tag}_test_accuracy"] = stats(f"{kind}_{tag}_test_accuracy")
        for s in per_seed:
            for kind in ("finetune", "lpft"):
                s[f"gain_{kind}_over_scratch_{tag}_points"] = 100 * (
                    s[f"{kind}_{tag}_test_accuracy"] - s[f"scratch_{tag}_test_accuracy"])
                s[f"{kind}_minus_linear_{tag}_points"] = 100 * (
                    s[f"{kind}_{tag}_test_accuracy"] - s[f"linear_{tag}_test_accuracy"])
        for kind in ("finetune", "lpft"):
            summary[f"gain_{kind}_over_scratch_{tag}_points"] = stats(
                f"gain_{kind}_over_scratch_{tag}_points")
            summary[f"{kind}_minus_linear_{tag}_points"] = stats(f"{kind}_minus_linear_{tag}_points")
    summary["pretrain_seconds"] = stats("pretrain_seconds")
    return summary


def setup(epochs: dict) -> dict:
    return {"data": f"shapes, {COUNT} images at 32x32 (80/10/10 train/val/test), "
                    "generated from each seed",
            "encoder": "small_cnn",
            "pretrain": (f"recipe shapes_simclr for {epochs['pretrain']} epochs: "
                         f"{recipe_summary()}; overrides: {' '.join(PRETRAIN)}"),
            "transfer": f"{epochs['transfer']} epochs; finetune/scratch: {' '.join(TRANSFER)}; "
                        f"linear: {' '.join(LINEAR)} epochs={epochs['linear']}; lpft: "
                        "finetune's settings from the linear run's weights (model.head_norm=true)"}


def seed_wall(part: dict) -> float:
    """A seed file's wall time, with the pretraining it reused (--runs) from an earlier run."""
    run = part["per_seed"][0]
    return part["wall_seconds"] + (run["pretrain_seconds"] if run.get("pretrain_reused") else 0)


def combine(note: str = "") -> None:
    """contrastive.json from one file per seed, each checked to have run the current settings;
    `note` says how the seeds ran, when that matters to their times."""
    expected = setup(FULL)
    parts = []
    for seed in SEEDS:
        path = PARTS / f"seed-{seed}.json"
        if not path.exists():
            raise SystemExit(f"{path}: missing; run `python benchmarks/contrastive.py --seed {seed}`")
        part = json.loads(path.read_text())
        ran = {k: v for k, v in part["setup"].items() if k != "seeds"}
        if ran != expected:
            changed = sorted(k for k in expected if ran.get(k) != expected[k])
            raise SystemExit(f"{path}: ran other settings than the benchmark's now ({changed}); "
                             "run that seed again")
        parts.append(part)
    per_seed = [p["per_seed"][0] for p in parts]
    summary = report(per_seed)
    write("contrastive", {
        "setup": {**expected, "seeds": list(SEEDS),
                  "runs": "one process per seed (--seed), combined with --combine"},
        "summary": summary,
        "per_seed": per_seed,
        "machine_per_seed": [p["machine"] for p in parts],
        "wall_seconds": round(sum(seed_wall(p) for p in parts), 1),
        **({"note": note} if note else {}),
    })


def report(per_seed: list[dict]) -> dict:
    summary = summarize(per_seed)
    for key, value in summary.items():
        print(f"{key}: {value['mean']} +- {value['stdev']}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one seed, short, nothing written")
    parser.add_argument("--seed", type=int, choices=SEEDS,
                        help="run this seed only, written to results/contrastive_seeds/")
    parser.add_argument("--combine", action="store_true",
                        help="write contrastive.json from the per-seed files")
    parser.add_argument("--note", default="", help="with --combine: how the seeds ran")
    parser.add_argument("--runs", metavar="DIR",
                        help="keep the runs in DIR (default: a temporary folder) and reuse a "
                             "finished pretraining found there with the same settings")
    args = parser.parse_args()
    if args.combine:
        return combine(args.note)
    seeds = SEEDS[:1] if args.quick else (args.seed,) if args.seed is not None else SEEDS
    epochs = QUICK if args.quick else FULL
    started = time.time()
    with contextlib.ExitStack() as stack:
        root = args.runs or stack.enter_context(tempfile.TemporaryDirectory())
        per_seed = [one_seed(s, root, epochs) for s in seeds]
    summary = report(per_seed)
    if args.quick:
        return
    if args.seed is not None:
        PARTS.mkdir(parents=True, exist_ok=True)
    write("contrastive" if args.seed is None else f"{PARTS.name}/seed-{args.seed}", {
        "setup": {**setup(epochs), "seeds": list(seeds)},
        "summary": summary,
        "per_seed": per_seed,
        "wall_seconds": round(time.time() - started, 1),
    })


if __name__ == "__main__":
    main()
