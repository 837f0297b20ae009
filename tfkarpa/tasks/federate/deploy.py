"""Server and clients as processes of their own, on Flower's deployment engine.

`serve(cfg)` starts a SuperLink on `federated.address` and submits the run (`flwr run`) with
the config inside it; the SuperLink starts the ServerApp (`apps.server_app`), which runs the
same rounds, checkpoints and run directory as the in-process federation. `client(cfg, id)`
starts a SuperNode holding shard `id`; it runs a ClientApp process per message from the
server. Start the server and the clients with the same recipe and keys, in any order.

Flower 1.42 speaks HTTP between SuperNodes and the SuperLink (its Fleet API), not gRPC.
Everything Flower keeps on disk (the app it installs, its connection file) goes into a
temporary FLWR_HOME per command, so a user's ~/.flwr is never touched.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tfkarpa import config as config_lib
from tfkarpa import runs
from tfkarpa.errors import TfkarpaError
from tfkarpa.tasks.federate import run as run_lib
from tfkarpa.tasks.federate.apps import (CONFIG_KEY, CWD_KEY, MODEL_KEY, REFUSED_ENV,
                                         RESULT_ENV, describe_model)
from tfkarpa.tasks.federate.client import PARTITION_KEY

log = logging.getLogger(__name__)

# The ServerApp's lines `serve` passes on (the rest is Flower's and TensorFlow's chatter).
_PROGRESS = re.compile(r"(round \d+/\d+:.*|resuming .*|starting run .*|error: .*|Traceback.*)")
_START_SECONDS = 60  # a SuperLink that does not listen by then has failed
_GONE_SECONDS = 3  # a server silent this long has gone (restarts take longer: TensorFlow loads)


def _address(cfg) -> tuple[str, int]:
    host, _, port = cfg.federated.address.rpartition(":")
    if not host or not port.isdigit():
        raise TfkarpaError(f"config key 'federated.address': '{cfg.federated.address}' is not "
                           "HOST:PORT")
    return host, int(port)


def _flower(name: str) -> str:
    """A Flower command of this Python's environment."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def _environment(home: Path) -> dict:
    env = dict(os.environ, FLWR_HOME=str(home))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _app_dir(home: Path, cfg: config_lib.Config) -> Path:
    """A Flower app project naming tfkarpa's apps, with the config in its run config."""
    app = home / "app"
    (app / "tfkarpa_federation").mkdir(parents=True)
    (app / "tfkarpa_federation" / "__init__.py").write_text("")
    text = config_lib.dump(cfg).replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    (app / "pyproject.toml").write_text(f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tfkarpa-federation"
version = "1.0.0"
description = "tfkarpa federated training"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["tfkarpa_federation"]

[tool.flwr.app]
publisher = "tfkarpa"

[tool.flwr.app.components]
serverapp = "tfkarpa.tasks.federate.apps:server_app"
clientapp = "tfkarpa.tasks.federate.apps:client_app"

[tool.flwr.app.config]
"{CWD_KEY}" = "{_toml_string(os.getcwd())}"
"{CONFIG_KEY}" = """
{text}"""
''')
    return app


def _toml_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _wait_listening(host: str, port: int, process: subprocess.Popen, what: str, logfile: Path):
    deadline = time.time() + _START_SECONDS
    while time.time() < deadline:
        if process.poll() is not None:
            raise TfkarpaError(f"{what} exited with status {process.returncode} at start; its "
                               f"log: {_tail(logfile)}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise TfkarpaError(f"{what} did not listen on {host}:{port} within {_START_SECONDS} s")


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(none)"


def _stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    try:  # the whole process group: Flower's own children (SuperExec, apps) with it
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _follow(command: list[str], env: dict) -> list[str]:
    """Run `flwr run --stream`, passing the ServerApp's progress lines on; all its lines."""
    lines = []
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, preexec_fn=_die_with_parent) as process:
        for line in process.stdout:
            line = line.rstrip()
            lines.append(line)
            if _PROGRESS.search(line):
                log.info("server: %s", _PROGRESS.search(line).group(0))
    return lines


def serve(cfg: config_lib.Config) -> dict:
    """Run the federation's server until its rounds are done: {run_dir, artifacts, metrics}."""
    fl = run_lib.prepare(cfg)  # every mistake in the config or data, before anything starts
    host, port = _address(cfg)
    home = Path(tempfile.mkdtemp(prefix="tfkarpa-flwr-server-"))
    env = _environment(home)
    env[RESULT_ENV] = str(home / "result.json")
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "tfkarpa"\n\n[superlink.tfkarpa]\naddress = "{host}:{port}"\n'
        "insecure = true\n")
    link = None
    try:
        app = _app_dir(home, cfg)
        link_log = home / "superlink.log"
        with open(link_log, "w") as out:
            link = subprocess.Popen(
                [_flower("flower-superlink"), "--insecure", "--host", host, "--port", str(port),
                 "--disable-runtime-dependency-installation"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent)
        _wait_listening(host, port, link, "the Flower SuperLink", link_log)
        fed = fl.cfg.federated
        log.info("server listening on %s:%d for %d clients; start each with `python -m "
                 "pipelines federate client --id N` and this command's recipe and keys",
                 host, port, fed.clients)
        said = _follow([_flower("flwr"), "run", str(app), "tfkarpa", "--stream"], env)
        result = runs.read_json(home / "result.json")
        if not result:
            raise TfkarpaError("the federated run ended without a result; Flower said: "
                               f"{' | '.join(said[-12:])}")
        if result.get("error"):
            raise TfkarpaError(result["error"])
        return result
    finally:
        _stop(link)
        shutil.rmtree(home, ignore_errors=True)


def client(cfg: config_lib.Config, client_id: int) -> dict:
    """Serve shard `client_id` to the server at `federated.address` until it has been gone for
    `federated.round_timeout` seconds. A server that restarts (and resumes its run) is joined
    again: Flower's SuperNode exits when its SuperLink goes, so it is started anew."""
    fed = cfg.federated
    if not 0 <= client_id < fed.clients:
        raise TfkarpaError(f"client --id {client_id}: the federation has {fed.clients} clients "
                           f"(ids 0-{fed.clients - 1})")
    run_lib.prepare(cfg)  # the same checks as the server: a bad config fails here, not there
    host, port = _address(cfg)
    home = Path(tempfile.mkdtemp(prefix=f"tfkarpa-flwr-client{client_id}-"))
    started, joins, node = time.time(), 0, None
    log.info("client %d of %d serving its shard to %s:%d (stops once the server has been gone "
             "%d s)", client_id, fed.clients, host, port, fed.round_timeout)
    try:
        while _reachable(host, port, fed.round_timeout):
            joins += 1
            node = _supernode(cfg, client_id, host, port, home)
            silent = 0  # seconds in a row the server has not answered
            while node.poll() is None and silent < _GONE_SECONDS:
                if (home / "refused.txt").is_file():  # the server trains another model
                    raise TfkarpaError((home / "refused.txt").read_text())
                silent = 0 if _reachable(host, port, 0) else silent + 1
                time.sleep(1)
            # A SuperLink that went away forgot this SuperNode; one started again must not
            # find it retrying with its old registration, so a new one joins.
            _stop(node)
            log.info("client %d: the connection to %s:%d ended; waiting for the server",
                     client_id, host, port)
        return {"run_dir": None, "artifacts": {}, "metrics": {
            "client": client_id, "joins": joins, "seconds": round(time.time() - started, 1)},
            "lines": [f"  client {client_id}: the server at {host}:{port} has been gone "
                      f"{fed.round_timeout} s; Flower's last words: "
                      f"{_tail(home / 'supernode.log', 2)}"]}
    finally:
        _stop(node)
        shutil.rmtree(home, ignore_errors=True)


def _reachable(host: str, port: int, patience: float) -> bool:
    """Whether the server listens, waiting up to `patience` seconds for it."""
    deadline = time.time() + patience
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            if time.time() > deadline:
                return False
            time.sleep(1)


def _supernode(cfg, client_id: int, host: str, port: int, home: Path) -> subprocess.Popen:
    with socket.socket() as s:  # the SuperNode's own local API: any free port
        s.bind(("127.0.0.1", 0))
        runtime_port = s.getsockname()[1]
    with open(home / "supernode.log", "a") as out:
        return subprocess.Popen(
            [_flower("flower-supernode"), "--insecure", "--superlink", f"{host}:{port}",
             "--node-config", f"{PARTITION_KEY}={client_id} num-partitions="
             f'{cfg.federated.clients} {CWD_KEY}="{_toml_string(os.getcwd())}" '
             f'{MODEL_KEY}="{_toml_string(describe_model(cfg))}"',
             "--port", str(runtime_port), "--max-wait-time", str(cfg.federated.round_timeout)],
            env=dict(_environment(home), **{REFUSED_ENV: str(home / "refused.txt")}), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    """In a child before exec: Linux sends it SIGTERM when this process dies, even by SIGKILL,
    so no Flower process outlives the command that started it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the children are stopped in `finally` only
        pass
