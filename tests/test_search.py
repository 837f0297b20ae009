"""Search (tfkarpa/tasks/search*.py): spaces checked before any trial, a study end to end,
pruning, two processes on one SQLite study, a killed study resuming its unfinished trial, several objectives
with int8 figures. Trials are tiny runs: the mechanics are tested, not the accuracy."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import TINY, started
from pipelines.__main__ import main
from tfkarpa import config
from tfkarpa.errors import TfkarpaError
from tfkarpa.tasks import search
from tfkarpa.tasks import search_space as space
from tfkarpa.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
# Digits learn in seconds, so a good and a hopeless learning rate differ by the second epoch.
DIGITS = ["data=digits", "data.image_size=16", "model.width=0.25", "batch_size=64",
          "data.augment=off", "optimizer.warmup_epochs=0", "export=false"]


def write_space(tmp_path, text, name="space.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# ------------------------------------------------------------------------- spaces

def test_space_reads_ranges_choices_and_nested_sections(tmp_path):
    path = write_space(tmp_path, "optimizer.lr: loguniform(1e-4, 1e-1)\n"
                                 "epochs: int(2, 8, 2)\n"
                                 "model:\n  width: [0.25, 0.5]\n  name: [small_cnn, resnet]\n"
                                 "data.augment: [off, light]\n")
    params = {p.key: p for p in space.load(path, config.build(), TASKS["classify"].check_model)}
    assert params["optimizer.lr"].kind == "float" and params["optimizer.lr"].log
    assert (params["epochs"].kind, params["epochs"].low, params["epochs"].high,
            params["epochs"].step) == ("int", 2, 8, 2)
    assert params["model.width"].choices == (0.25, 0.5)
    # YAML 1.2 booleans: `off` stays the word data.augment takes, not False.
    assert params["data.augment"].choices == ("off", "light")
    cfg = space.apply(config.build(), {"epochs": 4, "data.augment": "off", "model.width": 0.5})
    assert (cfg.epochs, cfg.data.augment, cfg.model.width) == (4, "off", 0.5)


@pytest.mark.parametrize("text, message", [
    ("optimizer.lrr: uniform(0.1, 1)\n", "line 1: unknown config key 'optimizer.lrr'; did you "
                                         "mean 'optimizer.lr'"),
    ("epochs: [2, 4]\noptimizer.lr: uniform(0.5, 0.1)\n", "line 2: 'optimizer.lr': the low end "
                                                          "must be below the high end"),
    ("optimizer.lr: loguniform(0, 0.1)\n", "a log range needs a low end above 0"),
    ("epochs: uniform(2, 8)\n", "'epochs' takes whole numbers: use int(2, 8)"),
    ("epochs: [2, many]\n", "'epochs' value 'many' is not accepted: config key 'epochs': 'many' "
                            "is not a valid int"),
    ("prune.sparsity: uniform(0.0, 1.2)\n", "'prune.sparsity' value 1.2 is not accepted: config "
                                            "key 'prune.sparsity' must be in [0, 1)"),
    ("model.name: [small_cnn, resnet50]\n", "value 'resnet50' is not accepted: config key "
                                            "'model.name': unknown model 'resnet50'"),
    ("data.augment: [off, heavy]\n", "'heavy' is not one of auto, off, light, strong"),
    ("run_dir: [a, b]\n", "'run_dir' cannot be searched"),
    ("epochs: 8\n", "fixed setting goes on the command line (epochs=8)"),
    ("optimizer.lr: normal(0, 1)\n", "neither a list of choices nor a range"),
    ("model.width: []\n", "empty list of choices"),
    ("optimizer.lr: [0.1]\noptimizer: {lr: [0.2]}\n", "'optimizer.lr' is already searched"),
    ("- optimizer.lr\n", "expected a mapping of config keys"),
    ("optimizer.lr: [0.1\n", "not valid YAML"),
])
def test_bad_spaces_are_named_before_any_trial(tmp_path, text, message):
    path = write_space(tmp_path, text)
    with pytest.raises(TfkarpaError) as err:
        space.load(path, config.build(), TASKS["classify"].check_model)
    assert message in str(err.value) and str(path) in str(err.value)


def test_objectives_parse_and_the_test_split_is_refused():
    task = TASKS["classify"]
    assert search.parse_objectives("", task) == [
        search.Objective("val_accuracy", "maximize", "epoch")]
    objectives = search.parse_objectives("accuracy,int8_latency_ms,val_loss", task)
    assert [(o.direction, o.kind) for o in objectives] == [
        ("maximize", "epoch"), ("minimize", "edge"), ("minimize", "epoch")]
    assert search.parse_objectives("params:max", task)[0].direction == "maximize"
    for bad, message in [("test_accuracy", "must not choose between trials"),
                         ("accuracy:up", "direction after ':' is max or min"),
                         ("accuracy,accuracy", "names a figure twice")]:
        with pytest.raises(TfkarpaError, match=message):
            search.parse_objectives(bad, task)


@pytest.mark.slow
def test_bad_search_commands_exit_non_zero_and_write_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_space(tmp_path, "optimizer.lr: uniform(0.1, 1)\n")
    bad_space = write_space(tmp_path, "optimizer.lr: uniform(1, 0.1)\n", "bad.yaml")
    for args, message in [
        ([], "search needs space=FILE.yaml"),
        (["space=missing.yaml"], "space file not found: missing.yaml"),
        ([f"space={bad_space}"], "the low end must be below the high end"),
        (["space=space.yaml", "trials=0"], "'trials' must be a positive whole number"),
        (["space=space.yaml", "pruner=asha"], "'pruner': 'asha' is not one of"),
        (["space=space.yaml", "objective=test_accuracy"], "must not choose between trials"),
        (["space=space.yaml", "storage=nosuchdb://x"], "cannot open 'nosuchdb://x'"),
        (["space=space.yaml", "storage=postgresql://me@127.0.0.1:9/db"],
         "needs the Python module 'psycopg'" if importlib.util.find_spec("psycopg") is None
         else "cannot open 'postgresql://me@127.0.0.1:9/db'"),
    ]:
        assert main(["search", *TINY, *args, "--quiet"]) == 1, args
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "runs" / "shapes-small_cnn-search").exists(), "a refused search left "\
        "its study folder behind"


# ------------------------------------------------------------------------- studies

@pytest.mark.slow
def test_an_objective_the_runs_do_not_log_stops_the_study(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_space(tmp_path, "optimizer.lr: loguniform(0.01, 0.2)\n")
    assert main(["search", *TINY, "epochs=1", "space=space.yaml", "trials=2", "export=false",
                 "objective=recall", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "'recall' is not a figure the run logs each epoch (it logs" in err
    assert "val_accuracy" in err


@pytest.mark.slow
def test_a_study_end_to_end(tmp_path, monkeypatch, capsys):
    """Three trials: every one an ordinary run, best.yaml trains again, the report, HParams
    and the CSV written; the same command afterwards adds no trial, another space is refused."""
    monkeypatch.chdir(tmp_path)
    write_space(tmp_path, "optimizer.lr: loguniform(0.01, 0.2)\nmodel.width: [0.25, 0.5]\n")
    args = ["search", *TINY, "space=space.yaml", "trials=3", "export=false", "--json", "--quiet"]
    assert main(args) == 0
    result = last_json(capsys)
    study = Path(result["run_dir"])
    assert study == Path("runs/shapes-small_cnn-search")
    assert result["metrics"]["trials_complete"] == 3
    trials = sorted(study.glob("trial-*"))
    assert [t.name for t in trials] == ["trial-0000", "trial-0001", "trial-0002"]
    for t in trials:  # ordinary finished runs, each with its drawn values
        assert (t / "metrics.json").is_file()
        stored = yaml.safe_load((t / "config.yaml").read_text())
        assert 0.01 <= stored["optimizer"]["lr"] <= 0.2 and stored["model"]["width"] in (0.25, 0.5)
    summary = json.loads((study / "search.json").read_text())
    best = summary["best"]
    assert best["values"]["val_accuracy"] == result["metrics"]["best_val_accuracy"]
    history = json.loads((Path(best["run_dir"]) / "metrics.json").read_text())["history"]
    assert best["values"]["val_accuracy"] == max(history["val_accuracy"])
    recipe = config.build([study / "best.yaml"])  # trains again as a recipe
    assert recipe.optimizer.lr == pytest.approx(best["params"]["optimizer.lr"])
    assert recipe.run_dir == "" and recipe.name == "" and recipe.export is True
    rows = (study / "trials.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("number,state,val_accuracy,optimizer.lr")
    html = (study / "report.html").read_text()
    assert "optimization history" in html and html.count("data:image/png;base64") >= 3
    sessions = [d for d in (study / "logs").iterdir() if d.is_dir()]
    assert sorted(d.name for d in sessions) == [t.name for t in trials]

    assert main(args) == 0  # the study is done: nothing is trained again
    assert last_json(capsys)["metrics"]["trials_complete"] == 3
    assert len(list(study.glob("trial-*"))) == 3
    (study / "report.html").unlink()
    assert main(["report", str(study), "--json", "--quiet"]) == 0  # from the study's database
    assert last_json(capsys)["metrics"]["best_trial"] == best["number"]
    assert (study / "report.html").is_file()
    assert main([*args, "export_best=true"]) == 0  # export_best is not part of the question
    exported = last_json(capsys)["artifacts"]
    name = Path(best["run_dir"]).name
    assert exported[f"{name}_saved_model"] == f"saved_models/{study.name}/{name}"
    assert Path(exported[f"{name}_tflite_int8"]).is_file()
    write_space(tmp_path, "optimizer.lr: loguniform(0.01, 0.5)\n")
    assert main(args) == 1
    assert "was started with another space" in capsys.readouterr().err


@pytest.mark.slow
def test_the_pruner_stops_a_hopeless_trial_early(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_space(tmp_path, "optimizer.lr: [0.1, 0.000001]\n")
    folder = tmp_path / "study"
    folder.mkdir()
    ahead = optuna.create_study(study_name="study", direction="maximize",
                                storage=f"sqlite:///{folder / 'study.db'}")
    for lr in (0.1,) * 5 + (0.000001,):  # five good trials set the median, then a bad one
        ahead.enqueue_trial({"optimizer.lr": lr})
    base = search.base_config(config.build(overrides=[*DIGITS, "epochs=3"]))
    result = search.run(base, path, folder, search.Options(trials=6, pruner="median"))
    assert result["metrics"]["trials_pruned"] == 1 and result["metrics"]["trials_complete"] == 5
    trials = json.loads((folder / "search.json").read_text())["trials"]
    assert trials == {"complete": 5, "pruned": 1, "fail": 0, "running": 0}
    pruned = json.loads((folder / "trial-0005" / "metrics.json").read_text())["metrics"]
    assert pruned["epochs_run"] == 2  # judged from epoch 2 (a third of 3 -> step 1) and stopped
    assert "pruned after epoch" in (folder / "report.md").read_text()


def _search_process(tmp_path, *args):
    """`search ARGS --json` as a process of its own group (a context manager: the group is
    killed when the block ends)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return started([sys.executable, "-m", "pipelines", "search", *args, "--json"], cwd=tmp_path,
                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.timeout(500)  # its study may take 400 s
def test_two_processes_share_one_sqlite_study(tmp_path):
    """workers=2: two processes draw trials from one SQLite study without taking the same one."""
    write_space(tmp_path, "optimizer.lr: loguniform(0.01, 0.2)\n")
    with _search_process(tmp_path, *TINY, "space=space.yaml", "trials=6", "workers=2",
                         "pruner=none", "export=false", "study=shared") as proc:  # 6, none pruned
        out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path}/shared/study.db")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) >= 6 and len({t.user_attrs["run_dir"] for t in done}) == len(done)
    assert len({t.user_attrs["owner"] for t in done}) == 2, "one worker did all the trials"
    assert json.loads(out.strip().splitlines()[-1])["metrics"]["trials_complete"] == len(done)


def _wait_for_epochs(history: Path, rows: int, proc) -> int:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if history.is_file() and len(history.read_text().splitlines()) - 1 >= rows:
            return rows
        time.sleep(0.5)
    raise AssertionError(f"no epoch {rows} in {history}: {proc.stderr.read()[-2000:]}")


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.timeout(1200)  # three commands in turn: 240 s, 240 s and 400 s at most
def test_an_interrupted_or_killed_study_resumes_its_unfinished_trial(tmp_path):
    """Ctrl-C, then SIGKILL, each mid-trial: the same command re-runs the trial in the same run
    folder, which resumes from its last epoch, and the study then goes on to its end."""
    write_space(tmp_path, "optimizer.lr: loguniform(0.01, 0.2)\n")
    args = [*TINY, "epochs=12", "space=space.yaml", "trials=2", "export=false", "study=s"]
    history = tmp_path / "s" / "trial-0000" / "history.csv"
    with _search_process(tmp_path, *args, "--quiet") as proc:
        _wait_for_epochs(history, 2, proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130

    with _search_process(tmp_path, *args, "--quiet") as proc:
        _wait_for_epochs(history, 4, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (tmp_path / "s" / "trial-0000" / "metrics.json").exists()

    with _search_process(tmp_path, *args) as again:
        out, err = again.communicate(timeout=400)
    assert again.returncode == 0, err[-2000:]
    assert "was cut short" in err and "running it again" in err
    assert "moving the training data on to epoch" in err  # the run resumed, not restarted
    result = json.loads(out.strip().splitlines()[-1])
    assert result["metrics"]["trials_complete"] == 2 and result["metrics"]["trials_failed"] == 2
    done = json.loads((tmp_path / "s" / "trial-0000" / "metrics.json").read_text())
    assert done["metrics"]["epochs_run"] == 12
    assert sorted(p.name for p in (tmp_path / "s").glob("trial-*")) == ["trial-0000",
                                                                        "trial-0003"]


@pytest.mark.slow
def test_edge_objectives_keep_a_pareto_front(tmp_path, monkeypatch, capsys):
    """accuracy against int8 latency and size: each trial exported as int8 TFLite and timed."""
    monkeypatch.chdir(tmp_path)
    write_space(tmp_path, "model.width: [0.25, 1.0]\n")
    assert main(["search", *TINY, "epochs=1", "space=space.yaml", "trials=2", "export=false",
                 "objective=accuracy,int8_latency_ms,int8_kb", "sampler=random",
                 "--json", "--quiet"]) == 0
    result = last_json(capsys)
    study = Path(result["run_dir"])
    summary = json.loads((study / "search.json").read_text())
    assert summary["pruner"] == "none (multi-objective)"
    front = summary["pareto_front"]
    assert front and result["metrics"]["pareto_trials"] == len(front)
    for row in front:
        lite = Path(row["run_dir"]) / "export" / f"{Path(row['run_dir']).name}.int8.tflite"
        assert lite.is_file()
        assert row["values"]["int8_kb"] == pytest.approx(lite.stat().st_size / 1024)
        assert row["values"]["int8_latency_ms"] > 0
        assert (study / "pareto" / f"{Path(row['run_dir']).name}.yaml").is_file()
    assert "Pareto front" in (study / "report.md").read_text()
