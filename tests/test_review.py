"""Review and first run: the quick demo, its report in a real browser, `runs`, `board`, claims.

One `demo quick=true` (under 5 minutes) runs once for the module, as a user would start it: a
separate process with --quiet. Its runs then serve the report, listing and TensorBoard tests.
"""

import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import run_process, started

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    out = run_process([sys.executable, "-m", "pipelines", "demo", "quick=true", "pretrain=true",
                       "--quiet", "--json"], cwd=work, env=env(), text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return {"dir": work, "stdout": out.stdout, "stderr": out.stderr,
            "result": json.loads(out.stdout.strip().splitlines()[-1])}


# Whichever of the demo's tests runs first pays for the module's quick demo (bounded at 900 s).
@pytest.mark.timeout(1200)
@pytest.mark.slow
@pytest.mark.process
def test_quick_demo_runs_every_stage_quietly_and_sums_up(demo):
    work, result = demo["dir"], demo["result"]
    # --quiet: nothing on stderr (no progress, no TensorFlow C++ notices), only the summary.
    assert demo["stderr"].strip() == ""
    summary = demo["stdout"].splitlines()
    assert summary[0].startswith("demo finished in ")
    for key in ("classifier_test_accuracy", "compressed_test_accuracy",
                "tflite_int8_test_accuracy", "tflite_int8_kb", "detector_test_map50",
                "simclr_test_knn_accuracy", "demo_seconds"):
        assert key in result["metrics"], key
        assert any(line.split()[:1] == [key] for line in summary), key
    for key in ("classifier_run", "compressed_run", "detector_run", "simclr_run"):
        assert (work / result["artifacts"][key] / "metrics.json").is_file(), key
    for key in ("saved_model", "tflite_int8", "qat_tflite_int8", "benchmark", "report_html",
                "report_md"):
        assert (work / result["artifacts"][key]).exists(), key
    lite = work / result["artifacts"]["tflite_int8"]
    assert lite.read_bytes()[4:8] == b"TFL3"
    assert (lite.parent / f"{lite.name}.eval" / "test" / "report.json").is_file()
    exports = json.loads((work / "runs" / "demo" / "exports.json").read_text())
    assert {"saved_model", "tflite_none", "tflite_int8"} <= set(exports)
    assert exports["tflite_int8"]["check"]["top1_agreement"] > 0.5


@pytest.mark.timeout(1200)  # may pay for the quick demo
@pytest.mark.slow
@pytest.mark.process
def test_markdown_report_links_every_figure_and_has_each_section(demo):
    report = demo["dir"] / "runs" / "demo-report"
    md = (report / "report.md").read_text()
    links = re.findall(r"\]\((report_files/[^)]+\.png)\)", md)
    assert len(links) >= 15 and len(set(links)) == len(links)
    for link in links:
        assert (report / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link
    for heading in ("## Run demo", "## Run demo-prune50-qat", "## Run demo-detect",
                    "## Run demo-simclr", "### Training curves", "### Test results",
                    "### Test results (COCO)", "### Artifacts: size, accuracy, latency",
                    "### Export parity", "### Data", "### Configuration"):
        assert heading in md, heading
    assert "| mAP@0.5 |" in md and "| circle |" in md
    # No temporary files left; the one hidden file is the record of what tfkarpa wrote there.
    assert [p.name for p in report.glob(".*")] == [".tfkarpa-files.json"]


def _browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium and chromium-driver are missing: `make test` installs them")
        pytest.skip("needs Debian's chromium and chromium-driver (`make test` installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1200,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.mark.timeout(1200)  # may pay for the quick demo
@pytest.mark.slow
@pytest.mark.process
def test_html_report_shows_every_image_and_table_in_chromium(demo, tmp_path):
    report = demo["dir"] / "runs" / "demo-report"
    html = report / "report.html"
    # Self-contained: the page must render from a folder holding nothing else.
    alone = tmp_path / "report.html"
    shutil.copy(html, alone)
    figures = len(list((report / "report_files").glob("*.png")))
    driver = _browser()
    try:
        driver.get(alone.as_uri())
        found = driver.execute_script("""
            const imgs = [...document.images];
            return {images: imgs.length,
                    decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
                    external: imgs.filter(i => !i.src.startsWith('data:image/png')).length,
                    tables: [...document.querySelectorAll('table')].map(
                        t => t.querySelectorAll('tbody tr').length),
                    headings: [...document.querySelectorAll('h2')].map(h => h.textContent),
                    title: document.title};""")
        driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()
    assert found["images"] == figures and found["decoded"] == figures
    assert found["external"] == 0
    assert len(found["tables"]) >= 20 and min(found["tables"]) >= 1
    assert found["headings"] == [f"Run {n}" for n in
                                 ("demo", "demo-prune50", "demo-prune50-qat", "demo-detect",
                                  "demo-simclr")]
    assert found["title"].startswith("tfkarpa report")
    assert (tmp_path / "report.png").stat().st_size > 10_000


@pytest.mark.timeout(1200)  # may pay for the quick demo
@pytest.mark.slow
@pytest.mark.process
def test_runs_lists_every_run_as_text_and_json(demo, capsys):
    """`runs` through the verbs' entry point in this process: it reads files only."""
    from pipelines.__main__ import main

    runs_dir = demo["dir"] / "runs"
    assert main(["runs", str(runs_dir), "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(listed) == {"demo", "demo-prune50", "demo-prune50-qat", "demo-detect", "demo-simclr"}
    assert {r["status"] for r in listed.values()} == {"finished"}
    assert listed["demo-detect"]["task"] == "detect" and listed["demo-detect"]["metric"] == "test_map"
    assert listed["demo-prune50-qat"]["stages"] == ["prune", "qat"]
    assert listed["demo"]["params"] > 0 and listed["demo"]["size_bytes"] > 0
    assert main(["runs", str(runs_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["run", "task", "data", "model"]
    assert any(line.startswith("demo-simclr ") and "pretrain" in line for line in lines)
    assert lines[-1] == f"5 run(s) under {runs_dir}"
    assert main(["runs", str(runs_dir / "nope")]) == 1
    assert "nope" in capsys.readouterr().err


def _get(url, data=None):
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.timeout(1200)  # may pay for the quick demo
@pytest.mark.slow
@pytest.mark.process
def test_board_serves_scalars_images_and_hparams_then_stops(demo):
    runs_dir = demo["dir"] / "runs"
    with started([sys.executable, "-m", "pipelines", "board", str(runs_dir)], env=env(),
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as board:
        line = board.stdout.readline()
        url = re.search(r"http://\S+/", line).group(0)
        assert url.startswith("http://localhost:")
        deadline = time.time() + 60
        while True:  # TensorBoard loads the event files in the background
            scalars = _get(url + "data/plugin/scalars/tags")
            if "demo-simclr/logs" in scalars or time.time() > deadline:
                break
            time.sleep(1)
        assert "epoch_loss" in scalars["demo/logs/train"]
        assert "epoch_accuracy" in scalars["demo/logs/validation"]
        assert "final/test_accuracy" in scalars["demo/logs"]
        assert "final/test_map" in scalars["demo-detect/logs"]
        images = _get(url + "data/plugin/images/tags")
        assert "augmented_training_images" in images["demo/logs/train"]
        experiment = _get(url + "data/plugin/hparams/experiment",
                          json.dumps({"experimentName": ""}).encode())
        hparams = {h["name"] for h in experiment["hparamInfos"]}
        assert {"task", "model.name", "data.source", "epochs", "optimizer.lr"} <= hparams
        sessions = _get(url + "data/plugin/hparams/session_groups", json.dumps({
            "experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"],
            "colParams": [], "startIndex": 0, "sliceSize": 100}).encode())
        assert sessions["totalSize"] == 5
        tasks = {g["hparams"]["task"] for g in sessions["sessionGroups"]}
        assert tasks == {"classify", "detect", "pretrain"}
        board.send_signal(signal.SIGINT)
        out, _ = board.communicate(timeout=30)
        assert board.returncode == 0 and "board: stopped" in out


def _claim_same_name(root, barrier, queue):
    from tfkarpa import runs

    barrier.wait()
    run = runs.claim(str(root), "same", "", {"seed": 1})
    (run.dir / "config.yaml").write_text("seed: 1\n")
    queue.put(str(run.dir))
    time.sleep(1.0)  # hold the claim while the others look for a directory
    run.release()


@pytest.mark.process
def test_same_name_runs_started_together_get_their_own_directories(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(4), ctx.Queue()
    workers = [ctx.Process(target=_claim_same_name, args=(tmp_path, barrier, queue))
               for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    dirs = sorted(queue.get(timeout=5) for _ in workers)
    assert len(set(dirs)) == 4
    assert {Path(d).name for d in dirs} == {"same", "same-2", "same-3", "same-4"}


@pytest.mark.parametrize("args, message", [
    (["quick=maybe"], "'quick' must be true or false"),
    (["budget=soon"], "'budget' must be a number of minutes"),
    (["budget=0"], "'budget' must be a positive number"),
    (["pretrain=sometimes"], "'pretrain' must be auto, true or false"),
    (["quik=true"], "did you mean 'quick'"),
])
def test_bad_demo_options_exit_1_with_the_option_named(args, message, capsys, tmp_path,
                                                         monkeypatch):
    from pipelines.__main__ import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", *args]) == 1
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_report_refuses_what_is_not_a_run(tmp_path, capsys):
    from pipelines.__main__ import main

    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 1
    assert "is not a run directory (no config.yaml)" in capsys.readouterr().err
    assert list((tmp_path / "empty").iterdir()) == []
