"""The Flower apps that `federate serve` / `federate client` deploy: a ServerApp and a ClientApp.

Flower's deployment engine runs them in processes of its own: the SuperLink starts the
ServerApp for the run, and each SuperNode starts a ClientApp process per message. Both read the
run's tfkarpa config from Flower's run config (`CONFIG_KEY`, the YAML `serve` sent) and the
client's shard from its node config (`partition-id`), so every process resolves the same
federation (`run.prepare` is deterministic).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml
from flwr.clientapp import ClientApp
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.serverapp import ServerApp

from tfkarpa import config as config_lib
from tfkarpa.errors import TfkarpaError
from tfkarpa.tasks.federate.client import PARTITION_KEY, LocalTrainer, ShardClient

log = logging.getLogger(__name__)

CONFIG_KEY = "tfkarpa-config"  # the run config entry holding the config's YAML
# The directory relative paths in the config mean (the command's working directory): in the
# run config for the server, in each SuperNode's node config for its client.
CWD_KEY = "tfkarpa-cwd"
RESULT_ENV = "TFKARPA_FEDERATE_RESULT"  # where the ServerApp writes the run's result
# A client's own model and data, in its node config; a ClientApp refuses a run of another
# model and writes why to the file in REFUSED_ENV, which the `client` command exits with.
MODEL_KEY = "tfkarpa-model"
REFUSED_ENV = "TFKARPA_FEDERATE_REFUSED"


def describe_model(cfg: config_lib.Config) -> str:
    """What must match between a server and its clients: the model and what it takes in."""
    m = cfg.model
    return (f"{m.name} (width {m.width}, depth {m.depth}, version {m.version}, norm {m.norm}) "
            f"on {cfg.data.source} at {cfg.data.image_size or 'auto'} px")


def config_from(run_config) -> config_lib.Config:
    if CONFIG_KEY not in run_config:
        raise TfkarpaError(f"this Flower run carries no tfkarpa config ('{CONFIG_KEY}'): it was "
                           "not started by `python -m pipelines federate serve`")
    return config_lib.build(base=yaml.safe_load(run_config[CONFIG_KEY]))


server_app = ServerApp()


@server_app.main()
def _serve(grid, context) -> None:
    from tfkarpa import runs
    from tfkarpa.tasks.federate import run as run_lib

    _die_with_parent()
    os.chdir(context.run_config[CWD_KEY])
    # This process's log is what `flwr run --stream` shows `serve`: the rounds' progress.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tfkarpa").setLevel(logging.INFO)
    out = Path(os.environ[RESULT_ENV])
    try:
        result = run_lib.run(config_from(context.run_config), verbose=0, grid=grid)
    except TfkarpaError as err:  # said by `serve`, which exits with it
        runs.atomic_write_json(out, {"error": str(err)})
        raise
    runs.atomic_write_json(out, result)
    log.info("federated run written to %s", result["run_dir"])


def _die_with_parent() -> None:
    """End this ServerApp process when the Flower process that started it is gone. `serve`
    starts the SuperLink so that it dies with `serve` (deploy._die_with_parent), but the
    ServerApp is started by the SuperLink's SuperExec and nothing stops it: a `serve` killed
    mid-round left it waiting on a SuperLink that was gone (seen in the tests). A daemon thread
    watches the parent, as Flower's own parent monitor does, and exits at once (a kill -9, which
    the round checkpoints are made for: the same command resumes) rather than raising into code
    that would wait on the dead SuperLink."""
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, name="tfkarpa-parent-watch", daemon=True).start()


_CLIENTS: dict = {}  # per process: the config's federation and trainer, built once


def _client_fn(context):
    from tfkarpa.tasks.federate import run as run_lib

    text = context.run_config[CONFIG_KEY]
    if CWD_KEY in context.node_config:
        os.chdir(context.node_config[CWD_KEY])
    client = int(context.node_config[PARTITION_KEY])
    cfg = config_from(context.run_config)
    ours, theirs = context.node_config.get(MODEL_KEY), describe_model(cfg)
    if ours is not None and ours != theirs:
        message = (f"client {client} was started for {ours}, but the server at this address "
                   f"trains {theirs}; start the client with the server's recipe and keys")
        if os.environ.get(REFUSED_ENV):
            Path(os.environ[REFUSED_ENV]).write_text(message)
        raise TfkarpaError(message)
    if text not in _CLIENTS:
        fl = run_lib.prepare(cfg)
        with fl.placement.strategy.scope():
            parts = fl.task.build(fl.cfg, fl.data, fl.placement, None, fl.steps)
        trainer = LocalTrainer(fl.cfg, parts.model, fl.data.num_classes, fl.steps)
        _CLIENTS[text] = (fl, trainer)
    fl, trainer = _CLIENTS[text]
    if not 0 <= client < len(fl.shards):
        raise TfkarpaError(f"client --id {client}: the federation has {len(fl.shards)} clients "
                           f"(ids 0-{len(fl.shards) - 1})")
    return ShardClient(trainer, fl.shard_split(client), client).to_client()


def _configured_mods(message, context, call_next):
    """Flower's client mods for this run's config: SecAgg+ masking, DP clipping inside it."""
    fed = config_from(context.run_config).federated
    chain = call_next
    if fed.dp.clip and fed.dp.side == "client":
        chain = _bind(fixedclipping_mod, chain)
    if fed.secure:
        chain = _bind(secaggplus_mod, chain)
    return chain(message, context)


def _bind(mod, call_next):
    return lambda message, context: mod(message, context, call_next)


client_app = ClientApp(client_fn=_client_fn, mods=[_configured_mods])
