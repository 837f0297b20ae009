"""The client side: local training on one shard, as a Flower `ClientApp`.

A client trains the classifier the run's config describes, with the model, loss, optimizer and
augmentation the classify task builds for every run (`Task.build`), on its own shard only. Each
round it starts from the global weights the server sent, with fresh optimizer moments (clients
keep no state between rounds, as in FedAvg) and the learning-rate schedule where the whole
federation stands: the schedule spans rounds x local epochs, as one run of that many epochs.
FedProx adds mu/2 * ||w - w_global||^2 to the local loss (Li et al. 2020).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
from flwr.client import NumPyClient
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp

from tfkarpa.data import pipeline
from tfkarpa.data.splits import Split

PARTITION_KEY = "partition-id"  # Flower's node_config key for a client's shard


class LocalTrainer:
    """Trains a compiled model on a shard from given weights; one per process."""

    def __init__(self, cfg, model: tf.keras.Model, num_classes: int, steps_per_epoch: int):
        self.cfg, self.model, self.num_classes = cfg, model, num_classes
        self.steps_per_epoch = steps_per_epoch
        self.mu = tf.Variable(0.0, trainable=False, name="proximal_mu")
        self.anchors = [tf.Variable(w, trainable=False) for w in model.trainable_weights]
        if cfg.federated.algorithm == "fedprox":
            # Added once, before the first fit traces the train step; 0 outside local training,
            # so the server's evaluations of the same model see the plain loss.
            model.add_loss(self._proximal)

    def _proximal(self):
        drift = [tf.reduce_sum(tf.square(w - a))
                 for w, a in zip(self.model.trainable_weights, self.anchors)]
        return 0.5 * self.mu * tf.add_n(drift)

    def fit(self, weights: list[np.ndarray], shard: Split, client: int, server_round: int,
            mu: float = 0.0) -> tuple[list[np.ndarray], dict]:
        """Local epochs on `shard` from `weights`: (new weights, {loss, accuracy})."""
        fed = self.cfg.federated
        self.model.set_weights(weights)
        for anchor, w in zip(self.anchors, self.model.trainable_weights):
            anchor.assign(w)
        self._restart_optimizer((server_round - 1) * fed.local_epochs * self.steps_per_epoch)
        # Each client and round shuffles and augments with its own seed.
        cfg = dataclasses.replace(self.cfg, seed=self.cfg.seed * 100_003 + server_round * 1_009
                                  + client)
        data = pipeline.make_dataset(shard, cfg, self.num_classes, training=True)
        self.mu.assign(mu)
        try:
            history = self.model.fit(data, epochs=fed.local_epochs, verbose=0).history
        finally:
            self.mu.assign(0.0)
        return self.model.get_weights(), {"loss": float(history["loss"][-1]),
                                          "accuracy": float(history["accuracy"][-1])}

    def _restart_optimizer(self, step: int) -> None:
        optimizer = self.model.optimizer
        iterations = optimizer.iterations
        for v in optimizer.variables:
            if v.ref() != iterations.ref():
                v.assign(tf.zeros_like(v))
        iterations.assign(step)


class ShardClient(NumPyClient):
    """One client: its shard and the process's trainer."""

    def __init__(self, trainer: LocalTrainer, shard: Split, client: int):
        self.trainer, self.shard, self.client = trainer, shard, client

    def get_parameters(self, config):
        return self.trainer.model.get_weights()

    def fit(self, parameters, config):
        weights, metrics = self.trainer.fit(
            parameters, self.shard, self.client, int(config["round"]),
            float(config.get("proximal_mu", 0.0)))
        # With DP every reply weighs the same: the noise (std noise * clip / m) is calibrated to
        # one client moving the average of m clipped updates by clip / m at most, which a reply
        # weighted by a larger than average shard exceeds (Flower's accounted DP strategies
        # require equal weights too). The weight is the client's: SecAgg+ applies it there.
        weight = 1 if self.trainer.cfg.federated.dp.clip else self.shard.num_examples
        return weights, weight, {**metrics, "client": self.client}

    def evaluate(self, parameters, config):
        self.trainer.model.set_weights(parameters)
        data = pipeline.make_dataset(self.shard, self.trainer.cfg, self.trainer.num_classes,
                                     training=False)
        result = self.trainer.model.evaluate(data, verbose=0, return_dict=True)
        return float(result["loss"]), self.shard.num_examples, {
            "accuracy": float(result["accuracy"])}


def client_app(trainer: LocalTrainer, shards: list[Split]) -> ClientApp:
    """The `ClientApp`: a node's `partition-id` picks its shard. With DP on the client side,
    Flower's clipping mod clips each update; with secure aggregation, its SecAgg+ mod masks it
    (the clipping mod inside the SecAgg+ one: an update is clipped, then masked)."""
    fed = trainer.cfg.federated

    def client_fn(context):
        client = int(context.node_config[PARTITION_KEY])
        return ShardClient(trainer, shards[client], client).to_client()

    mods = []
    if fed.secure:
        mods.append(secaggplus_mod)
    if fed.dp.clip and fed.dp.side == "client":
        mods.append(fixedclipping_mod)
    return ClientApp(client_fn=client_fn, mods=mods or None)
