"""python -m pipelines VERB ...: the command layer over tfkarpa.

Each verb also runs alone as `python -m pipelines.VERB`. Listing the verbs imports no
TensorFlow, so it answers at once.
"""

from __future__ import annotations

import importlib
import sys

VERBS = {
    "demo": "the tour on embedded data: classify, compress, export, benchmark, detect, report",
    "train": "train a model, evaluate it on the test split and export a SavedModel",
    "evaluate": "evaluate a run or SavedModel: accuracy, top-k, per-class table, confusion matrix",
    "predict": "top-k labels for images or folders from a run, SavedModel, .tflite or .onnx file",
    "compress": "prune, cluster and/or quantization-aware-train a finished run (TF-MOT)",
    "export": "export a run as SavedModel and TFLite (float, fp16, dynamic, int8), each checked",
    "federate": "train across clients that keep their data (Flower): FedAvg/FedProx/FedAdam, DP",
    "search": "search config keys with Optuna (trials as runs, pruning, Pareto fronts)",
    "ensemble": "one model, and one run, from several finished classifier runs (mean or vote)",
    "benchmark": "one table over artifacts: size, gzip size, accuracy, batch-1 latency, deltas",
    "pretrain": "contrastive (SimCLR) pretraining of an encoder; labels only for its monitors",
    "finetune": "fine-tune a pretrained encoder with some of the labels (labels=10%)",
    "linear-eval": "a linear classifier on a pretrained encoder's frozen features",
    "report": "report.md and a self-contained report.html for runs: curves, tables, charts",
    "runs": "list runs with task, data, model, key metric, size and date (--json for scripts)",
    "board": "TensorBoard over a folder of runs (scalars, images, HParams); Ctrl-C stops it",
    "data": "data tools: `data convert SOURCE out=DIR shards=N` writes sharded TFRecords",
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: python -m pipelines VERB [args] (python -m pipelines VERB --help for its keys)",
             "", "verbs:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        import difflib

        close = difflib.get_close_matches(verb, list(VERBS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown verb '{verb}'{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(f"pipelines.{verb.replace('-', '_')}").main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
