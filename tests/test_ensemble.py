"""Ensembles: finished runs made one model and one run (evaluated, exported, reloadable after
the members are gone), the vote rule, and members that cannot be combined."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from pipelines.__main__ import main
from tfkarpa import tasks
from tfkarpa.tasks.classify.ensemble import Combine


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two finished tiny runs on the same split (data.seed=0), different initialisations."""
    root = tmp_path_factory.mktemp("members")
    done = []
    for seed in (0, 1):
        cfg = tiny_config(root, f"seed={seed}", "data.seed=0", f"name=m{seed}", "export=false")
        done.append(tasks.run(cfg, verbose=0)["run_dir"])
    return root, done


def test_vote_counts_top_classes_and_breaks_ties_by_the_mean():
    a = tf.constant([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1]])
    b = tf.constant([[0.1, 0.8, 0.1], [0.1, 0.2, 0.7]])
    c = tf.constant([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    votes = Combine("vote")([a, b, c]).numpy()
    np.testing.assert_allclose(votes.sum(-1), 1.0, rtol=1e-6)
    assert votes[0].argmax() == 0 and votes[0][0] == pytest.approx(2 / 3, abs=2e-3)
    assert votes[1].argmax() == 1  # one vote each: class 1 has the highest mean (0.367)
    np.testing.assert_allclose(Combine("mean")([a, b, c]).numpy(), (a + b + c).numpy() / 3,
                               rtol=1e-6)


@pytest.mark.slow
def test_an_ensemble_is_a_run_that_averages_its_members(members, tmp_path, monkeypatch,
                                                         capsys):
    root, (m0, m1) = members
    copies = [shutil.copytree(m, tmp_path / "copies" / Path(m).name) for m in (m0, m1)]
    monkeypatch.chdir(tmp_path)
    assert main(["ensemble", *map(str, copies), "runs_root=ens", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = Path(result["run_dir"])
    assert run == Path("ens/m0-ensemble") and result["metrics"]["members"] == 2
    assert (run / "members" / "1" / "config.yaml").is_file()
    assert (run / "eval" / "test" / "reliability.png").is_file()
    assert result["metrics"]["export_parity"]["max_abs_diff"] < 1e-4
    singles = [json.loads((Path(m) / "metrics.json").read_text())["metrics"]["test_accuracy"]
               for m in copies]
    assert result["metrics"]["best_member_test_accuracy"] == max(singles)

    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3)).astype(np.uint8)
    expected = np.mean([tasks.load_predictor(str(m)).predict(images) for m in copies], axis=0)
    for copy in copies:  # the ensemble carries its members: it loads without them
        shutil.rmtree(copy)
    ensemble = tasks.load_predictor(str(run))
    np.testing.assert_allclose(ensemble.predict(images), expected, atol=1e-5)
    saved = tasks.load_predictor(result["artifacts"]["saved_model"])
    np.testing.assert_allclose(saved.predict(images), expected, atol=1e-5)
    lite = tasks.export_run(run, formats=("tflite",), quantize=("none",), out_dir="lite",
                            check=8)["artifacts"]["tflite_none"]  # one file, members inside
    np.testing.assert_allclose(tasks.load_predictor(lite).predict(images), expected, atol=1e-4)
    manifest = json.loads((run / "manifest.json").read_text())["ensemble"]
    assert manifest["method"] == "mean" and len(manifest["members"]) == 2


@pytest.mark.parametrize("case, message", [
    ("one", "at least two runs"),
    ("twice", "listed twice"),
    ("other split", "another split of the data"),
    ("other size", "takes 24-pixel images"),
    ("other classes", "predicts other classes"),
    ("unfinished", "has not finished"),
    ("method", "'median' is not one of mean, vote"),
])
def test_members_that_do_not_combine_are_refused(members, tmp_path, monkeypatch, capsys, case,
                                                 message):
    root, (m0, m1) = members
    monkeypatch.chdir(tmp_path)
    odd = tmp_path / "odd"
    if case in ("other split", "other size", "other classes", "unfinished"):
        shutil.copytree(m1, odd)
        config = (odd / "config.yaml").read_text()
        if case == "other split":
            config = config.replace("  seed: 0\n", "  seed: 5\n", 1)  # data.seed
        elif case == "other size":
            config = config.replace("image_size: 16", "image_size: 24")
        elif case == "unfinished":
            (odd / "metrics.json").unlink()
        else:
            manifest = json.loads((odd / "manifest.json").read_text())
            manifest["data"]["classes"] = manifest["data"]["classes"][::-1]
            (odd / "manifest.json").write_text(json.dumps(manifest))
        (odd / "config.yaml").write_text(config)
    argv = {"one": [m0], "twice": [m0, m0], "method": [m0, m1, "method=median"]}.get(
        case, [m0, str(odd)])
    assert main(["ensemble", *argv, "runs_root=ens", "--quiet"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ens").exists() and not (tmp_path / "saved_models").exists()


def test_training_an_ensemble_config_is_refused(tmp_path):
    from tfkarpa.errors import TfkarpaError

    with pytest.raises(TfkarpaError, match="not trained"):
        tasks.run(tiny_config(tmp_path, "ensemble.members=[a,b]"), verbose=0)
