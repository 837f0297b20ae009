"""python -m pipelines compress RUN [prune.sparsity=0.8] [cluster.clusters=16] [qat=true] ..."""

from __future__ import annotations

import sys

from pipelines import _cli

SUMMARY = "prune, cluster and/or quantization-aware-train a finished run (TF-MOT), one run per stage"


def main(argv: list[str] | None = None) -> int:
    p = _cli.parser("compress", SUMMARY, "RUN_DIR [prune.sparsity=0.8 | prune.structure=2:4] "
                    "[cluster.clusters=16] [qat=true] [epochs=N] [key=value ...]")
    p.add_argument("run", help="a finished run directory")
    p.add_argument("args", nargs="*", help="compression and fine-tuning key=value settings")
    args = p.parse_intermixed_args(argv)

    def handle(args):
        from tfkarpa.errors import TfkarpaError
        from tfkarpa.tasks.classify.compress import compress_run

        overrides, words = _cli.split_overrides(args.args)
        if words:
            raise TfkarpaError(f"unexpected argument(s): {' '.join(words)} (expected key=value)")
        verbose = 0 if args.quiet else (1 if sys.stdout.isatty() else 2)
        return compress_run(args.run, overrides, verbose=verbose)

    return _cli.run_verb("compress", args, handle)


if __name__ == "__main__":
    raise SystemExit(main())
