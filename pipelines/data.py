"""python -m pipelines data convert SOURCE out=DIR [shards=N] [data.KEY=VALUE ...]."""

from __future__ import annotations

from pipelines import _cli

SUMMARY = "data tools: `convert` writes any source as sharded TFRecords (read back as tfrecord:DIR)"
ACTIONS = ("convert",)


def main(argv: list[str] | None = None) -> int:
    p = _cli.parser("data", SUMMARY, "convert SOURCE out=DIR [shards=4] [seed=0] "
                    "[data.KEY=VALUE ...]")
    p.add_argument("action", choices=ACTIONS, help="convert: write SOURCE as TFRecord shards")
    p.add_argument("source", help="a data source: digits, shapes, folder:PATH, tfds:NAME, ...")
    p.add_argument("args", nargs="*", help="out=DIR (required), shards=N (per split), and "
                   "config keys that shape the source (data.count=..., data.val_fraction=..., "
                   "seed=...)")
    args = p.parse_intermixed_args(argv)

    def handle(args):
        import logging

        from tfkarpa import config as config_lib
        from tfkarpa.data import sources, tfrecord
        from tfkarpa.errors import TfkarpaError

        log = logging.getLogger("pipelines.data")
        options, overrides, words = _cli.verb_options(
            "data convert", args.args, {"out": "", "shards": "4"}, numbers=("shards",),
            allow_config=True)
        if words:
            raise TfkarpaError(f"unexpected argument(s): {' '.join(words)} (expected key=value)")
        if not options["out"]:
            raise TfkarpaError("data convert needs out=DIR (a new directory for the shards)")
        cfg = config_lib.build([], [f"data.source={args.source}", *overrides])
        data = sources.load(cfg.data, cfg.seed)
        schema = tfrecord.convert(data, options["out"], int(options["shards"]),
                                  progress=lambda line: log.info("convert %s", line))
        metrics = {f"{name}_examples": s["examples"] for name, s in schema["splits"].items()}
        metrics["shards_per_split"] = int(options["shards"])
        metrics["skipped_files"] = len(data.skipped)  # data.skip_bad=true: left out, counted
        lines = [f"  skipped    {item}" for item in data.skipped[:20]]
        if len(data.skipped) > 20:
            lines.append(f"  skipped    ... and {len(data.skipped) - 20} more")
        return {"run_dir": None, "metrics": metrics,
                "artifacts": {"tfrecords": options["out"],
                              "schema": f"{options['out']}/{tfrecord.SCHEMA_FILE}"},
                "lines": [*lines, f"  read it with data=tfrecord:{options['out']}"]}

    return _cli.run_verb("data", args, handle)


if __name__ == "__main__":
    raise SystemExit(main())
