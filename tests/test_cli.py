"""The command layer: verbs, --help, --json, exit codes and messages for bad input."""

import json
import os
import sys
from pathlib import Path

import pytest

from conftest import TINY, run_process, write_image_folder
from pipelines.__main__ import VERBS, main

ROOT = Path(__file__).resolve().parents[1]


def run_module(*args, timeout=60):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return run_process([sys.executable, "-m", *args], text=True, timeout=timeout, cwd=ROOT,
                       env=env)


@pytest.mark.process
def test_listing_verbs_and_help_need_no_tensorflow():
    out = run_module("pipelines")
    assert out.returncode == 0
    for verb in ("train", "evaluate", "predict", "export"):
        assert f"  {verb}" in out.stdout
    help_out = run_module("pipelines.train", "--help")
    assert help_out.returncode == 0 and "optimizer.lr" in help_out.stdout
    assert "data.augment" in help_out.stdout and "off | light | strong" in help_out.stdout


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as stop:
        main([verb, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m pipelines " + verb) and "--quiet" in out


@pytest.mark.process
def test_keras_3_already_loaded_is_a_clear_error():
    code = "import os; os.environ.pop('TF_USE_LEGACY_KERAS', None); import tensorflow; import tfkarpa"
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["PYTHONPATH"] = str(ROOT)
    out = run_process([sys.executable, "-c", code], text=True, env=env, timeout=120)
    assert out.returncode != 0 and "KerasFlavourError" in out.stderr
    assert "Import tfkarpa before tensorflow" in out.stderr


def test_unknown_verb_is_an_error(capsys):
    assert main(["trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_train_evaluate_predict_json(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY, "--json", "--quiet"]) == 0
    result = last_json(capsys)
    run_dir, saved = result["run_dir"], result["artifacts"]["saved_model"]
    assert Path(run_dir).is_dir() and saved == "saved_models/shapes-small_cnn"
    assert 0.0 <= result["metrics"]["test_accuracy"] <= 1.0

    for target in (run_dir, saved):
        assert main(["evaluate", target, "split=val", "--json", "--quiet"]) == 0
        evaluated = last_json(capsys)
        assert Path(evaluated["artifacts"]["confusion_matrix"]).is_file()
        assert evaluated["metrics"]["examples"] == 24

    images = write_image_folder(tmp_path / "imgs", classes=("a",), per_class=3, size=40)
    assert main(["predict", saved, str(images), "top_k=2", "--json", "--quiet"]) == 0
    predictions = last_json(capsys)["predictions"]
    assert len(predictions) == 3 and len(predictions[0]["top_k"]) == 2
    assert predictions[0]["top_k"][0]["score"] >= predictions[0]["top_k"][1]["score"]

    assert main(["export", run_dir, "formats=tflite", "quantize=int8", "representative=16",
                 "check=8", "--json", "--quiet"]) == 0
    lite = last_json(capsys)["artifacts"]["tflite_int8"]
    assert lite == "saved_models/shapes-small_cnn.int8.tflite"
    assert main(["predict", lite, str(images), "--json", "--quiet"]) == 0
    assert len(last_json(capsys)["predictions"]) == 3
    assert main(["evaluate", lite, "--json", "--quiet"]) == 0
    report = last_json(capsys)["artifacts"]["report"]
    assert report == "saved_models/shapes-small_cnn.int8.tflite.eval/test/report.md"


@pytest.mark.parametrize("args, message", [
    (["train", "epohcs=2"], "did you mean 'epochs'"),
    (["train", "data=mnist"], "unknown data source 'mnist'"),
    (["train", "model=resnet50"], "unknown model 'resnet50'"),
    (["train", "no_such_recipe"], "unknown recipe"),
    (["train", "task=clasify"], "unknown task 'clasify'; did you mean 'classify'"),
    (["train", "data=digits", "task=caption"], "unknown task 'caption'"),
    (["evaluate", "/no/such/run"], "does not exist"),
    (["predict", "/no/such/model", "x.png"], "does not exist"),
    (["export", "/no/such/run"], "does not exist"),
    (["export", "/no/such/run", "qantize=int8"], "did you mean 'quantize'"),
    (["compress", "/no/such/run", "qat=true"], "does not exist"),
    (["benchmark", "/no/such/run"], "does not exist"),
    (["benchmark", ".", "runs=0"], "must be a positive whole number"),
])
def test_bad_input_exits_non_zero_with_a_message(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(args + ["--quiet"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert not (tmp_path / "saved_models").exists()


def test_corrupt_image_in_folder_names_it_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    (root / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert main(["train", f"data=folder:{root}", "epochs=1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "bad.png" in err and "not a readable image" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert not (tmp_path / "saved_models").exists()


def test_predict_names_an_unreadable_image(trained_run, tmp_path, capsys):
    bad = tmp_path / "not_an_image.jpg"
    bad.write_bytes(b"hello")
    assert main(["predict", trained_run["run_dir"], str(bad), "--quiet"]) == 1
    assert "not_an_image.jpg" in capsys.readouterr().err


def test_evaluate_rejects_a_data_set_with_other_classes(trained_run, capsys):
    assert main(["evaluate", trained_run["run_dir"], "data=digits", "--quiet"]) == 1
    assert "10 classes but the model" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.process
def test_train_as_its_own_module_with_json(tmp_path):
    out = run_module("pipelines.train", *TINY, "epochs=1", f"runs_root={tmp_path}/runs",
                     f"export_dir={tmp_path}/sm", "--json", timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(result["artifacts"]["saved_model"]).is_dir()
    assert "oneDNN" not in out.stderr  # TensorFlow's start-up notices are kept out of the way
    assert "val_accuracy" in out.stdout  # per-epoch progress lines


def test_flags_also_work_as_keys():
    from pipelines import _cli

    p = _cli.parser("train", "summary", "[key=value ...]", with_keys=False)
    p.add_argument("args", nargs="*")
    args = p.parse_intermixed_args(["verbose=true", "quiet=false", "json=1", "epochs=3"])
    assert args.verbose and not args.quiet and args.json and args.args == ["epochs=3"]
    assert _cli.split_overrides(args.args) == (["epochs=3"], [])
