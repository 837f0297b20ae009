"""A federated training run: clients that keep their shards, a server that aggregates, and at
the end an ordinary classification run directory.

`run(cfg)` shares the training split among `federated.clients` clients (`partition`), builds the
classifier as every classify run does, and runs `federated.rounds` rounds of Flower (`server`,
`client`) with the clients in this process (`simulation`). After each round the server
evaluates the global model on the validation and test splits, appends a row to history.csv,
writes TensorBoard scalars and checkpoints the global weights with the round's number; the same
command after a crash goes on from the last round written. The finished run is the classify
task's: final weights, test report, checked SavedModel, so `export`, `evaluate`, `compress`,
`report` and `benchmark` take it like any other run.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import logging
import math
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfkarpa import board, runs, tasks
from tfkarpa import config as config_lib
from tfkarpa.core import auto
from tfkarpa.core.fit import check_placement, default_name, record_start, seed_everything
from tfkarpa.data import pipeline
from tfkarpa.data.splits import labels_of, subset
from tfkarpa.errors import TfkarpaError
from tfkarpa.tasks.federate import partition as partition_lib
from tfkarpa.tasks.federate import privacy, server
from tfkarpa.tasks.federate.client import LocalTrainer, client_app
from tfkarpa.tasks.federate.simulation import InProcessGrid

log = logging.getLogger(__name__)

ROUND_WEIGHTS, ROUND_RECORD = "round.npz", "round.json"  # in checkpoints/: the last round done


def check(cfg: config_lib.Config) -> None:
    """What federated training does not take, said before anything starts."""
    if cfg.task != "classify":
        raise TfkarpaError(f"federate trains classifiers (task=classify); got task={cfg.task}")
    if cfg.stages or cfg.distill.teacher:
        raise TfkarpaError("federate trains plain classifiers: compress (prune, cluster, qat) or "
                           "distil the finished run afterwards")
    if cfg.strategy not in ("auto", "default", "one_device"):
        raise TfkarpaError(f"strategy={cfg.strategy}: federated clients train in this process, "
                           "one device each; use strategy=auto")
    fed = cfg.federated
    if fed.secure and fed.dp.clip and fed.dp.side == "server":
        # The SecAgg+ server sees only the sum: it would clip that, not each client's update,
        # and the noise would be m times too small for the epsilon reported.
        raise TfkarpaError("config key 'federated.dp.side': server-side clipping cannot see "
                           "each update under secure aggregation; use dp.side=client")
    if fed.min_fit_clients > fed.clients:
        raise TfkarpaError(f"config key 'federated.min_fit_clients': {fed.min_fit_clients} is "
                           f"more than the {fed.clients} clients")


@dataclasses.dataclass
class Federation:
    """A config resolved against its data: what the server and every client agree on."""

    cfg: config_lib.Config  # auto keys chosen; epochs = rounds x local epochs
    task: object
    placement: object
    data: object
    labels: np.ndarray
    shards: list[np.ndarray]
    steps: int  # optimizer steps per local epoch of an average shard
    chosen: dict  # what core.auto chose, and why

    def shard_split(self, client: int):
        """Client `client`'s shard of the training split."""
        return subset(self.data.splits["train"], self.shards[client], self.labels)


def prepare(cfg: config_lib.Config) -> Federation:
    """Check `cfg`, load its data, share the training split among the clients and choose the
    auto keys. Deterministic: a client process and the server get the same shards and sizes."""
    cfg = copy.deepcopy(cfg)
    check(cfg)
    fed = cfg.federated
    task = tasks.get(cfg.task)
    placement = check_placement(cfg)
    task.check_model(cfg)
    data = task.load_data(cfg)
    labels = labels_of(data.splits["train"])
    shards = partition_lib.partition(labels, fed.clients, fed.partition, cfg.seed,
                                     data.num_classes)
    steps = max(1, math.ceil(np.mean([len(s) for s in shards]) / cfg.batch_size))
    if cfg.epochs or cfg.steps:  # a recipe's training length
        log.info("federated.rounds x federated.local_epochs set the training length (%d "
                 "epochs); the config's epochs=%d steps=%d are not used", fed.rounds *
                 fed.local_epochs, cfg.epochs, cfg.steps)
    cfg.epochs, cfg.steps = fed.rounds * fed.local_epochs, 0  # the schedule spans the federation
    cfg, chosen = auto.resolve(cfg, data, task.auto, lambda batch: steps)
    task.check_model(cfg)
    task.check(cfg, data)
    return Federation(cfg, task, placement, data, labels, shards, steps, chosen)


def run(cfg: config_lib.Config, verbose: int = 2, grid=None) -> dict:
    """Federated training of `cfg`'s classifier: {run_dir, artifacts, metrics, lines}.

    `grid`: Flower's grid to the clients when they are processes of their own (`deploy`);
    without one they run in this process."""
    started = time.time()
    fl = prepare(cfg)
    cfg, fed = fl.cfg, fl.cfg.federated
    log.info("federated: %d clients (%s), %d sampled per round, %d rounds of %d local epoch(s), "
             "%s%s%s", fed.clients, fed.partition, server.sampled_clients(fed, fed.clients),
             fed.rounds, fed.local_epochs, fed.algorithm,
             f", DP clip {fed.dp.clip} noise {fed.dp.noise}" if fed.dp.clip else "",
             ", SecAgg+" if fed.secure else "")
    name = default_name(cfg, "-fed")
    export_dir = Path(cfg.export_dir or Path("saved_models") / name)
    if cfg.export:
        runs.ensure_writable(export_dir.parent, "export_dir parent")
    run_ = runs.claim(cfg.runs_root, name, cfg.run_dir, config_lib.to_dict(cfg))
    if not cfg.export_dir:
        export_dir = Path("saved_models") / run_.name
    try:
        if cfg.export:  # before any round, as train checks it before training
            runs.check_output_dir(export_dir, "saved_model", "export_dir")
        return _run_in(fl, run_, export_dir, started, grid)
    except BaseException:
        if not (run_.checkpoints / ROUND_RECORD).exists():
            run_.discard()  # no round finished: nothing to resume, leave nothing behind
        raise
    finally:
        run_.release()


def _run_in(fl: Federation, run_, export_dir, started, grid) -> dict:
    cfg, data, task, placement = fl.cfg, fl.data, fl.task, fl.placement
    fed = cfg.federated
    seed_everything(cfg)
    with placement.strategy.scope():
        parts = task.build(cfg, data, placement, run_, fl.steps)
    if not run_.resumed:
        record_start(cfg, config_lib.to_dict(cfg), data, run_, parts.net, placement, task,
                     fl.chosen)
        _record_clients(run_, data.class_names, fl.shards,
                        partition_lib.class_counts(fl.labels, fl.shards, data.num_classes), fed)
    book = RoundBook(run_, cfg, parts.model, data, fed.clients)
    first = book.resume(parts.model) + 1
    if first > fed.rounds:
        log.info("run %s finished its %d rounds before it stopped; going on from round %d",
                 run_.dir, fed.rounds, fed.rounds)
    else:
        log.info("%s run %s: %s, %d parameters, rounds %d-%d", "resuming" if first > 1 else
                 "starting", run_.dir, parts.net.name, parts.net.count_params(), first, fed.rounds)
    fit_started = time.time()
    if grid is None:  # the clients in this process, sharing the model
        trainer = LocalTrainer(cfg, parts.model, data.num_classes, fl.steps)
        shards = [fl.shard_split(i) for i in range(fed.clients)]
        grid = InProcessGrid(client_app(trainer, shards), fed.clients)
        book.grid = grid
    if first <= fed.rounds:
        weights = parts.model.get_weights()
        strategy = server.make_strategy(fed, fed.clients, weights, book.evaluate,
                                        book.client_replies, server.statistics(parts.model))
        server.run_rounds(grid, strategy, weights, first, fed.rounds, fed, fed.clients)
    fit_seconds = time.time() - fit_started
    parts.model.set_weights(book.global_weights or parts.model.get_weights())
    hist = book.history()
    metrics, artifacts = task.finish(cfg, data, placement, run_, parts, export_dir, hist)
    metrics.update({
        "rounds": fed.rounds, "clients": fed.clients,
        "final_val_accuracy": hist["val_accuracy"][-1] if hist.get("val_accuracy") else None,
        "bytes_per_client_round": book.bytes_per_client_round(),
        **({"epsilon": book.epsilon(fed.rounds), "delta": fed.dp.delta} if fed.dp.noise else {}),
        "fit_seconds": round(fit_seconds, 2),
        "total_seconds": round(time.time() - started, 2),
    })
    artifacts = {"run_dir": str(run_.dir), "config": str(run_.dir / "config.yaml"),
                 "manifest": str(run_.dir / "manifest.json"),
                 "history": str(run_.dir / "history.csv"), "tensorboard": str(run_.logs),
                 **artifacts}
    board.write_hparams(run_.logs, run_.name, config_lib.to_dict(cfg), metrics)
    runs.atomic_write_json(run_.dir / runs.DONE, {"metrics": metrics, "artifacts": artifacts,
                                                   "history": hist})
    lines = [f"  federated  {fed.clients} clients ({fed.partition}), {fed.rounds} rounds of "
             f"{fed.local_epochs} local epoch(s), {fed.algorithm}; skipped rounds: "
             f"{book.skipped or 'none'}"]
    return {"run_dir": str(run_.dir), "artifacts": artifacts, "metrics": metrics, "lines": lines}


def _record_clients(run_, class_names, shards, counts, fed) -> None:
    """Each client's examples per class, in manifest.json (the report draws them)."""
    manifest = runs.read_json(run_.dir / "manifest.json")
    manifest["federated"] = {
        "partition": fed.partition, "clients": fed.clients,
        "examples": [int(len(s)) for s in shards],
        "class_counts": {f"client {i}": {c: int(n) for c, n in zip(class_names, row)}
                         for i, row in enumerate(counts)}}
    runs.atomic_write_json(run_.dir / "manifest.json", manifest)


class RoundBook:
    """The server's record of a run: each round's evaluation, history row, TensorBoard scalars
    and checkpoint (written atomically, the round's number last)."""

    COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "test_loss",
               "test_accuracy", "clients", "failures")  # (round seconds: in round.json)

    def __init__(self, run_, cfg, model: tf.keras.Model, data, clients: int):
        self.run_, self.cfg, self.model, self.clients = run_, cfg, model, clients
        make = lambda split: pipeline.make_dataset(  # noqa: E731
            data.splits[split], cfg, data.num_classes, training=False)
        self.val, self.test = make("val"), make("test")
        self.rows: list[dict] = []
        self.pending: dict = {}
        self.skipped: list[int] = []
        self.global_weights: list[np.ndarray] | None = None
        self.grid = None
        self.exchanges = 0  # client round trips this session (what the grid's bytes count)
        self.round_started = time.time()
        self.writer = tf.summary.create_file_writer(str(run_.logs / "federated"))

    def resume(self, model: tf.keras.Model) -> int:
        """The last round already done (0 for a new run), its weights loaded into `model`."""
        record = runs.read_json(self.run_.checkpoints / ROUND_RECORD)
        if not record:
            return 0
        path = self.run_.checkpoints / ROUND_WEIGHTS
        try:
            with np.load(path) as saved:
                weights = [saved[f"w{i}"] for i in range(len(saved.files))]
            model.set_weights(weights)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            text = " ".join(str(err).split())[:200] or type(err).__name__
            raise TfkarpaError(
                f"federated checkpoint '{path}' (round {record.get('round')}) does not load "
                f"({text}); restore it from a copy, or start the federation again under "
                "another name") from err
        self.global_weights = weights
        self.rows, self.skipped = record["rows"], record.get("skipped", [])
        log.info("resuming after round %d (checkpoint %s)", record["round"],
                 self.run_.checkpoints / ROUND_WEIGHTS)
        return int(record["round"])

    def client_replies(self, server_round: int, replies: list, failures: int, used: bool):
        total = sum(n for n, _ in replies) or 1
        self.exchanges += len(replies) + failures
        self.pending = {"loss": sum(n * m["loss"] for n, m in replies) / total,
                        "accuracy": sum(n * m["accuracy"] for n, m in replies) / total,
                        "clients": len(replies), "failures": failures}
        if not used:
            self.skipped.append(server_round)

    def evaluate(self, server_round: int, weights: list[np.ndarray]) -> tuple[float, dict]:
        self.model.set_weights(weights)
        self.global_weights = weights
        val = self.model.evaluate(self.val, verbose=0, return_dict=True)
        test = self.model.evaluate(self.test, verbose=0, return_dict=True)
        row = {"epoch": server_round - 1, **self.pending,
               "val_loss": val["loss"], "val_accuracy": val["accuracy"],
               "test_loss": test["loss"], "test_accuracy": test["accuracy"],
               "seconds": round(time.time() - self.round_started, 2)}
        self.rows.append(row)
        self.pending = {}
        self._write(server_round, weights)
        log.info("round %d/%d: %d client(s), train loss %.4f, val accuracy %.4f, test accuracy "
                 "%.4f (%.1f s)", server_round, self.cfg.federated.rounds, row.get("clients", 0),
                 row.get("loss", float("nan")), row["val_accuracy"], row["test_accuracy"],
                 row["seconds"])
        self.round_started = time.time()
        return float(val["loss"]), {"val_accuracy": float(val["accuracy"])}

    def _write(self, server_round: int, weights: list[np.ndarray]) -> None:
        with self.writer.as_default(step=server_round):
            for key in ("loss", "accuracy", "val_loss", "val_accuracy", "test_accuracy"):
                if key in self.rows[-1]:
                    tf.summary.scalar(f"round_{key}", self.rows[-1][key])
            if self.cfg.federated.dp.noise:
                tf.summary.scalar("round_epsilon", self.epsilon(server_round))
        self.writer.flush()
        text = io.StringIO()
        out = csv.DictWriter(text, fieldnames=self.COLUMNS, extrasaction="ignore")
        out.writeheader()
        out.writerows(self.rows)
        runs.atomic_write_text(self.run_.dir / "history.csv", text.getvalue())
        checkpoints = self.run_.checkpoints
        checkpoints.mkdir(parents=True, exist_ok=True)
        tmp = checkpoints / f"{runs.temporary_prefix(ROUND_WEIGHTS)}{ROUND_WEIGHTS}"
        with open(tmp, "wb") as f:
            np.savez(f, **{f"w{i}": w for i, w in enumerate(weights)})
        os.replace(tmp, checkpoints / ROUND_WEIGHTS)
        runs.atomic_write_json(checkpoints / ROUND_RECORD, {
            "round": server_round, "rows": self.rows, "skipped": self.skipped})

    def history(self) -> dict:
        return {k: [float(r[k]) for r in self.rows if k in r] for k in self.COLUMNS[1:]}

    def bytes_per_client_round(self) -> int:
        """Model bytes down plus up per sampled client and round: measured on the in-process
        grid's messages; with clients in other processes, the float32 weights both ways."""
        if not self.grid or not self.exchanges:
            return 2 * sum(w.nbytes for w in self.model.get_weights())
        return int((self.grid.bytes_down + self.grid.bytes_up) / self.exchanges)

    def epsilon(self, rounds: int) -> float:
        dp = self.cfg.federated.dp
        return privacy.epsilon(dp.noise, rounds, dp.delta)
