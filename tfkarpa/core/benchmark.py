"""One table over every artifact of some runs: size, accuracy through its own runtime, latency.

`benchmark(["runs/demo", "runs/demo-prune80"])` finds each run's Keras weights, its SavedModel
and its TFLite and ONNX files, evaluates every one on the same test split (Keras in TensorFlow,
SavedModel through its serving signature, TFLite through the LiteRT interpreter, ONNX through
onnxruntime), times batch-1 inference (p50/p90; TFLite and ONNX with 1 and 2 threads,
TensorFlow artifacts with its default threads; TFLite files also by LiteRT's own
`litert-benchmark` tool, whose random inputs and compiled-model runtime time the graph alone,
without the Python interpreter's per-call cost), and
writes `benchmark.md`, `benchmark.json`, an accuracy-against-size PNG and a TensorBoard text
summary. Deltas are against the reference: the first float TFLite file, else the first artifact.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import tarfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfkarpa.core import formats
from tfkarpa.core.artifacts import open_artifact
from tfkarpa.core.export import artifact_files, artifact_size
from tfkarpa.errors import TfkarpaError
from tfkarpa.runs import (atomic_write_bytes, atomic_write_json, atomic_write_text,
                          check_output_file, ensure_writable)

log = logging.getLogger(__name__)
FILES = ("benchmark.md", "benchmark.json", "accuracy_vs_size.png")  # what `benchmark` writes


def _gzip_size(path: Path) -> int:
    if path.is_file():
        return len(gzip.compress(path.read_bytes(), compresslevel=9))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in artifact_files(path):
            tar.add(f, arcname=str(f.relative_to(path)))
    return len(gzip.compress(buf.getvalue(), compresslevel=9))


def discover(targets: list[str]) -> list[tuple[str, Path, Path]]:
    """(label, path to load, path to measure) for every artifact under the given runs/paths."""
    found = []
    edge_suffixes = formats.edge_suffixes()  # single-file exports, timed at 1 and 2 threads

    def add(label, load, measure=None):
        if all(str(load) != str(f[1]) for f in found):
            found.append((label, Path(load), Path(measure or load)))

    for target in targets:
        p = Path(target)
        if p.suffix in edge_suffixes and p.is_file():
            add(p.name, p)
        elif (p / "saved_model.pb").is_file():
            add(f"{p.name} (SavedModel)", p)
        elif (p / "config.yaml").is_file():
            final = p / "checkpoints" / "final.weights.h5"
            if not final.is_file():
                raise TfkarpaError(f"run '{p}' has not finished (no checkpoints/final.weights.h5)")
            add(f"{p.name} (Keras)", p, final)
            done = json.loads((p / "metrics.json").read_text()) if (p / "metrics.json").is_file() else {}
            saved = done.get("artifacts", {}).get("saved_model")
            if saved and (Path(saved) / "saved_model.pb").is_file():
                add(f"{p.name} (SavedModel)", saved)
                for suffix in edge_suffixes:
                    for edge in sorted(Path(saved).parent.glob(f"{Path(saved).name}.*{suffix}")):
                        add(edge.name, edge)
        elif p.is_dir():
            for edge in sorted(f for suffix in edge_suffixes for f in p.glob(f"*{suffix}")):
                add(edge.name, edge)
            for sm in sorted(d for d in p.iterdir() if (d / "saved_model.pb").is_file()):
                add(f"{sm.name} (SavedModel)", sm)
        else:
            raise TfkarpaError(f"'{p}' does not exist or is not a run, SavedModel, .tflite or "
                               ".onnx file")
    if not found:
        raise TfkarpaError(f"nothing to benchmark in {', '.join(targets)}")
    return found


def latency(fn, image: np.ndarray, runs: int) -> dict:
    """p50 and p90 milliseconds of `fn(image)` over `runs` calls, after 5 warm-up calls."""
    for _ in range(5):
        fn(image)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(image)
        times.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p90_ms": float(np.percentile(times, 90))}


def litert_tool(path: Path, threads: int, runs: int) -> dict | None:
    """The TFLite file timed by LiteRT's own benchmark tool (`litert-benchmark`, shipped in
    ai-edge-litert: its compiled-model API, random inputs), in a process of its own: median and
    p95 milliseconds from its result JSON, or None (with a warning) when it fails."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "ai_edge_litert.tools.benchmark_litert_model",
                   "--model", str(path), "--num_threads", str(threads), "--num_runs", str(runs),
                   "--warmup_runs", "5", "--result_json", str(out)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            log.warning("litert-benchmark on %s ran past 300 s; its column is left empty", path)
            return None
        if done.returncode or not out.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
            log.warning("litert-benchmark failed on %s (%s); its column is left empty", path, last)
            return None
        latency = json.loads(out.read_text())["latency"]
    return {"p50_ms": float(latency["median_ms"]), "p95_ms": float(latency["p95_ms"])}


def probe_image(size: int) -> np.ndarray:
    """The batch-1 uint8 image latency is measured on (random, fixed)."""
    return np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)


def measure(label: str, load: Path, size_path: Path, runs: int, tasks: Mapping,
            data=None) -> dict:
    """One row: the artifact's size, its task's figure on the test split through its own
    runtime, and batch-1 latency (TFLite and ONNX with 1 and 2 threads, TensorFlow with its
    own)."""
    artifact = open_artifact(load)
    task = tasks[artifact.task]
    predictor = task.load_predictor(artifact)
    metrics = task.evaluate(predictor, "test", data=data)
    image = probe_image(predictor.image_size)
    row = {"artifact": label, "path": str(load), "kind": predictor.kind,
           "stages": list(predictor.config.stages),
           "size_bytes": artifact_size(size_path), "gzip_bytes": _gzip_size(size_path),
           "accuracy": task.benchmark_metric(metrics),
           "test_examples": metrics.get("examples", metrics.get("images"))}
    fmt = formats.FORMATS.get(predictor.kind)
    if fmt is not None and fmt.edge:
        for threads in (1, 2):
            row[f"latency_{threads}t"] = latency(predictor.timed(threads), image, runs)
    if predictor.kind == "tflite":  # the runtime's own tool beside the Python timing
        for threads in (1, 2):
            row[f"litert_tool_{threads}t"] = litert_tool(load, threads, runs)
    else:
        row["latency_tf"] = latency(predictor.timed(None), image, runs)
    return row


def _reference(rows: list[dict]) -> dict:
    """The float TFLite file of an uncompressed run, else any float TFLite, else the first."""
    floats = [r for r in rows if r["kind"] == "tflite" and r["artifact"].endswith(".none.tflite")]
    plain = [r for r in floats if not r["stages"]]
    return (plain or floats or rows)[0]


def _latency_of(row: dict, key: str = "latency_2t") -> float | None:
    lat = row.get(key) or row.get("latency_tf")
    return lat["p50_ms"] if lat else None


def add_deltas(rows: list[dict]) -> dict:
    ref = _reference(rows)
    for row in rows:
        row["accuracy_delta_points"] = 100 * (row["accuracy"] - ref["accuracy"])
        row["size_ratio"] = row["size_bytes"] / ref["size_bytes"]
        row["gzip_ratio"] = row["gzip_bytes"] / ref["gzip_bytes"]
        a, b = _latency_of(row), _latency_of(ref)
        row["latency_ratio_2t"] = a / b if a and b and row["kind"] == ref["kind"] else None
    return ref


def markdown(rows: list[dict], ref: dict, figure: str = "test accuracy") -> str:
    def lat(row, key):
        v = row.get(key)
        return f"{v['p50_ms']:.2f} / {v['p90_ms']:.2f}" if v else "-"

    def tool(row):
        v1, v2 = row.get("litert_tool_1t"), row.get("litert_tool_2t")
        return f"{v1['p50_ms']:.2f} / {v2['p50_ms']:.2f}" if v1 and v2 else "-"

    lines = [f"# Benchmark ({len(rows)} artifacts, {rows[0]['test_examples']} test images)", "",
             f"Reference for deltas: {ref['artifact']}. accuracy: the {figure}.", "",
             "| artifact | size KB | gzip KB | accuracy | Δ acc (pts) | gzip × | p50/p90 ms 1 thread "
             "| p50/p90 ms 2 threads | TF p50/p90 ms | latency × (2t) "
             "| litert-benchmark p50 ms 1t / 2t |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ratio = f"{r['latency_ratio_2t']:.2f}" if r["latency_ratio_2t"] else "-"
        lines.append(
            f"| {r['artifact']} | {r['size_bytes'] / 1024:.1f} | {r['gzip_bytes'] / 1024:.1f} | "
            f"{r['accuracy']:.4f} | {r['accuracy_delta_points']:+.2f} | {r['gzip_ratio']:.3f} | "
            f"{lat(r, 'latency_1t')} | {lat(r, 'latency_2t')} | {lat(r, 'latency_tf')} | {ratio} | "
            f"{tool(r)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], figure: str = "test accuracy") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    # Labels go in a legend: artifacts of one model sit on top of each other on this plot.
    cmap = plt.get_cmap("tab20")
    markers = {"tflite": "o", "onnx": "^"}
    for i, r in enumerate(rows):
        ax.scatter(r["gzip_bytes"] / 1024, 100 * r["accuracy"], color=cmap(i % 20), s=50,
                   marker=markers.get(r["kind"], "s"), label=r["artifact"])
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xscale("log")
    ax.set_xlabel("gzip size (KB, log scale)")
    ax.set_ylabel(f"{figure} (%)")
    ax.set_title("accuracy against size (circles: TFLite, triangles: ONNX, squares: TensorFlow)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def benchmark(targets: list[str], out_dir: str | Path, tasks: Mapping, runs: int = 100,
              tensorboard_dir: str | Path | None = None) -> dict:
    """Measure every artifact of `targets` on one test split; write the table, JSON and plot.
    `tasks` maps task names to tasks (`tfkarpa.tasks.TASKS`)."""
    ensure_writable(out_dir, "benchmark out")
    for name in FILES:  # refused before the timing, not after
        check_output_file(Path(out_dir) / name, "benchmark", "benchmark out file")
    artifacts = discover(targets)
    first = open_artifact(artifacts[0][1])
    data = tasks[first.task].load_data(first.config)  # one load, the same test split
    rows = []
    for i, (label, load, size_path) in enumerate(artifacts, 1):
        log.info("[%d/%d] %s", i, len(artifacts), label)
        rows.append(measure(label, load, size_path, runs, tasks, data))
    ref = add_deltas(rows)
    out = Path(out_dir)
    figure = tasks[first.task].benchmark_figure
    md = markdown(rows, ref, figure)
    atomic_write_text(out / "benchmark.md", md, kind="benchmark")
    atomic_write_json(out / "benchmark.json", {"reference": ref["artifact"], "rows": rows},
                      kind="benchmark")
    atomic_write_bytes(out / "accuracy_vs_size.png", plot(rows, figure), kind="benchmark")
    if tensorboard_dir:
        writer = tf.summary.create_file_writer(str(tensorboard_dir))
        with writer.as_default():
            tf.summary.text("benchmark", md, step=0)
        writer.close()
    return {"rows": rows, "reference": ref["artifact"], "markdown": md,
            "artifacts": {"table": str(out / "benchmark.md"), "json": str(out / "benchmark.json"),
                          "plot": str(out / "accuracy_vs_size.png")}}
