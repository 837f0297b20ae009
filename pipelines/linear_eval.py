"""python -m pipelines linear-eval from=RUN [labels=100%] [key=value ...]: a linear head on
frozen features."""

from __future__ import annotations

from pipelines.finetune import LINEAR_DEFAULTS, transfer

SUMMARY = "train a linear classifier on a contrastive run's frozen encoder (linear evaluation)"


def main(argv: list[str] | None = None) -> int:
    return transfer("linear-eval", SUMMARY, argv, LINEAR_DEFAULTS)


if __name__ == "__main__":
    raise SystemExit(main())
