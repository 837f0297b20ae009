"""Run reports: `report.md` and a self-contained `report.html` for one run or several.

Everything comes from what runs already wrote: `config.yaml`, `manifest.json`, `metrics.json`
(with the per-epoch history), `samples.png`, `eval/test/`, `benchmark/benchmark.json`,
`compression.json` and `exports.json`. Nothing is re-run, so a report takes seconds and works on
runs whose data set is gone. Each section appears where its source exists.

A report is a list of blocks (headings, text, tables, figures, code) rendered twice: Markdown
with the figures as PNG files in `report_files/`, and HTML with the same PNGs embedded as data
URIs, so the HTML file can be mailed or attached on its own. Plots are matplotlib PNGs.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
import shlex
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import yaml

from tfkarpa import runs
from tfkarpa.errors import TfkarpaError

FILES = "report_files"


# ------------------------------------------------------------------------------ the blocks

@dataclasses.dataclass
class Heading:
    level: int
    text: str


@dataclasses.dataclass
class Text:
    text: str


@dataclasses.dataclass
class Table:
    header: list[str]
    rows: list[list]


@dataclasses.dataclass
class Figure:
    name: str  # file name in report_files/
    png: bytes
    caption: str


@dataclasses.dataclass
class Code:
    text: str
    summary: str = ""  # HTML: folded under this line until clicked


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def to_markdown(blocks: list) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Text):
            out.append(b.text)
        elif isinstance(b, Table):
            out.append("| " + " | ".join(b.header) + " |")
            out.append("|" + "---|" * len(b.header))
            out += ["| " + " | ".join(_cell(v).replace("|", "\\|") for v in row) + " |"
                    for row in b.rows]
        elif isinstance(b, Figure):
            out.append(f"![{b.caption}]({FILES}/{b.name})  \n*{b.caption}*")
        elif isinstance(b, Code):
            out.append(f"```\n{b.text.rstrip()}\n```")
        out.append("")
    return "\n".join(out)


STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #1d2430; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { margin-top: 2.2em; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; margin: .8em 0; font-size: 14px; }
th, td { border: 1px solid #d0d7de; padding: 3px 10px; text-align: right; }
th { background: #f3f5f7; }
td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #e4e8ec; }
figcaption { color: #57606a; font-size: 13px; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: 13px; }
"""


def to_html(blocks: list, title: str) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Text):
            for para in b.text.split("\n\n"):
                text = html.escape(para.replace("  \n", "\n")).replace("\n", "<br>")
                out.append(f"<p>{text}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row)
                           + "</tr>" for row in b.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Figure):
            data = base64.b64encode(b.png).decode()
            out.append(f'<figure><img alt="{html.escape(b.caption)}" '
                       f'src="data:image/png;base64,{data}">'
                       f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
        elif isinstance(b, Code):
            pre = f"<pre>{html.escape(b.text)}</pre>"
            out.append(f"<details><summary>{html.escape(b.summary)}</summary>{pre}</details>"
                       if b.summary else pre)
    out.append("</body></html>")
    return "\n".join(out)


# ----------------------------------------------------------------------------------- plots

def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    pyplot().close(fig)
    return buf.getvalue()


def _panel_of(key: str) -> str:
    base = key[4:] if key.startswith("val_") else key
    if base == "learning_rate":
        return "learning rate"
    if "loss" in base:
        return "loss"
    if "map" in base:
        return "mAP (validation, COCO)"
    if base.endswith("accuracy"):
        return "accuracy"
    return "other"


def history_of(run_dir: Path, fallback: dict) -> dict[str, tuple[list, list]]:
    """Per key, (epochs, values) from history.csv: figures logged only on some epochs (COCO
    mAP, SimCLR monitors) keep their own epochs. Falls back to metrics.json's history."""
    import csv

    try:
        with open(run_dir / "history.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        rows = []
    if not rows:
        return {k: (list(range(1, len(v) + 1)), v) for k, v in fallback.items()}
    by_epoch = {int(r["epoch"]): r for r in rows if (r.get("epoch") or "").isdigit()}
    out: dict[str, tuple[list, list]] = {}
    for epoch in sorted(by_epoch):  # a resumed run repeats an epoch: its last row wins
        for key, text in by_epoch[epoch].items():
            if key == "epoch" or text in (None, "", "NA"):
                continue
            try:
                value = float(text)
            except ValueError:
                continue
            xs, ys = out.setdefault(key, ([], []))
            xs.append(epoch + 1)
            ys.append(value)
    return out


def curves_png(history: dict[str, tuple[list, list]]) -> bytes | None:
    """One panel per kind of figure (loss, accuracy, mAP, learning rate, other), training solid
    and validation dashed, against the epoch."""
    panels: dict[str, list[str]] = {}
    for key, (xs, ys) in history.items():
        if ys:
            panels.setdefault(_panel_of(key), []).append(key)
    if not panels:
        return None
    order = ["loss", "accuracy", "mAP (validation, COCO)", "learning rate", "other"]
    names = [p for p in order if p in panels]
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), dpi=100, squeeze=False)
    for ax, name in zip(axes.flat, names):
        for key in sorted(panels[name]):
            xs, ys = history[key]
            ax.plot(xs, ys, marker="o", markersize=3,
                    linestyle="--" if key.startswith("val_") else "-", label=key)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        low = min(min(history[k][1]) for k in panels[name])
        high = max(max(history[k][1]) for k in panels[name])
        if name == "loss" and low > 0 and high > 20 * low:
            ax.set_yscale("log")  # losses that fall by orders of magnitude
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return png(fig)


def tradeoff_png(rows: list[dict]) -> bytes:
    """Accuracy against gzip size and against batch-1 latency, one marker per artifact."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4), dpi=100)
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(rows):
        style = {"color": cmap(i % 10), "s": 55, "label": r["artifact"],
                 "marker": "o" if r["kind"] == "tflite" else "s"}
        left.scatter(r["gzip_bytes"] / 1024, 100 * r["accuracy"], **style)
        latency = r.get("latency_2t") or r.get("latency_tf")
        if latency:
            right.scatter(latency["p50_ms"], 100 * r["accuracy"], **style)
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    left.set_xscale("log")
    left.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    left.xaxis.set_major_formatter(ScalarFormatter())
    left.xaxis.set_minor_formatter(NullFormatter())  # minor labels crowd a narrow decade
    left.set_xlabel("gzip size (KB, log scale)")
    right.set_xlabel("batch-1 latency p50 (ms; TFLite 2 threads, TF default threads)")
    for ax in (left, right):
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
    right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.suptitle("compression trade-off (circles: TFLite, squares: TensorFlow)")
    fig.tight_layout()
    return png(fig)


def gallery_png(paths: list[Path]) -> bytes:
    from PIL import Image

    plt = pyplot()
    cols = min(4, len(paths))
    rows = math.ceil(len(paths) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), dpi=100, squeeze=False)
    for ax, path in zip(axes.flat, paths):
        ax.imshow(np.asarray(Image.open(path).convert("RGB")))
        ax.set_title(path.name, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return png(fig)


def class_counts_png(counts: dict[str, dict[str, int]], what: str) -> bytes:
    """Grouped bars: per class, one bar per split."""
    plt = pyplot()
    splits = list(counts)
    classes = list(next(iter(counts.values())))
    x = np.arange(len(classes))
    width = 0.8 / max(1, len(splits))
    fig, ax = plt.subplots(figsize=(max(5, 0.55 * len(classes) + 2), 3.2), dpi=100)
    for i, split in enumerate(splits):
        ax.bar(x + i * width, [counts[split].get(c, 0) for c in classes], width, label=split)
    ax.set_xticks(x + width * (len(splits) - 1) / 2, classes, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(what)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return png(fig)


# --------------------------------------------------------------------------- run sections

def _flat(prefix: str, value, into: list) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, into)
    elif isinstance(value, (int, float, str, bool)) or value is None:
        into.append([prefix, value])


def _data_blocks(run_dir: Path, manifest: dict, cfg: dict, slug: str) -> list:
    data = manifest.get("data", {})
    blocks = [Heading(3, "Data")]
    examples = data.get("examples", {})
    size = cfg.get("data", {}).get("image_size")
    line = (f"Source `{data.get('source', cfg.get('data', {}).get('source'))}`, "
            f"{len(data.get('classes', []))} classes, model input {size}x{size} pixels. "
            + ", ".join(f"{n} {k}" for k, n in examples.items()) + " images.")
    sizes = data.get("image_sizes")
    if sizes and sizes["distinct"] == 1:
        line += f" Source images: all {sizes['smallest']} pixels."
    elif sizes:
        line += (f" Source images: {sizes['smallest']} to {sizes['largest']} pixels (median "
                 f"{sizes['median']}, {sizes['distinct']} distinct sizes).")
    if data.get("skipped"):
        line += f" {len(data['skipped'])} bad item(s) left out (data.skip_bad), listed in manifest.json."
    blocks.append(Text(line))
    counts, what = data.get("class_counts") or {}, "images"
    if data.get("boxes"):
        counts, what = data["boxes"], "objects"
    if counts:
        splits = list(counts)
        classes = list(next(iter(counts.values())))
        blocks.append(Table(["class", *[f"{s} {what}" for s in splits]],
                            [[c, *[counts[s].get(c, 0) for s in splits]] for c in classes]))
        blocks.append(Figure(f"{slug}-class-counts.png", class_counts_png(counts, what),
                             f"{what} per class and split"))
    if (run_dir / "samples.png").is_file():
        blocks.append(Figure(f"{slug}-samples.png", (run_dir / "samples.png").read_bytes(),
                             "training images as the model sees them (after augmentation)"))
    return blocks


def _client_blocks(manifest: dict, slug: str) -> list:
    """Where a run's training data lived when it was shared among clients (federated runs:
    manifest.json's `federated` entry): examples per class on each client."""
    fed = manifest.get("federated")
    if not fed:
        return []
    counts = fed["class_counts"]
    sizes = fed["examples"]
    return [Heading(3, "Clients"),
            Text(f"The training split was shared among {fed['clients']} clients "
                 f"(partition `{fed['partition']}`), {min(sizes)} to {max(sizes)} images each; "
                 "each client trained on its own share only."),
            Figure(f"{slug}-clients.png", client_counts_png(counts),
                   "training images per class on each client")]


def client_counts_png(counts: dict[str, dict[str, int]]) -> bytes:
    """Stacked bars: one bar per client, one colour per class."""
    plt = pyplot()
    clients = list(counts)
    classes = list(next(iter(counts.values())))
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(clients) + 2), 3.2), dpi=100)
    bottom = np.zeros(len(clients))
    for c in classes:
        values = np.array([counts[k].get(c, 0) for k in clients], float)
        ax.bar(range(len(clients)), values, 0.8, bottom=bottom, label=c)
        bottom += values
    ax.set_xticks(range(len(clients)), [k.replace("client ", "") for k in clients], fontsize=8)
    ax.set_xlabel("client")
    ax.set_ylabel("images")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return png(fig)


def _compression_blocks(run_dir: Path, slug: str) -> list:
    blocks = []
    stages = runs.read_json(run_dir / "compression.json")
    if stages:
        blocks += [Heading(3, "Compression"),
                   Text(f"Stages {' + '.join(stages.get('stages', []))}; overall sparsity "
                        f"{stages.get('overall_sparsity', 0):.3f}.")]
    bench = runs.read_json(run_dir / "benchmark" / "benchmark.json")
    if bench.get("rows"):
        rows = bench["rows"]
        blocks += [Heading(3, "Artifacts: size, accuracy, latency"),
                   Text(f"Measured by `python -m pipelines benchmark` on {rows[0]['test_examples']} "
                        f"test images; deltas against {bench['reference']}.")]
        table = []
        for r in rows:
            latency = r.get("latency_2t") or r.get("latency_tf") or {}
            table.append([r["artifact"], r["kind"], round(r["size_bytes"] / 1024, 1),
                          round(r["gzip_bytes"] / 1024, 1), r["accuracy"],
                          round(r["accuracy_delta_points"], 2), latency.get("p50_ms")])
        blocks.append(Table(["artifact", "runtime", "size KB", "gzip KB", "accuracy",
                             "Δ accuracy (points)", "p50 ms"], table))
        blocks.append(Figure(f"{slug}-tradeoff.png", tradeoff_png(rows),
                             "accuracy against size and against batch-1 latency"))
    return blocks


def _export_blocks(run_dir: Path, metrics: dict) -> list:
    rows = []
    if isinstance(metrics.get("export_parity"), dict):
        _flat("saved_model (train)", metrics["export_parity"], rows)
    for key in ("val_map_keras", "val_map_saved_model"):
        if key in metrics:
            rows.append([key, metrics[key]])
    for name, entry in runs.read_json(run_dir / "exports.json").items():
        rows.append([f"{name}.size_bytes", entry.get("size_bytes")])
        _flat(name, entry.get("check", {}), rows)
    if not rows:
        return []
    return [Heading(3, "Export parity"),
            Text("Every export is checked against the Keras model before it is written: "
                 "classifiers on probabilities and top-1 agreement, detectors on validation mAP."),
            Table(["figure", "value"], rows)]


def run_blocks(run_dir: Path, tasks: Mapping | None = None) -> list:
    """A run's sections: the core's, with its task's own (`Task.report_blocks`) after the
    training curves. `tasks` maps task names to tasks (`tfkarpa.tasks.TASKS`)."""
    if not (run_dir / "config.yaml").is_file():
        raise TfkarpaError(f"'{run_dir}' is not a run directory (no config.yaml)")
    info = runs.describe(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    manifest = runs.read_json(run_dir / "manifest.json")
    done = runs.read_json(run_dir / runs.DONE)
    metrics, history = done.get("metrics", {}), done.get("history", {})
    slug = run_dir.name
    blocks = [Heading(2, f"Run {run_dir.name}"),
              Text(f"{info['task']} · model {info['model']} · data {info['data']} · "
                   f"{info['status']} · created {info['created'] or 'n/a'}  \n"
                   f"directory {run_dir}  \n"
                   f"command: {shlex.join(manifest.get('command', [])) or 'n/a'}  \n"
                   f"git commit {manifest.get('git_commit') or 'n/a'}; TensorFlow "
                   f"{manifest.get('packages', {}).get('tensorflow', 'n/a')}")]
    scalars = [[k, _seconds(v) if k.endswith("seconds") else v] for k, v in metrics.items()
               if isinstance(v, (int, float))]
    if scalars:
        blocks += [Heading(3, "Key figures"), Table(["figure", "value"], scalars)]
    blocks += _data_blocks(run_dir, manifest, cfg, slug)
    blocks += _client_blocks(manifest, slug)
    history = history_of(run_dir, history)
    curves = curves_png(history)
    if curves:
        epochs = max(max(xs) for xs, _ in history.values() if xs)
        blocks += [Heading(3, "Training curves"),
                   Figure(f"{slug}-curves.png", curves,
                          f"per-epoch figures over {epochs} epochs (solid: training, dashed: "
                          "validation)")]
    if tasks and info["task"] in tasks:
        blocks += tasks[info["task"]].report_blocks(run_dir, slug)
    blocks += _compression_blocks(run_dir, slug)
    blocks += _export_blocks(run_dir, metrics)
    blocks += [Heading(3, "Configuration"), Code(yaml.safe_dump(cfg, sort_keys=False),
                                                      "the resolved config.yaml (click to open)")]
    return blocks


def _seconds(value) -> str | None:
    """Durations in one format wherever they appear (the 4 decimals of other figures would
    print 12.3400 beside 635.7)."""
    return None if value is None else f"{value:.1f}"


def overview(infos: list[dict]) -> Table:
    return Table(["run", "task", "model", "data", "status", "key metric", "value", "epochs",
                  "seconds"],
                 [[i["name"], i["task"], i["model"], i["data"], i["status"], i["metric"],
                   i["value"], i["epochs"], _seconds(i["seconds"])] for i in infos])


def write(run_dirs: list[str | Path], out_dir: str | Path | None = None,
          tasks: Mapping | None = None) -> dict:
    """Write report.md, report.html and report_files/ into `out_dir` (default: the first run's
    directory), each run with its task's sections (`tasks`: name -> task). Returns the paths
    written."""
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise TfkarpaError("give at least one run directory")
    for d in dirs:
        if not (d / "config.yaml").is_file():
            raise TfkarpaError(f"'{d}' is not a run directory (no config.yaml)")
    out = Path(out_dir) if out_dir else dirs[0]
    runs.ensure_writable(out, "report out")
    title = f"tfkarpa report: {', '.join(d.name for d in dirs)}"
    blocks = [Heading(1, title), overview([runs.describe(d) for d in dirs])]
    for d in dirs:
        blocks += run_blocks(d, tasks)
    return write_blocks(blocks, out, title)


def write_blocks(blocks: list, out: Path, title: str) -> dict:
    """report.md (figures in report_files/) and report.html (figures inside) from `blocks`."""
    figures = [b for b in blocks if isinstance(b, Figure)]
    out.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "report.html"):  # refuse before writing any of them
        runs.check_output_file(out / name, "report", "report out file")
    with runs.atomic_dir(out / FILES, "report_files", "report out folder") as tmp:
        for fig in figures:
            (tmp / fig.name).write_bytes(fig.png)
    runs.atomic_write_text(out / "report.md", to_markdown(blocks), kind="report")
    runs.atomic_write_text(out / "report.html", to_html(blocks, title), kind="report")
    return {"report_md": str(out / "report.md"), "report_html": str(out / "report.html"),
            "figures": len(figures), "tables": sum(isinstance(b, Table) for b in blocks)}
