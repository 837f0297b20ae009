"""python -m pipelines linear-eval from=RUN [labels=100%] [key=value ...]: a linear head on
frozen features."""

from __future__ import annotations

from pipelines.finetune import transfer

SUMMARY = "train a linear classifier on a contrastive run's frozen encoder (linear evaluation)"
# A linear head on fixed, standardised features: Adam converges in few epochs; no decay, no
# augmentation.
DEFAULTS = ["freeze_backbone=true", "model.head_norm=true", "optimizer=adam", "optimizer.lr=0.01",
            "optimizer.weight_decay=0", "data.augment=off"]


def main(argv: list[str] | None = None) -> int:
    return transfer("linear-eval", SUMMARY, argv, DEFAULTS)


if __name__ == "__main__":
    raise SystemExit(main())
