"""The server side: Flower's strategies and workflows, driven round by round from a checkpoint.

The aggregation is Flower's: FedAvg, FedProx or FedAdam (`flwr.server.strategy`), wrapped in its
fixed-clipping differential-privacy strategies when `federated.dp.clip` is set, each round run
by its default fit workflow or, with `federated.secure`, its SecAgg+ workflow. Those are the
strategy classes Flower's SecAgg+ workflow drives (the newer `flwr.serverapp.strategy` ones
have no secure aggregation yet).

What is ours: the round loop (`run_rounds`), a copy of Flower's `DefaultWorkflow` loop that
starts at any round, so a restarted server goes on from its last checkpoint; and `Quorum`,
which skips a round that got fewer replies than `federated.min_fit_clients` (Flower aggregates
whatever came back) and keeps the global model as it was.
"""

from __future__ import annotations

import logging
import math
import timeit
from typing import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.serverapp import Grid
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.strategy import (DifferentialPrivacyClientSideFixedClipping,
                                  DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg,
                                  FedProx, Strategy)
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import (default_centralized_evaluation_workflow,
                                                    default_fit_workflow)

log = logging.getLogger(__name__)

SECAGG_RANGE = 64.0
# Evaluate = (round, weights) -> (loss, metrics); called after every round's aggregation.
Evaluate = Callable[[int, list[np.ndarray]], tuple[float, dict]]


def statistics(model) -> frozenset[int]:
    """Indices (in `model.get_weights()` order) of the weights no gradient trains."""
    return frozenset(i for i, w in enumerate(model.weights) if not w.trainable)


def sampled_clients(fed, clients: int) -> int:
    """Clients sampled per round: Flower's rule, max(int(clients * fraction), minimum)."""
    return max(int(clients * fed.fraction), fed.min_fit_clients or 1)


def make_strategy(fed, clients: int, initial: list[np.ndarray], evaluate: Evaluate,
                  on_fit_metrics: Callable[[int, list], None],
                  statistics: frozenset[int] = frozenset()) -> Strategy:
    """Flower's strategy for `federated.*`, evaluating centrally with `evaluate` each round.
    `statistics`: the indices of the weights that are not trained but tracked (BatchNorm's
    moving mean and variance), which FedAdam averages instead of stepping."""
    sampled = sampled_clients(fed, clients)
    quorum = fed.min_fit_clients or sampled
    # Flower samples max(available * fraction, min_fit_clients) clients; with the quorum as that
    # minimum a round goes on with the clients still there after others have gone for good.
    common = dict(
        fraction_fit=fed.fraction, fraction_evaluate=0.0, min_fit_clients=quorum,
        min_evaluate_clients=0, min_available_clients=quorum, accept_failures=True,
        initial_parameters=ndarrays_to_parameters(initial),
        evaluate_fn=lambda rnd, weights, _config: evaluate(rnd, weights) if rnd else None,
        on_fit_config_fn=lambda rnd: {"round": rnd, "proximal_mu": fed.proximal_mu
                                      if fed.algorithm == "fedprox" else 0.0},
        fit_metrics_aggregation_fn=_weighted_mean)
    if fed.algorithm == "fedadam":
        # eta_l is only a label in Flower (clients use their own optimizer); tau keeps the
        # server's Adam step finite where an update's second moment is zero.
        strategy = FedAdamOnTrained(statistics, eta=fed.server_lr, eta_l=fed.server_lr,
                                    beta_1=0.9, beta_2=0.99, tau=1e-3, **common)
    elif fed.algorithm == "fedprox":
        strategy = FedProx(proximal_mu=fed.proximal_mu, **common)
    else:
        strategy = FedAvg(**common)
    if fed.dp.clip:
        wrapper = (DifferentialPrivacyClientSideFixedClipping if fed.dp.side == "client"
                   else DifferentialPrivacyServerSideFixedClipping)
        strategy = wrapper(strategy, noise_multiplier=fed.dp.noise, clipping_norm=fed.dp.clip,
                           num_sampled_clients=sampled)
    return Quorum(strategy, quorum, on_fit_metrics)


class FedAdamOnTrained(FedAdam):
    """Flower's FedAdam with two corrections. The weights in `statistics` (BatchNorm's moving
    mean and variance) take the clients' average, as in FedAvg, not an Adam step: Adam moves
    every number by about the server learning rate whatever its scale, and a moving variance
    near 0.01 goes negative (measured: plain FedAdam left shapes at chance, 16.7%). And the
    new weights keep their dtype: Flower's step returns float64, doubling what goes down."""

    def __init__(self, statistics: frozenset[int], **kwargs):
        super().__init__(**kwargs)
        self.statistics = statistics
        self.dtypes = [w.dtype for w in self.current_weights]

    def aggregate_fit(self, server_round, results, failures):
        stepped, metrics = super().aggregate_fit(server_round, results, failures)
        if stepped is None or not self.statistics:
            return self._typed(stepped), metrics
        # FedAdam averaged the replies inside and kept only its step; averaging them again is
        # a NumPy mean over the replies, cheaper than copying Flower's Adam code to keep it.
        averaged, _ = FedAvg.aggregate_fit(self, server_round, results, failures)
        mean = parameters_to_ndarrays(averaged)
        self.current_weights = [mean[i] if i in self.statistics else w
                                for i, w in enumerate(self.current_weights)]
        return self._typed(ndarrays_to_parameters(self.current_weights)), metrics

    def _typed(self, parameters):
        if parameters is None:
            return None
        self.current_weights = [w.astype(t, copy=False) for w, t in
                                zip(self.current_weights, self.dtypes, strict=True)]
        return ndarrays_to_parameters(self.current_weights)


def _weighted_mean(results: list[tuple[int, dict]]) -> dict:
    total = sum(n for n, _ in results) or 1
    keys = {k for _, m in results for k, v in m.items() if k != "client"}
    return {k: sum(n * float(m.get(k, 0.0)) for n, m in results) / total for k in sorted(keys)}


class Quorum(Strategy):
    """A strategy that aggregates only when at least `quorum` clients replied; otherwise the
    round is skipped and the global model stays. Reports each round's replies."""

    def __init__(self, inner: Strategy, quorum: int, on_fit_metrics: Callable[[int, list], None]):
        self.inner, self.quorum, self.on_fit_metrics = inner, quorum, on_fit_metrics

    def initialize_parameters(self, client_manager):
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round, parameters, client_manager):
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        replies = [(res.num_examples, dict(res.metrics)) for _, res in results]
        if len(results) < self.quorum:
            log.warning("round %d: %d client(s) replied (%d failed), fewer than min_fit_clients="
                        "%d; the global model is kept", server_round, len(results),
                        len(failures), self.quorum)
            self.on_fit_metrics(server_round, replies, len(failures), False)
            return None, {}
        weights, metrics = self.inner.aggregate_fit(server_round, results, failures)
        if weights is None:  # Flower's DP strategies: noise is calibrated to every sampled client
            log.warning("round %d: %d client(s) failed and the strategy (%s) does not aggregate "
                        "without them; the global model is kept", server_round, len(failures),
                        type(self.inner).__name__)
        self.on_fit_metrics(server_round, replies, len(failures), weights is not None)
        return weights, metrics

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return self.inner.evaluate(server_round, parameters)


def run_rounds(grid, strategy: Strategy, weights: list[np.ndarray], first: int, last: int,
               fed, clients: int) -> None:
    """Rounds `first`..`last` from `weights` over `grid`, as Flower's DefaultWorkflow runs them
    (fit workflow, then central evaluation) but from any round: Flower's loop starts at 1."""
    from flwr.app import Context, RecordDict

    grid = _Patient(grid, fed.round_timeout)
    context = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={},
                                    state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=last), strategy=strategy)
    fit_round = default_fit_workflow
    if fed.secure:
        # SecAgg+: each update is secret-shared among the sampled clients; up to a third of
        # them may drop out and the sum is still recovered.
        sampled = sampled_clients(fed, clients)
        shares = max(3, sampled)
        # Clients send weights, not deltas, each times its weight / max_weight: values are
        # clipped to +-SECAGG_RANGE and quantized to 2^24 levels over that range (8e-6 apart)
        # before masking. Under DP every weight is 1 (client.ShardClient.fit), so max_weight 1
        # keeps that resolution; Flower's default (1000) would make it 1000 times coarser.
        fit_round = SecAggPlusWorkflow(num_shares=shares,
                                       reconstruction_threshold=max(2, math.ceil(2 * shares / 3)),
                                       clipping_range=SECAGG_RANGE, quantization_range=2**24,
                                       max_weight=1.0 if fed.dp.clip else 1000.0,
                                       timeout=fed.round_timeout)
    thread, stop, registered = start_update_client_manager_thread(grid, context.client_manager)
    registered.wait()
    try:
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(weights)
        state = ConfigRecord({Key.START_TIME: timeit.default_timer()})
        context.state.config_records[MAIN_CONFIGS_RECORD] = state
        for server_round in range(first, last + 1):
            state[Key.CURRENT_ROUND] = server_round
            fit_round(grid, context)
            default_centralized_evaluation_workflow(grid, context)
    finally:
        stop.set()
        thread.join()


class _Patient(Grid):
    """A grid whose rounds wait at most `timeout` seconds for replies: Flower's fit workflow
    waits without limit, and a client that hangs (not one that dies: the SuperLink reports
    those after two missed heartbeats, about a minute) would hold the round forever."""

    def __init__(self, inner: Grid, timeout: float):
        self.inner, self.timeout = inner, timeout

    def set_run(self, run):
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self):
        return self.inner.get_node_ids()

    def push_messages(self, messages):
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids):
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):
        return self.inner.send_and_receive(messages, timeout=timeout or self.timeout)
