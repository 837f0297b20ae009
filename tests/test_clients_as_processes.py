"""Federated server and clients as processes of their own (Flower's deployment engine): a
server and three client processes on 127.0.0.1; a client killed mid-run does not stop the
rounds (the rest meet min_fit_clients), and a killed server resumes from its last round with
the same command. Minutes of waiting: Flower notices a dead client after two missed heartbeats
(about 60 s). Its SuperNodes send them every 30 s, a constant of Flower 1.42's
(HEARTBEAT_DEFAULT_INTERVAL) that no flag or environment variable sets, and its SuperLink
refuses intervals under 10 s, so the tests cannot shorten that wait.

Every command runs in a process group of its own (conftest.started / run_process), killed when
its test ends however it ends; the Flower processes each command starts (in sessions of their
own) die with it (deploy._die_with_parent), which each test checks at its end."""

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import run_process, started

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

pytestmark = [pytest.mark.process, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _federate(args) -> list[str]:
    return [sys.executable, "-m", "pipelines", "federate", *args]


@contextlib.contextmanager
def _running(args, cwd: Path, log: Path):
    """`federate ARGS` with its output in `log`, killed with its process group at the end."""
    with open(log, "w") as out, started(_federate(args), cwd=cwd, stdout=out,
                                        stderr=subprocess.STDOUT, env=ENV) as proc:
        yield proc


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else "(no log)"


def _wait_for_round(record: Path, number: int, timeout: float, server, log: Path) -> dict:
    """round.json once it records round `number`; fails at once if the server has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited ({server.returncode}) before round "
                                 f"{number}: {_tail(log)}")
        if record.is_file():
            done = json.loads(record.read_text())
            if done["round"] >= number:
                return done
        time.sleep(1)
    raise AssertionError(f"round {number} was not checkpointed within {timeout} s: {_tail(log)}")


def _wait_port_closed(port: int, timeout: float) -> None:
    """Until nothing listens on `port` (a killed server's SuperLink has let it go)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                time.sleep(0.5)
        except OSError:
            return
    raise AssertionError(f"127.0.0.1:{port} still listens {timeout} s after its server died")


def _kill_like_a_device(proc) -> None:
    """SIGKILL a client command and all it started, its Flower SuperNode first: a device that
    loses power says no goodbye, and the SuperNode would, given the SIGTERM its command's death
    sends it (deploy._die_with_parent)."""
    for child in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _assert_nothing_left(port: int, grace: float = 30) -> None:
    """No process with this test's address on its command line (Flower's SuperLink and
    SuperNodes, started in sessions of their own) outlives the commands that started it. Any
    found after `grace` seconds is killed, then reported."""
    marks = (f"127.0.0.1:{port}", f"--host 127.0.0.1 --port {port} ")  # SuperNode, SuperLink
    deadline = time.monotonic() + grace
    while True:
        left = [p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid() and any(
            m in " ".join(p.info["cmdline"] or ()) + " " for m in marks)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1)
    lines = []
    for p in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            lines.append(" ".join(p.cmdline())[:200])
            p.kill()
    assert not lines, f"left running after the test's commands ended: {lines}"


# About ten TensorFlow start-ups (the commands, the ServerApps, a ClientApp per client and round)
# and Flower's minute to notice the dead client: minutes; with other tests sharing the 2 cores,
# a start-up took 2 minutes and round 1 over 5. Each wait below bounds one step of it.
@pytest.mark.timeout(1500)
def test_processes_survive_a_killed_client_and_a_restarted_server(tmp_path):
    port = _free_port()
    # round_timeout: the longest a round waits for replies; it must outlast Flower's minute to
    # notice the dead client plus the others' TensorFlow start-ups, under load.
    args = ["data.count=240", "data.image_size=16", "model.width=0.25", "batch_size=32",
            "clients=3", "rounds=3", "fraction=1.0", "local_epochs=1", "min_fit_clients=2",
            f"federated.address=127.0.0.1:{port}", "federated.round_timeout=240",
            f"runs_root={tmp_path / 'runs'}", "export=false"]
    run = tmp_path / "runs" / "shapes-small_cnn-fed"
    record = run / "checkpoints" / "round.json"
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(_running(["serve", *args], tmp_path, tmp_path / "serve1.log"))
        clients = [stack.enter_context(_running(["client", "--id", str(i), *args], tmp_path,
                                                tmp_path / f"c{i}.log")) for i in range(3)]
        _wait_for_round(record, 1, 480, server, tmp_path / "serve1.log")
        _kill_like_a_device(clients[2])
        done = _wait_for_round(record, 2, 480, server, tmp_path / "serve1.log")
        assert (done["rows"][1]["clients"], done["rows"][1]["failures"]) == (2, 1)
        server.send_signal(signal.SIGKILL)  # the server dies after round 2's checkpoint
        server.wait(timeout=30)
        _wait_port_closed(port, 30)
        again = stack.enter_context(_running(["serve", *args], tmp_path, tmp_path / "serve2.log"))
        assert again.wait(timeout=480) == 0, _tail(tmp_path / "serve2.log")
    log = (tmp_path / "serve2.log").read_text()
    assert "resuming after round 2" in log
    with open(run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    # Round 3 with the two left: the restarted server's SuperLink never knew client 2.
    assert [(r["epoch"], r["clients"], r["failures"]) for r in rows] == [
        ("0", "3", "0"), ("1", "2", "1"), ("2", "2", "0")]
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert metrics["rounds"] == 3 and 0 <= metrics["test_accuracy"] <= 1
    _assert_nothing_left(port)


# Four TensorFlow start-ups (two commands, the ServerApp, the ClientApp), then one refused
# round: 4.5 minutes with other tests sharing the 2 cores.
@pytest.mark.timeout(600)
def test_a_client_of_another_model_is_refused_with_a_message(tmp_path):
    port = _free_port()
    # round_timeout (default 600): how long the server's round waits for the ClientApp, whose
    # TensorFlow start-up took 2 minutes on busy cores (a round that ends first takes the
    # SuperLink away before the refusal), and how long the client waits for a server that does
    # not answer before it exits 0, which fails the test at once.
    common = ["data.count=240", "data.image_size=16", "batch_size=32", "clients=1", "rounds=1",
              "fraction=1.0", f"federated.address=127.0.0.1:{port}",
              "federated.round_timeout=240", f"runs_root={tmp_path / 'runs'}", "export=false"]
    with _running(["serve", *common, "model.width=0.25"], tmp_path, tmp_path / "serve.log"):
        client = run_process(_federate(["client", "--id", "0", *common, "model.width=0.5"]),
                             timeout=480, cwd=tmp_path, text=True, env=ENV)
    assert client.returncode == 1, client.stderr[-3000:]
    assert "client 0 was started for small_cnn (width 0.5" in client.stderr
    assert "the server at this address trains small_cnn (width 0.25" in client.stderr
    _assert_nothing_left(port)
