"""Federated server and clients as processes of their own (Flower's deployment engine): a
server and three client processes on 127.0.0.1; a client killed mid-run does not stop the
rounds (the rest meet min_fit_clients), and a killed server resumes from its last round with
the same command. Minutes of waiting: Flower notices a dead client after two missed heartbeats
(about 60 s)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, cwd, log):
    return subprocess.Popen([sys.executable, "-m", "pipelines", "federate", *args], cwd=cwd,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def _wait_for_round(record: Path, number: int, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if record.is_file():
            done = json.loads(record.read_text())
            if done["round"] >= number:
                return done
        time.sleep(1)
    raise AssertionError(f"round {number} was not checkpointed within {timeout} s")


def test_processes_survive_a_killed_client_and_a_restarted_server(tmp_path):
    port = _free_port()
    args = ["data.count=240", "data.image_size=16", "model.width=0.25", "batch_size=32",
            "clients=3", "rounds=3", "fraction=1.0", "local_epochs=1", "min_fit_clients=2",
            f"federated.address=127.0.0.1:{port}", "federated.round_timeout=240",
            f"runs_root={tmp_path / 'runs'}", "export=false"]
    procs = []
    try:
        server = _start(["serve", *args], tmp_path, tmp_path / "serve1.log")
        procs.append(server)
        clients = [_start(["client", "--id", str(i), *args], tmp_path, tmp_path / f"c{i}.log")
                   for i in range(3)]
        procs += clients
        record = tmp_path / "runs" / "shapes-small_cnn-fed" / "checkpoints" / "round.json"
        _wait_for_round(record, 1, 300)
        # Client 2 dies as a device does: its Flower SuperNode and its command, by SIGKILL.
        subprocess.run(["pkill", "-9", "-f", f"127.0.0.1:{port} --node-config partition-id=2"])
        clients[2].send_signal(signal.SIGKILL)
        done = _wait_for_round(record, 2, 300)
        assert done["rows"][1]["clients"] == 2 and done["rows"][1]["failures"] == 1
        server.send_signal(signal.SIGKILL)  # the server dies after round 2's checkpoint
        server.wait()
        time.sleep(2)
        again = _start(["serve", *args], tmp_path, tmp_path / "serve2.log")
        procs.append(again)
        assert again.wait(timeout=400) == 0, (tmp_path / "serve2.log").read_text()[-3000:]
        log = (tmp_path / "serve2.log").read_text()
        assert "resuming after round 2" in log
        run = tmp_path / "runs" / "shapes-small_cnn-fed"
        rows = (run / "history.csv").read_text().strip().splitlines()
        assert len(rows) == 4 and rows[-1].split(",")[-2] == "2"  # round 3 with the two left
        metrics = json.loads((run / "metrics.json").read_text())["metrics"]
        assert metrics["rounds"] == 3 and 0 <= metrics["test_accuracy"] <= 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        subprocess.run(["pkill", "-9", "-f", f"127.0.0.1:{port}"])


def test_a_client_of_another_model_is_refused_with_a_message(tmp_path):
    port = _free_port()
    common = ["data.count=240", "data.image_size=16", "batch_size=32", "clients=1", "rounds=1",
              "fraction=1.0", f"federated.address=127.0.0.1:{port}",
              f"runs_root={tmp_path / 'runs'}", "export=false"]
    server = _start(["serve", *common, "model.width=0.25"], tmp_path, tmp_path / "serve.log")
    try:
        client = subprocess.run(
            [sys.executable, "-m", "pipelines", "federate", "client", "--id", "0", *common,
             "model.width=0.5"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert client.returncode == 1
        assert "client 0 was started for small_cnn (width 0.5" in client.stderr
        assert "the server at this address trains small_cnn (width 0.25" in client.stderr
    finally:
        server.kill()
        subprocess.run(["pkill", "-9", "-f", f"127.0.0.1:{port}"])
