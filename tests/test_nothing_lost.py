"""Nothing of the user's is ever deleted, replaced or read from outside (issue 32).

Every verb that writes is pointed at a folder holding a stranger's file: the file survives
untouched (content and mtime) and the command either refuses, naming the path, or writes beside
it; and the same command run again over its own earlier output still works. Then the paths a
data file names, run names, a resume whose backup was lost, and two runs started together.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, refused, stranger_file, tiny_config, untouched, write_image_folder
from PIL import Image

from pipelines.__main__ import main
from tfkarpa import config, runs
from tfkarpa.errors import TfkarpaError


# ------------------------------------------------------------------------------ the rule

def test_an_output_folder_is_replaced_only_when_it_is_tfkarpas_own_of_that_kind(tmp_path):
    stranger = stranger_file(tmp_path / "out")
    with pytest.raises(TfkarpaError, match=r"out' holds files \('mine.txt'\)"):
        with runs.atomic_dir(tmp_path / "out", "predictions") as tmp:
            (tmp / "a.png").write_bytes(b"x")
    untouched(stranger)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left beside

    for content in ("first", "second"):  # its own earlier output: replaced whole
        with runs.atomic_dir(tmp_path / "own", "predictions") as tmp:
            (tmp / f"{content}.txt").write_text(content)
    assert sorted(p.name for p in (tmp_path / "own").iterdir()) == [runs.OUTPUT_MARK,
                                                                    "second.txt"]
    with pytest.raises(TfkarpaError, match="another kind of tfkarpa output"):
        with runs.atomic_dir(tmp_path / "own", "tfrecord"):
            pass
    (tmp_path / "empty").mkdir()  # an empty folder holds nothing to lose
    with runs.atomic_dir(tmp_path / "empty", "predictions") as tmp:
        (tmp / "a.txt").write_text("a")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(TfkarpaError, match="exists and is not a folder"):
        runs.check_output_dir(tmp_path / "a_file", "predictions", "predict out")


def test_a_file_written_beside_others_replaces_only_its_own_earlier_self(tmp_path):
    stranger = stranger_file(tmp_path, "report.md")
    with pytest.raises(TfkarpaError, match="report.md' exists, which tfkarpa did not write"):
        runs.atomic_write_text(tmp_path / "report.md", "mine", kind="report")
    untouched(stranger)
    runs.atomic_write_text(tmp_path / "report.html", "1", kind="report")
    runs.atomic_write_text(tmp_path / "report.html", "2", kind="report")
    assert (tmp_path / "report.html").read_text() == "2"


def test_a_swap_checks_again_after_the_work(tmp_path):
    """Someone's file appearing in the target while the output was being made is kept."""
    with pytest.raises(TfkarpaError, match="holds files"):
        with runs.atomic_dir(tmp_path / "out", "predictions") as tmp:
            (tmp / "a.txt").write_text("a")
            stranger = stranger_file(tmp_path / "out")
    untouched(stranger)


# ------------------------------------------------------------------------------ each verb

def test_train_export_dir_holding_a_strangers_file_is_refused_before_training(tmp_path,
                                                                              capsys):
    target = tmp_path / "exports"
    stranger = stranger_file(target)
    (target / "old").mkdir()
    refused(capsys, ["train", *TINY, f"runs_root={tmp_path / 'runs'}",
                      f"export_dir={target}"], target)
    untouched(stranger)
    assert (target / "old").is_dir()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_federate_export_dir_holding_a_strangers_file_is_refused_before_any_round(tmp_path,
                                                                                  capsys):
    target = tmp_path / "exports"
    stranger = stranger_file(target)
    refused(capsys, ["federate", *TINY, "federated.clients=2", "federated.rounds=1",
                      f"runs_root={tmp_path / 'runs'}", f"export_dir={target}"], target)
    untouched(stranger)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.slow
def test_train_export_dir_over_its_own_earlier_export_replaces_it(tmp_path, capsys):
    target = tmp_path / "exports" / "model"
    argv = ["train", *TINY, "epochs=1", f"runs_root={tmp_path / 'runs'}",
            f"export_dir={target}", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    first = json.loads((target / "tfkarpa.json").read_text())["run_dir"]
    assert main(argv) == 0, capsys.readouterr().err  # a second run (numbered), same export_dir
    assert json.loads((target / "tfkarpa.json").read_text())["run_dir"] != first


@pytest.mark.slow
def test_export_writes_beside_a_strangers_file_and_replaces_its_own(trained_run, tmp_path,
                                                                    capsys):
    out = tmp_path / "exports"
    stranger = stranger_file(out)
    name = Path(trained_run["run_dir"]).name
    argv = ["export", trained_run["run_dir"], "formats=saved_model", f"out={out}", "check=8",
            "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    assert main(argv) == 0, capsys.readouterr().err  # over its own earlier export
    assert (out / name / "saved_model.pb").is_file()
    untouched(stranger)
    taken = stranger_file(tmp_path / "taken" / name)  # the export's own folder is someone's
    refused(capsys, argv[:3] + [f"out={tmp_path / 'taken'}", "check=8"], tmp_path / "taken" / name)
    untouched(taken)


@pytest.mark.slow
def test_evaluate_refuses_a_strangers_folder_and_replaces_its_own(trained_run, tmp_path,
                                                                  capsys):
    out = tmp_path / "reports"
    stranger = stranger_file(out)
    refused(capsys, ["evaluate", trained_run["run_dir"], f"out={out}"], out)
    untouched(stranger)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    own = tmp_path / "own"
    for _ in range(2):
        assert main(["evaluate", trained_run["run_dir"], f"out={own}", "--quiet"]) == 0
    assert (own / "report.md").is_file()


@pytest.mark.slow
def test_report_writes_beside_a_strangers_file_but_not_over_it(trained_run, tmp_path, capsys):
    out = tmp_path / "report"
    stranger = stranger_file(out)
    for _ in range(2):  # the second time over its own report
        assert main(["report", trained_run["run_dir"], f"out={out}", "--quiet"]) == 0
    untouched(stranger)
    assert (out / "report.html").is_file()
    theirs = stranger_file(tmp_path / "theirs", "report.md")
    refused(capsys, ["report", trained_run["run_dir"], f"out={tmp_path / 'theirs'}"],
             tmp_path / "theirs" / "report.md")
    untouched(theirs)
    assert sorted(p.name for p in (tmp_path / "theirs").iterdir()) == ["report.md"]


def test_classifier_predict_refuses_out_it_would_ignore(trained_run, tmp_path, capsys):
    out = tmp_path / "pred"
    stranger = stranger_file(out)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    err = refused(capsys, ["predict", trained_run["run_dir"], str(image), f"out={out}"],
                   "predict option 'out'")
    assert "for detectors" in err
    untouched(stranger)


def test_data_convert_refuses_a_strangers_folder_and_replaces_its_own(tmp_path, capsys):
    source = write_image_folder(tmp_path / "images", per_class=4, size=8)
    out = tmp_path / "shards"
    stranger = stranger_file(out)
    refused(capsys, ["data", "convert", f"folder:{source}", f"out={out}"], out)
    untouched(stranger)
    own = tmp_path / "own"
    for _ in range(2):
        assert main(["data", "convert", f"folder:{source}", f"out={own}", "shards=1",
                     "--quiet"]) == 0
    assert json.loads((own / "dataset.json").read_text())["format"]


def test_search_refuses_a_strangers_folder_as_its_study(tmp_path, capsys, monkeypatch):
    """A study writes study.json, study.db, report.md and trial folders into study=DIR: a
    folder of someone's files is refused before any trial, and left as it was."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text("optimizer.lr: uniform(0.1, 1)\n")
    folder = tmp_path / "notes"
    stranger = stranger_file(folder, "report.md")
    refused(capsys, ["search", *TINY, "space=space.yaml", "trials=1", f"study={folder}"],
             folder)
    untouched(stranger)
    assert sorted(p.name for p in folder.iterdir()) == ["report.md"]


# ------------------------------------------------------------------------------ paths in files

def test_multitask_csv_paths_may_not_climb_out_of_the_files_folder(tmp_path):
    from tfkarpa.tasks.multitask.data import read_table

    folder = tmp_path / "data"
    write_image_folder(folder, per_class=1, size=8)
    outside = write_image_folder(tmp_path / "elsewhere", per_class=1, size=8)
    table = folder / "table.csv"
    cfg = config.build(overrides=["task=multitask"])
    for bad in ("../elsewhere/cat/0.png", str(outside / "cat" / "0.png"),
                "cat/../../elsewhere/cat/0.png"):
        table.write_text(f"image,kind\ncat/0.png,cat\n{bad},dog\n")
        with pytest.raises(TfkarpaError, match=rf"table.csv, line 3: path '{bad}' leaves"):
            read_table(str(table), cfg)
    # A symlink the user placed inside their own folder is their data.
    (folder / "linked").symlink_to(outside / "dog", target_is_directory=True)
    table.write_text("image,kind\ncat/0.png,cat\nlinked/0.png,dog\ncat/../dog/0.png,dog\n")
    files, *_ = read_table(str(table), cfg)
    assert len(files) == 3


# ------------------------------------------------------------------------------ names, locks

@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".", "/abs"])
def test_a_run_name_is_one_folder_refused_by_key(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY, f"name={name}", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "config key 'name'" in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TfkarpaError, match="is not one folder name"):
        runs.claim(str(tmp_path / "runs"), name, "", {})


def test_a_run_dir_claimed_this_moment_by_a_twin_is_in_use_not_different(tmp_path):
    """The twin holds the lock but has not written its config yet (it loads data first): the
    second claim is told the folder is in use, not that it holds a different run."""
    import fcntl

    directory = tmp_path / "run"
    directory.mkdir()
    fd = os.open(directory / runs.LOCK, os.O_CREAT | os.O_RDWR)  # the twin's lock, its own
    try:                                                         # open file: a second holder
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(TfkarpaError, match="is in use by another process"):
            runs.claim("", "x", str(directory), {"a": 1})
        (directory / "logs").mkdir()  # its first files, still no config
        with pytest.raises(TfkarpaError, match="is in use by another process"):
            runs.claim("", "x", str(directory), {"a": 1})
        runs.atomic_write_text(directory / "config.yaml", "a: 1\n")  # then the same config
        with pytest.raises(TfkarpaError, match="is in use by another process"):
            runs.claim("", "x", str(directory), {"a": 1})
    finally:
        os.close(fd)
    (directory / "config.yaml").write_text("a: 2\n")  # nobody holds it: a different run
    with pytest.raises(TfkarpaError, match="holds a different, unfinished run"):
        runs.claim("", "x", str(directory), {"a": 1})
