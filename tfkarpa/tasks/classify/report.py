"""The classifier's sections of a run report: the test split's per-class table, confusion
matrix and calibration, from what `evaluate` wrote into the run's `eval/test/`."""

from __future__ import annotations

from pathlib import Path

from tfkarpa import runs
from tfkarpa.core.report import Figure, Heading, Table, Text


def _ensemble(run_dir: Path) -> list:
    ensemble = runs.read_json(run_dir / "manifest.json").get("ensemble")
    if not ensemble:
        return []
    rows = [[m["run"], m["model"], m["test_accuracy"]] for m in ensemble["members"]]
    return [Heading(3, "Ensemble"),
            Text(f"{len(rows)} members, combined by {ensemble['method']} (the member test "
                 "accuracies are each run's own, on the same test split)."),
            Table(["member run", "model", "test accuracy"], rows)]


def blocks(run_dir: Path, slug: str) -> list:
    report = runs.read_json(run_dir / "eval" / "test" / "report.json")
    if not report:
        return []
    out = [*_ensemble(run_dir), Heading(3, "Test results"),
              Text(f"{report['examples']} test images: accuracy {report['accuracy']:.4f}"
                   + (f", top-5 accuracy {report['top5_accuracy']:.4f}"
                      if report.get("top5_accuracy") is not None else "") + ".")]
    rows = [[name, m["precision"], m["recall"], m["f1-score"], int(m["support"])]
            for name, m in report["per_class"].items()]
    for avg in ("macro_avg", "weighted_avg"):
        if avg in report:
            m = report[avg]
            rows.append([avg.replace("_", " "), m["precision"], m["recall"], m["f1-score"],
                         int(m["support"])])
    out.append(Table(["class", "precision", "recall", "F1", "images"], rows))
    matrix = run_dir / "eval" / "test" / "confusion_matrix.png"
    if matrix.is_file():
        out.append(Figure(f"{slug}-confusion.png", matrix.read_bytes(),
                             "confusion matrix on the test split (rows: truth, columns: prediction)"))
    reliability = run_dir / "eval" / "test" / "reliability.png"
    if report.get("ece") is not None and reliability.is_file():
        out.append(Text(f"Calibration: expected calibration error {report['ece']:.4f} over "
                        f"{len(report['calibration']['bins'])} confidence bins; mean "
                        f"confidence {report['calibration']['mean_confidence']:.4f} against "
                        f"accuracy {report['accuracy']:.4f}."))
        out.append(Figure(f"{slug}-reliability.png", reliability.read_bytes(),
                          "reliability diagram on the test split: accuracy per confidence bin "
                          "(the dashed diagonal is perfect calibration)"))
    return out
