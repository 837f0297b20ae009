"""A study's report: what was searched, the best trial (and the Pareto front), every trial, and
Optuna's own plots (history, parameter importances, parallel coordinates, intermediate values,
Pareto front), written as report.md and a self-contained report.html in the study folder with
the same blocks as run reports (`core.report`).
"""

from __future__ import annotations

import warnings

from tfkarpa.core import report as report_lib
from tfkarpa.core.report import Code, Figure, Heading, Table, Text


def write(study, optuna_study, summary: dict) -> dict:
    """report.md and report.html into the study folder; returns the paths written."""
    names = [o.name for o in study.objectives]
    title = f"tfkarpa search: {study.name}"
    best = summary["best"]
    blocks = [
        Heading(1, title),
        Text(f"Task {summary['task']}, {sum(summary['trials'].values())} trials "
             f"({', '.join(f'{v} {k}' for k, v in summary['trials'].items() if v)}), sampler "
             f"{summary['sampler']}, pruner {summary['pruner']}. Objectives: "
             + ", ".join(f"{o.name} ({o.direction})" for o in study.objectives)
             + ". Trials are chosen on the validation split; the test figure is reported, "
               "never used to choose."),
        Heading(2, "Search space"),
        Table(["key", "values"], [[k, v] for k, v in summary["space"].items()]),
        Heading(2, "Best trial" if len(names) == 1 else "Pareto front"),
        _trial_table(names, summary["pareto_front"] if len(names) > 1 else [best]),
        Text(f"`best.yaml` trains trial {best['number']} again: "
             f"`python -m pipelines train {study.folder / 'best.yaml'}`"),
        Heading(2, "Plots"),
        *_plots(study, optuna_study),
        Heading(2, "All trials"),
        _all_trials(study, optuna_study),
        Code((study.folder / "study.json").read_text(), "study.json: the recipe, space and "
             "objectives of this study"),
    ]
    return {k: v for k, v in report_lib.write_blocks(blocks, study.folder, title).items()
            if k.startswith("report_")}


def _trial_table(names: list[str], rows: list[dict]) -> Table:
    params = sorted({k for r in rows for k in r["params"]})
    test = sorted({k for r in rows for k in r["user_attrs"] if k.startswith("test_")})
    return Table(["trial", *names, *test, *params, "epochs", "seconds", "run"],
                 [[r["number"], *[r["values"].get(n) for n in names],
                   *[r["user_attrs"].get(k) for k in test], *[r["params"].get(k) for k in params],
                   r["user_attrs"].get("epochs_run"),
                   _seconds(r["user_attrs"].get("total_seconds")),
                   r["run_dir"]] for r in rows])


def _all_trials(study, optuna_study) -> Table:
    keys = [p.key for p in study.params]
    rows = []
    for t in optuna_study.get_trials(deepcopy=False):
        values = t.values or [None] * len(study.objectives)
        note = (f"pruned after epoch {t.user_attrs['pruned_at_epoch']}"
                if "pruned_at_epoch" in t.user_attrs else "")
        rows.append([t.number, t.state.name.lower(), *values, *[t.params.get(k) for k in keys],
                     _seconds(t.user_attrs.get("total_seconds")), note])
    return Table(["trial", "state", *[o.name for o in study.objectives], *keys, "seconds",
                  "note"], rows)


def _seconds(value):
    return None if value is None else f"{value:.1f}"


def _plots(study, optuna_study) -> list:
    """Optuna's matplotlib plots; a plot that does not apply yet (importances need two
    completed trials with different values) gets a line saying why instead."""
    from optuna.visualization import matplotlib as ovm

    multi = len(study.objectives) > 1
    first = study.objectives[0].name
    target = (lambda t: t.values[0]) if multi else None
    wanted = [("history", "optimization history", lambda: ovm.plot_optimization_history(
                  optuna_study, target=target, target_name=first)),
              ("importances", "parameter importances (fANOVA) for " + first,
               lambda: ovm.plot_param_importances(optuna_study, target=target, target_name=first)),
              ("parallel", "parallel coordinates", lambda: ovm.plot_parallel_coordinate(
                  optuna_study, target=target, target_name=first))]
    if multi:
        wanted.append(("pareto", "Pareto front", lambda: ovm.plot_pareto_front(
            optuna_study, target_names=[o.name for o in study.objectives])))
    else:
        wanted.append(("intermediate", "validation figure per epoch (pruned trials end early)",
                       lambda: ovm.plot_intermediate_values(optuna_study)))
    blocks, plt = [], report_lib.pyplot()
    for slug, caption, draw in wanted:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = draw()
            figure = getattr(axes, "figure", None) or plt.gcf()
            figure.set_size_inches(8, 4.5)
            figure.tight_layout()
            blocks.append(Figure(f"search-{slug}.png", report_lib.png(figure), caption))
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as err:
            plt.close("all")
            blocks.append(Text(f"{caption}: not drawn ({str(err).splitlines()[0][:160]})"))
    return blocks
