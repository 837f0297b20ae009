"""The artifact table: discovery, sizes, accuracy per runtime, latency, deltas, files written."""

import json
from pathlib import Path

import pytest

from tfkarpa.core.benchmark import discover
from tfkarpa.tasks import benchmark
from tfkarpa.errors import TfkarpaError
from tfkarpa.tasks import export_run


@pytest.mark.slow
def test_table_over_keras_savedmodel_and_tflite(trained_run, tmp_path):
    exported = export_run(trained_run["run_dir"], ["saved_model", "tflite"], ["none", "int8"],
                          out_dir=tmp_path / "sm", representative=16, check=8)
    result = benchmark([trained_run["run_dir"], str(tmp_path / "sm")], tmp_path / "out", runs=5)
    kinds = sorted(r["kind"] for r in result["rows"])
    # The run's own Keras weights and SavedModel, plus the exported SavedModel and two TFLite files.
    assert kinds.count("tflite") == 2 and "keras" in kinds and "saved_model" in kinds
    ref = next(r for r in result["rows"] if r["artifact"].endswith(".none.tflite"))
    assert result["reference"] == ref["artifact"] and ref["size_ratio"] == 1.0
    int8 = next(r for r in result["rows"] if r["artifact"].endswith(".int8.tflite"))
    assert int8["size_bytes"] < ref["size_bytes"] and int8["gzip_bytes"] > 0
    assert int8["latency_1t"]["p50_ms"] > 0 and int8["latency_2t"]["p90_ms"] >= int8["latency_2t"]["p50_ms"]
    # LiteRT's own tool timed every TFLite file too, in its own process, at 1 and 2 threads
    for row in (r for r in result["rows"] if r["kind"] == "tflite"):
        assert row["litert_tool_1t"]["p50_ms"] > 0 and row["litert_tool_2t"]["p95_ms"] > 0
    keras = next(r for r in result["rows"] if r["kind"] == "keras")
    assert keras["accuracy"] == ref["accuracy"]  # float TFLite is the same model
    assert all(r["test_examples"] == keras["test_examples"] for r in result["rows"])
    for name in ("benchmark.md", "benchmark.json", "accuracy_vs_size.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    table = (tmp_path / "out" / "benchmark.md").read_text()
    assert "| artifact |" in table and Path(exported["artifacts"]["tflite_int8"]).name in table
    assert "litert-benchmark p50 ms 1t / 2t" in table
    assert json.loads((tmp_path / "out" / "benchmark.json").read_text())["reference"] == ref["artifact"]


def test_discover_errors(tmp_path):
    with pytest.raises(TfkarpaError, match="does not exist"):
        discover([str(tmp_path / "missing")])
    with pytest.raises(TfkarpaError, match="nothing to benchmark"):
        discover([str(tmp_path)])
