"""python -m pipelines report RUN... [out=DIR]: report.md and a self-contained report.html."""

from __future__ import annotations

from pipelines import _cli

SUMMARY = ("write report.md and a self-contained report.html for one or more runs: config, data, "
           "training curves, test results, compression trade-off, export parity")


def main(argv: list[str] | None = None) -> int:
    p = _cli.parser("report", SUMMARY, "RUN_DIR... [out=DIR] | STUDY_DIR", with_keys=False)
    p.add_argument("targets", nargs="+", help="run directories; out=DIR to write elsewhere than "
                   "into the first run; or a search's study folder")
    args = p.parse_intermixed_args(argv)

    def handle(args):
        from tfkarpa import tasks

        options, _, run_dirs = _cli.verb_options("report", args.targets, {"out": ""})
        if len(run_dirs) == 1 and not options["out"]:
            from tfkarpa.tasks import search

            if search.is_study(run_dirs[0]):  # a search's folder: its own report, from its db
                return search.refresh(run_dirs[0])
        written = tasks.report(run_dirs, options["out"] or None)
        return {"run_dir": run_dirs[0],
                "artifacts": {"report_md": written["report_md"],
                              "report_html": written["report_html"]},
                "metrics": {"runs": len(run_dirs), "figures": written["figures"],
                            "tables": written["tables"]}}

    return _cli.run_verb("report", args, handle)


if __name__ == "__main__":
    raise SystemExit(main())
