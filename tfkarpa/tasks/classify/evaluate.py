"""Classification metrics and reports for any classifier predictor (run, SavedModel or TFLite).

Accuracy and top-k come from the predictions; the per-class precision/recall/F1/support table
is scikit-learn's `classification_report`, the form people already read, and the confusion
matrix is drawn with matplotlib into a PNG that also goes to TensorBoard. Calibration is the
expected calibration error (Guo et al. 2017: 15 equal-width confidence bins) with its
reliability diagram. Reports are written atomically to `<out>/report.json`, `report.md`,
`confusion_matrix.png` and `reliability.png`.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfkarpa.data import pipeline, sources
from tfkarpa.errors import TfkarpaError
from tfkarpa.tasks.classify.predict import Predictor
from tfkarpa.runs import atomic_write_bytes, atomic_write_json, atomic_write_text, claim_output_dir

log = logging.getLogger(__name__)


CALIBRATION_BINS = 15


def calibration(labels: np.ndarray, probs: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Expected calibration error and its bins: the top-1 confidence against the accuracy of
    the predictions made with it. Bin b holds confidences in (b/bins, (b+1)/bins] (the first
    also 0). Written here, not taken from a library: TF and scikit-learn have no ECE, and
    TensorFlow Probability would be a dependency for ten lines."""
    labels = np.asarray(labels)
    confidence = probs.max(-1).astype(np.float64)
    correct = probs.argmax(-1) == labels
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        row = {"low": b / bins, "high": (b + 1) / bins, "count": count,
               "confidence": None, "accuracy": None}
        if count:
            row["confidence"] = float(confidence[inside].mean())
            row["accuracy"] = float(correct[inside].mean())
            ece += count / len(labels) * abs(row["accuracy"] - row["confidence"])
        rows.append(row)
    return {"ece": float(ece), "mean_confidence": float(confidence.mean()), "bins": rows}


def classification_metrics(labels: np.ndarray, probs: np.ndarray, class_names: list[str],
                           top_k: int = 5) -> dict:
    from sklearn.metrics import classification_report, confusion_matrix

    labels = np.asarray(labels)
    preds = probs.argmax(-1)
    k = max(1, min(top_k, len(class_names) - 1))
    top = np.argsort(-probs, axis=-1)[:, :k]
    ids = list(range(len(class_names)))
    report = classification_report(labels, preds, labels=ids, target_names=class_names,
                                   output_dict=True, zero_division=0)
    calibrated = calibration(labels, probs)
    return {
        "examples": int(len(labels)),
        "accuracy": float(np.mean(preds == labels)),
        f"top{k}_accuracy": float(np.mean(np.any(top == labels[:, None], axis=-1))),
        "ece": calibrated["ece"],
        "calibration": calibrated,
        "per_class": {name: report[name] for name in class_names},
        "macro_avg": report["macro avg"],
        "weighted_avg": report["weighted avg"],
        "confusion_matrix": confusion_matrix(labels, preds, labels=ids).tolist(),
        "class_names": list(class_names),
    }


def report_markdown(metrics: dict, title: str) -> str:
    names = metrics["class_names"]
    width = max(12, *(len(n) for n in names))
    lines = [f"# {title}", "", f"examples: {metrics['examples']}  ",
             f"accuracy: {metrics['accuracy']:.4f}  "]
    lines += [f"{k}: {v:.4f}  " for k, v in metrics.items() if k.startswith("top")]
    if "robust" in metrics:
        r = metrics["robust"]
        lines += [f"robust accuracy under {r['attack']} (eps {r['eps']}, {r['steps']} step(s)"
                  f"{', transferred from the Keras model' if r['transfer'] else ''}): "
                  f"{r['accuracy']:.4f}  "]
    if "ece" in metrics:
        lines += [f"expected calibration error ({len(metrics['calibration']['bins'])} bins): "
                  f"{metrics['ece']:.4f} (mean confidence "
                  f"{metrics['calibration']['mean_confidence']:.4f})  "]
    lines += ["", "```", f"{'':>{width}}  precision    recall  f1-score   support", ""]
    for name in names:
        row = metrics["per_class"][name]
        lines.append(f"{name:>{width}}  {row['precision']:9.4f} {row['recall']:9.4f} "
                     f"{row['f1-score']:9.4f} {int(row['support']):9d}")
    lines.append("")
    for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        row = metrics[key]
        lines.append(f"{label:>{width}}  {row['precision']:9.4f} {row['recall']:9.4f} "
                     f"{row['f1-score']:9.4f} {int(row['support']):9d}")
    lines.append("```")
    return "\n".join(lines) + "\n"


def confusion_matrix_png(matrix, class_names: list[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    n = len(class_names)
    size = min(16, max(4, 0.5 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    row_sums = matrix.sum(1, keepdims=True)
    share = np.divide(matrix, row_sums, out=np.zeros(matrix.shape, float), where=row_sums > 0)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def reliability_png(calibrated: dict, title: str) -> bytes:
    """The reliability diagram: accuracy per confidence bin against the diagonal of perfect
    calibration, with the share of predictions in each bin below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = calibrated["bins"]
    total = max(1, sum(r["count"] for r in rows))
    width = rows[0]["high"] - rows[0]["low"]
    full = [r for r in rows if r["count"]]  # empty bins draw nothing
    low = np.array([r["low"] for r in full])
    accuracy = np.array([r["accuracy"] for r in full])
    confidence = np.array([r["confidence"] for r in full])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), dpi=100, sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    top.bar(low, accuracy, width=width, align="edge", color="#4c72b0", edgecolor="white",
            label="accuracy")
    top.bar(low, confidence - accuracy, bottom=accuracy, width=width, align="edge",
            color="#dd8452", alpha=0.5, edgecolor="white", label="gap to confidence")
    top.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"{title}\nECE {calibrated['ece']:.4f}", fontsize=9)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(low, [r["count"] / total for r in full], width=width, align="edge",
               color="gray", edgecolor="white")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("share")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def predict_split(predictor: Predictor, split: sources.Split, num_classes: int,
                  batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels for a whole split, through the predictor's own runtime."""
    cfg = predictor.config
    ds = pipeline.make_dataset(split, cfg, num_classes, training=False, batch_size=batch_size,
                               one_hot=False)
    probs, labels = [], []
    for images, y in ds:
        probs.append(predictor.predict(tf.cast(images, tf.uint8)))
        labels.append(y.numpy())
    if not probs:
        raise TfkarpaError("the evaluation split is empty")
    return np.concatenate(probs), np.concatenate(labels)


def robust_metrics(predictor: Predictor, source: tf.keras.Model, split: sources.Split,
                   num_classes: int, attack: dict, labels: np.ndarray,
                   batch_size: int = 128) -> dict:
    from tfkarpa.tasks.classify import adversarial

    log.info("attacking %s with %s (eps %s, %d step(s)) made on %s", predictor.path,
             attack["attack"], attack["eps"], attack["steps"],
             "its Keras model" if source is predictor.model else "the run it came from")
    ds = pipeline.make_dataset(split, predictor.config, num_classes, training=False,
                               batch_size=batch_size, one_hot=False)
    probs = adversarial.attacked_predictions(predictor, source, ds, num_classes, attack,
                                             batch_size)
    return {"attack": attack["attack"], "eps": attack["eps"], "steps": attack["steps"],
            "transfer": source is not predictor.model,
            "accuracy": float(np.mean(probs.argmax(-1) == labels))}


def evaluate(predictor: Predictor, split_name: str = "test", out_dir: str | Path | None = None,
             data: sources.SourceData | None = None, top_k: int | None = None,
             tensorboard_dir: str | Path | None = None, step: int = 0,
             attack: dict | None = None, source: tf.keras.Model | None = None) -> dict:
    """Evaluate on a split of the data the predictor was trained on; write the reports.
    `attack` (`adversarial.parse_attack`) adds the accuracy under that attack, made on the
    Keras model `source`."""
    cfg = predictor.config
    if split_name not in (*sources.SPLITS, "all"):
        raise TfkarpaError(f"split '{split_name}' is not one of {', '.join(sources.SPLITS)}, all")
    data = data or sources.load(cfg.data, cfg.seed)
    if data.num_classes != len(predictor.class_names):
        raise TfkarpaError(
            f"{data.source} has {data.num_classes} classes but the model at '{predictor.path}' "
            f"predicts {len(predictor.class_names)}"
        )
    if list(data.class_names) != list(predictor.class_names):
        raise TfkarpaError(
            f"{data.source} names its classes {', '.join(data.class_names[:5])}... but the model "
            f"at '{predictor.path}' predicts {', '.join(predictor.class_names[:5])}...; "
            "evaluate it on the data it was trained for"
        )
    log.info("evaluating %s on the %s split of %s", predictor.path, split_name, data.source)
    probs, labels = predict_split(predictor, data.split(split_name), data.num_classes)
    metrics = classification_metrics(labels, probs, predictor.class_names, top_k or cfg.top_k)
    metrics.update({"split": split_name, "source": data.source, "artifact": str(predictor.path),
                    "artifact_kind": predictor.kind})
    if attack:
        metrics["robust"] = robust_metrics(predictor, source, data.split(split_name),
                                           data.num_classes, attack, labels)
    if out_dir is not None:
        out = claim_output_dir(Path(out_dir), "evaluation", "evaluate out")
        title = f"{Path(predictor.path).name} on {data.source} / {split_name}"
        png = confusion_matrix_png(metrics["confusion_matrix"], predictor.class_names, title)
        atomic_write_bytes(out / "confusion_matrix.png", png)
        atomic_write_bytes(out / "reliability.png", reliability_png(metrics["calibration"], title))
        atomic_write_text(out / "report.md", report_markdown(metrics, title))
        atomic_write_json(out / "report.json", metrics)
        if tensorboard_dir is not None:
            writer = tf.summary.create_file_writer(str(tensorboard_dir))
            with writer.as_default():
                tf.summary.image(f"confusion_matrix/{split_name}",
                                 tf.image.decode_png(png, channels=4)[None], step=step)
                tf.summary.scalar(f"{split_name}/accuracy", metrics["accuracy"], step=step)
                tf.summary.scalar(f"{split_name}/ece", metrics["ece"], step=step)
                if "robust" in metrics:
                    tf.summary.scalar(f"{split_name}/robust_accuracy_{metrics['robust']['attack']}",
                                      metrics["robust"]["accuracy"], step=step)
            writer.close()
    return metrics
