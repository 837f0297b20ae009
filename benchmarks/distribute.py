"""Cost of the strategy layer on this CPU: the same tfkarpa run under `strategy=default` and
under `strategy=mirrored devices=/cpu:0` (a one-replica MirroredStrategy: the distribution
machinery with nothing to gain from it). Rounds alternate, the first epoch of each run (tracing)
is dropped and the median epoch time of the rest kept. Also measured once each, for the record:
`mixed_precision=mixed_bfloat16` and `xla=true` under the default strategy.

    python benchmarks/distribute.py            # writes benchmarks/results/distribute.json
"""

from __future__ import annotations

import statistics
import tempfile

from _common import EpochTimer, write

from tfkarpa import config, tasks

IMAGES = 5120
EPOCHS = 4
ROUNDS = 3
VARIANTS = {
    "default": ["strategy=default"],
    "mirrored_1_device": ["strategy=mirrored", "devices=/cpu:0"],
}
ONCE = {
    "default_mixed_bfloat16": ["strategy=default", "mixed_precision=mixed_bfloat16"],
    "default_xla": ["strategy=default", "xla=true"],
}


def images_per_second(tmp: str, extra: list[str]) -> float:
    cfg = config.build(overrides=[
        "data=shapes", f"data.count={IMAGES}", "data.image_size=32", "data.augment=off",
        "data.val_fraction=0.05", "data.test_fraction=0.05", "model=resnet", "model.depth=20",
        f"epochs={EPOCHS}", "batch_size=128", "export=false", f"runs_root={tmp}", *extra])
    timer = EpochTimer()
    result = tasks.run(cfg, verbose=0, callbacks=[timer])
    n_train = IMAGES - 2 * int(IMAGES * 0.05)
    rate = n_train / statistics.median(timer.seconds[1:])
    print(f"{' '.join(extra)}: {rate:.0f} img/s (test accuracy "
          f"{result['metrics']['test_accuracy']:.3f})", flush=True)
    return rate


def main() -> None:
    rates = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(ROUNDS):
            for name, extra in VARIANTS.items():
                rates[name].append(images_per_second(f"{tmp}/{name}{r}", extra))
        once = {name: images_per_second(f"{tmp}/{name}", extra) for name, extra in ONCE.items()}
    default, mirrored = (statistics.median(rates[n]) for n in ("default", "mirrored_1_device"))
    result = {
        "model": "resnet20 v1, 32x32x3 shapes, global batch 128, fp32 unless named",
        "note": "median epoch time of epochs 2..N (epoch 1 traces); rounds alternate variants",
        "images_per_s": {name: [round(v, 1) for v in values] for name, values in rates.items()},
        "ratio_mirrored_1_device_over_default": round(mirrored / default, 3),
        "ratio_per_round": [round(m / d, 3) for m, d in zip(rates["mirrored_1_device"],
                                                             rates["default"])],
        "once_images_per_s": {name: round(v, 1) for name, v in once.items()},
        "ratio_bfloat16_over_fp32": round(once["default_mixed_bfloat16"] / default, 3),
        "ratio_xla_over_no_xla": round(once["default_xla"] / default, 3),
    }
    print(f"mirrored (1 device) / default = {result['ratio_mirrored_1_device_over_default']}, "
          f"bf16 / fp32 = {result['ratio_bfloat16_over_fp32']}, "
          f"xla / no xla = {result['ratio_xla_over_no_xla']}")
    write("distribute", result)


if __name__ == "__main__":
    main()
