"""Multi-task evaluation: every head scored on a split, through any predictor, and its reports.

Classification heads get the classifier's figures (`classify.evaluate.classification_metrics`:
accuracy, per-class table in report.md, calibration, confusion matrix); regression heads the mean absolute
error, root mean squared error, R^2 and the MAE of always answering the training mean (the
baseline a useful head beats), with a predicted-against-true scatter plot. `score` is the mean
of the heads' accuracies and R^2, the figure that picked the best epoch. Written atomically to
`<out>/report.json`, `report.md`, `confusion_<head>.png` and `scatter_<head>.png`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfkarpa.core.report import png, pyplot
from tfkarpa.errors import TfkarpaError
from tfkarpa.runs import atomic_write_bytes, atomic_write_json, atomic_write_text, claim_output_dir
from tfkarpa.tasks.classify.evaluate import classification_metrics, confusion_matrix_png
from tfkarpa.tasks.classify.evaluate import report_markdown as classify_report
from tfkarpa.tasks.multitask import data as data_lib
from tfkarpa.tasks.multitask.data import Head

log = logging.getLogger(__name__)


def predict_split(predictor, split, heads: list[Head], batch_size: int = 256):
    """({head: predictions}, {head: truth as class ids or values}) over a whole split."""
    ds = data_lib.make_dataset(split, predictor.config, heads, training=False,
                               batch_size=batch_size)
    outs = {h.name: [] for h in heads}
    truth = {h.name: [] for h in heads}
    for images, y in ds:
        got = predictor.predict(tf.cast(images, tf.uint8).numpy())
        for h in heads:
            outs[h.name].append(got[h.name])
            y_h = y[h.name].numpy()
            truth[h.name].append(y_h.argmax(-1) if h.kind == "class" else y_h[:, 0])
    if not truth[heads[0].name]:
        raise TfkarpaError("the evaluation split is empty")
    return ({k: np.concatenate(v) for k, v in outs.items()},
            {k: np.concatenate(v) for k, v in truth.items()})


def value_metrics(truth: np.ndarray, guess: np.ndarray, head: Head) -> dict:
    error = guess - truth
    spread = np.sum((truth - truth.mean()) ** 2)
    return {"kind": "value", "examples": int(len(truth)),
            "mae": float(np.mean(np.abs(error))),
            "rmse": float(np.sqrt(np.mean(error ** 2))),
            "r2": float(1.0 - np.sum(error ** 2) / spread) if spread > 0 else float("nan"),
            "baseline_mae": float(np.mean(np.abs(truth - head.mean)))}


def head_score(metrics: dict) -> float:
    return metrics["accuracy"] if metrics["kind"] == "class" else metrics["r2"]


def scatter_png(truth: np.ndarray, guess: np.ndarray, head: str, title: str) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.scatter(truth, guess, s=6, alpha=0.5)
    low, high = float(min(truth.min(), guess.min())), float(max(truth.max(), guess.max()))
    ax.plot([low, high], [low, high], "k--", linewidth=1)
    ax.set_xlabel(f"true {head}")
    ax.set_ylabel(f"predicted {head}")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return png(fig)


def report_markdown(metrics: dict, title: str) -> str:
    lines = [f"# {title}", "", f"examples: {metrics['examples']}  ",
             f"score (mean of the heads' accuracy / R^2): {metrics['score']:.4f}  ", "",
             "| head | kind | accuracy / R^2 | macro F1 / MAE | ECE / RMSE |",
             "|---|---|---|---|---|"]
    for name, m in metrics["heads"].items():
        if m["kind"] == "class":
            lines.append(f"| {name} | {len(m['class_names'])} classes | {m['accuracy']:.4f} | "
                         f"{m['macro_avg']['f1-score']:.4f} | {m['ece']:.4f} |")
        else:
            lines.append(f"| {name} | value | {m['r2']:.4f} | {m['mae']:.4g} (mean guess "
                         f"{m['baseline_mae']:.4g}) | {m['rmse']:.4g} |")
    for name, m in metrics["heads"].items():  # each classification head's per-class table
        if m["kind"] == "class":
            lines += ["", "#" + classify_report(m, f"head {name}")]
    return "\n".join(lines) + "\n"


def check_heads(data_heads: list[Head], predictor) -> None:
    theirs = {h.name: h for h in data_heads}
    for h in predictor.heads:
        other = theirs.get(h.name)
        if other is None or other.kind != h.kind or other.classes != h.classes:
            raise TfkarpaError(
                f"the model at '{predictor.path}' has head '{h.name}' ({h.kind}"
                f"{': ' + ', '.join(h.classes[:5]) if h.classes else ''}) but the data "
                f"{'has no such head' if other is None else 'labels it differently'}; evaluate "
                "it on the data it was trained for")


def evaluate(predictor, split_name: str = "test", out_dir: str | Path | None = None,
             data=None, tensorboard_dir: str | Path | None = None, step: int = 0) -> dict:
    """Every head's metrics on a split of the predictor's data; reports into `out_dir`."""
    cfg = predictor.config
    data = data or data_lib.load(cfg, cfg.seed)
    check_heads(data.heads, predictor)
    heads = predictor.heads
    log.info("evaluating %s on the %s split of %s (heads %s)", predictor.path, split_name,
             data.source, ", ".join(h.name for h in heads))
    outs, truth = predict_split(predictor, data.split(split_name), heads)
    per_head = {}
    for h in heads:
        if h.kind == "class":
            per_head[h.name] = {"kind": "class", **classification_metrics(
                truth[h.name], outs[h.name], h.classes, cfg.top_k)}
        else:
            per_head[h.name] = value_metrics(truth[h.name], outs[h.name], h)
    metrics = {"split": split_name, "source": data.source, "artifact": str(predictor.path),
               "artifact_kind": predictor.kind, "examples": len(truth[heads[0].name]),
               "score": float(np.mean([head_score(m) for m in per_head.values()])),
               "heads": per_head}
    if out_dir is not None:
        _write(Path(out_dir), metrics, outs, truth, heads,
               f"{Path(predictor.path).name} on {data.source} / {split_name}")
    if tensorboard_dir is not None:
        writer = tf.summary.create_file_writer(str(tensorboard_dir))
        with writer.as_default():
            tf.summary.scalar(f"{split_name}/score", metrics["score"], step=step)
            for name, m in per_head.items():
                figure = "accuracy" if m["kind"] == "class" else "r2"
                tf.summary.scalar(f"{split_name}/{name}_{figure}", head_score(m), step=step)
        writer.close()
    return metrics


def _write(out: Path, metrics: dict, outs: dict, truth: dict, heads: list[Head], title: str):
    claim_output_dir(out, "evaluation", "evaluate out")
    for h in heads:
        m = metrics["heads"][h.name]
        if h.kind == "class":
            atomic_write_bytes(out / f"confusion_{h.name}.png", confusion_matrix_png(
                m["confusion_matrix"], h.classes, f"{h.name}: {title}"))
        else:
            atomic_write_bytes(out / f"scatter_{h.name}.png", scatter_png(
                truth[h.name], outs[h.name], h.name, f"{h.name}: {title}"))
    atomic_write_text(out / "report.md", report_markdown(metrics, title))
    atomic_write_json(out / "report.json", metrics)
