"""The format registry: a format is one object and one line in `core.formats.FORMATS`. A toy
format converted from TFLite, registered here and nowhere else, is exported by a task through
its parity gate, opened, evaluated, predicted with and benchmarked like ONNX, with no line of any
task or of the core naming it."""

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from tfkarpa import runs
from tfkarpa.core import formats
from tfkarpa.core.artifacts import open_artifact
from tfkarpa.errors import TfkarpaError


class Zipped(formats.Format):
    """A toy format: the TFLite graph zlib-compressed behind a JSON header, run by LiteRT."""

    name, title, label, suffix = "zipped", "Zipped", "zipped file", ".tflz"
    edge, source = True, "tflite"

    def convert(self, tflite, where):
        return zlib.compress(tflite, 9), {"zipped_from": len(tflite)}

    def runner(self, content, meta, num_threads, where):
        from ai_edge_litert.interpreter import Interpreter

        assert meta["zipped_from"] > 0  # what `convert` asked to keep reaches the runner
        interpreter = Interpreter(model_content=zlib.decompress(content),
                                  num_threads=num_threads or 1)
        run = interpreter.get_signature_runner()
        (name,) = run.get_input_details()
        return lambda images: run(**{name: np.asarray(images, np.float32)})

    def write(self, path, content, info):
        header = json.dumps(info, default=str).encode()
        runs.atomic_write_bytes(Path(path), len(header).to_bytes(4, "big") + header + content,
                                kind=self.name)

    def read(self, path):
        data = self._read_file(path)
        size = int.from_bytes(data[:4], "big")
        try:
            meta = json.loads(data[4:4 + size])
        except ValueError:
            raise TfkarpaError(f"'{path}' is not a zipped file") from None
        return {"meta": meta, "content": data[4 + size:]}


def test_each_path_is_claimed_by_its_format(tmp_path):
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"")
    assert formats.find(tmp_path / "sm").name == "saved_model"
    assert formats.find(tmp_path / "m.none.tflite").name == "tflite"
    assert formats.find(tmp_path / "m.int8.onnx").name == "onnx"
    assert formats.find(tmp_path / "notes.txt") is None
    assert formats.find(tmp_path) is None
    assert formats.edge_suffixes() == (".tflite", ".onnx")
    assert formats.FORMATS["onnx"].file(tmp_path, "run", "int8") == tmp_path / "run.int8.onnx"
    assert formats.FORMATS["saved_model"].file(tmp_path, "run") == tmp_path / "run"


def test_formats_converted_from_tflite_are_offered_where_tflite_is():
    assert formats.offered(("saved_model", "tflite")) == ("saved_model", "tflite", "onnx")
    assert formats.offered(("saved_model",)) == ("saved_model",)
    assert [f.name for f in formats.converted(["tflite", "onnx", "saved_model"])] == ["onnx"]
    assert formats.converted_format("onnx") is formats.FORMATS["onnx"]
    assert formats.converted_format("tflite") is None and formats.converted_format("keras") is None


def test_per_image_runs_a_batch_one_graph_over_a_batch():
    calls = []

    def run(x):
        calls.append(x.shape)
        return {"sum": x.reshape(1, -1).sum(1), "first": x[:, 0]}

    out = formats.per_image(run, np.arange(12).reshape(3, 4))
    assert calls == [(1, 4)] * 3
    np.testing.assert_array_equal(out["sum"], [6, 22, 38])
    np.testing.assert_array_equal(out["first"], [0, 4, 8])


def test_an_unknown_format_names_the_registered_ones(tmp_path):
    from tfkarpa.core.export import export_run
    from tfkarpa.tasks import TASKS

    with pytest.raises(TfkarpaError, match="unknown export format 'zipped' \\(choose "
                                           "saved_model, tflite, onnx\\)"):
        export_run(tmp_path, TASKS["classify"], formats=["zipped"])


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.timeout(300)  # the shared run's training when no other test made it, conversions
def test_a_format_added_to_the_registry_is_exported_opened_and_benchmarked(trained_run,
                                                                          tmp_path, monkeypatch):
    from tfkarpa.core.benchmark import benchmark
    from tfkarpa.tasks import TASKS, evaluate, export_run, load_predictor

    monkeypatch.setitem(formats.FORMATS, "zipped", Zipped())  # the one registry line
    out = export_run(trained_run["run_dir"], formats=["tflite", "zipped"], quantize=["none"],
                     out_dir=tmp_path / "exports", check=16)
    assert sorted(out["artifacts"]) == ["tflite_none", "zipped_none"]
    path = Path(out["artifacts"]["zipped_none"])
    assert path.name.endswith(".none.tflz")
    # Through the task's own gate: the figures are the TFLite file's (the same graph)
    assert out["checks"]["zipped_none"] == out["checks"]["tflite_none"]
    exports = json.loads((Path(trained_run["run_dir"]) / "exports.json").read_text())
    assert exports["zipped_none"]["path"] == str(path)
    artifact = open_artifact(path)
    assert artifact.kind == "zipped" and artifact.meta["format"] == "tfkarpa-zipped/1"
    assert artifact.meta["parity"] == out["checks"]["zipped_none"]
    keras = evaluate(load_predictor(trained_run["run_dir"]))
    zipped = evaluate(load_predictor(path))
    assert zipped["artifact_kind"] == "zipped"
    assert zipped["confusion_matrix"] == keras["confusion_matrix"]
    result = benchmark([str(tmp_path / "exports")], tmp_path / "bench", TASKS, runs=3)
    row = next(r for r in result["rows"] if r["kind"] == "zipped")
    assert row["latency_1t"]["p50_ms"] > 0 and row["latency_2t"]["p50_ms"] > 0
    assert row["accuracy"] == pytest.approx(keras["accuracy"])
