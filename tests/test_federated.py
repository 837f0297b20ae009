"""Federated training on Flower: partitions, privacy accounting, a simulated federation as an
ordinary run (history, export, resume), FedProx/FedAdam, DP with SecAgg+, and bad input."""

import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import stop_federation_in_round, tiny_config
from tfkarpa.errors import TfkarpaError
from tfkarpa.tasks.federate import partition as P
from tfkarpa.tasks.federate import privacy

LABELS = np.repeat(np.arange(4), 50)  # 4 classes, 50 examples each


def test_iid_partition_is_even_deterministic_and_covers_every_example():
    shards = P.partition(LABELS, 6, "iid", seed=3, num_classes=4)
    assert sorted(len(s) for s in shards) == [33, 33, 33, 33, 34, 34]
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(200))
    again = P.partition(LABELS, 6, "iid", seed=3, num_classes=4)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    other = P.partition(LABELS, 6, "iid", seed=4, num_classes=4)
    assert not all(np.array_equal(a, b) for a, b in zip(shards, other))


def test_dirichlet_partition_skews_labels_more_at_small_alpha():
    def skew(alpha):
        shards = P.partition(LABELS, 5, f"dirichlet:{alpha}", seed=0, num_classes=4)
        assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(200))
        counts = P.class_counts(LABELS, shards, 4)
        return np.mean(counts.max(axis=1) / counts.sum(axis=1))  # dominant class share

    assert skew(0.1) > skew(100.0) + 0.25
    assert skew(100.0) < 0.4  # near iid: about a quarter each


def test_by_class_partition_gives_each_client_exactly_k_classes():
    shards = P.partition(LABELS, 4, "by_class:2", seed=1, num_classes=4)
    counts = P.class_counts(LABELS, shards, 4)
    assert ((counts > 0).sum(axis=1) == 2).all()
    assert counts.sum() == 200 and (counts.sum(axis=0) == 50).all()


@pytest.mark.parametrize("spec, clients, message", [
    ("random", 4, "is not a partition (choose iid, dirichlet:ALPHA, by_class:K)"),
    ("dirichlet:x", 4, "needs a number after ':'"),
    ("dirichlet:0", 4, "concentration must be positive"),
    ("by_class:5", 4, "K must be a whole number from 1 to the 4 classes"),
    ("by_class:1", 2, "holds 2 class shares, fewer than the 4 classes"),
    ("iid", 201, "201 clients for 200 training examples"),
])
def test_bad_partitions_are_named(spec, clients, message):
    with pytest.raises(TfkarpaError, match="federated") as err:
        P.partition(LABELS, clients, spec, seed=0, num_classes=4)
    assert message in str(err.value)


def test_epsilon_matches_google_dp_accounting():
    # Google's dp-accounting 0.6.0 (RdpAccountant, GaussianDpEvent(z) composed T times,
    # get_epsilon(1e-5)), computed once in a scratch environment: it pins attrs < 24, so it is
    # not installed beside the stack. Our orders are finer, so never above it.
    for noise, rounds, reference in [(1.0, 30, 39.83175), (0.5, 30, 110.68837),
                                     (2.0, 10, 8.07941), (1.1, 100, 83.09978)]:
        ours = privacy.epsilon(noise, rounds, 1e-5)
        assert reference * 0.995 <= ours <= reference + 1e-6
    assert privacy.epsilon(0.0, 10, 1e-5) == float("inf")
    assert privacy.epsilon(1.0, 10, 1e-5) < privacy.epsilon(1.0, 20, 1e-5)


def _exact_gaussian_epsilon(noise, rounds, delta):
    """The tight epsilon of `rounds` Gaussian releases (Balle & Wang 2018): their composition is
    one Gaussian mechanism of sensitivity/std mu = sqrt(rounds) / noise, whose delta at epsilon
    is Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu). Bisection on eps; no accountant."""
    mu = math.sqrt(rounds) / noise
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    lo, hi = 0.0, 1000.0
    for _ in range(200):
        eps = (lo + hi) / 2
        if phi(mu / 2 - eps / mu) - math.exp(eps) * phi(-mu / 2 - eps / mu) > delta:
            lo = eps
        else:
            hi = eps
    return hi


@pytest.mark.parametrize("noise, rounds", [(0.5, 2), (1.0, 30), (2.0, 10), (1.1, 100)])
def test_epsilon_lies_between_the_exact_gaussian_curve_and_mironovs_bound(noise, rounds):
    """Two references that share no code with privacy.epsilon: no accountant may claim less than
    the exact privacy curve, and Renyi DP must beat its own classic conversion, whose minimum
    over the order a, eps(a) = T a / (2 z^2) + log(1/delta) / (a - 1), is at
    a = 1 + z sqrt(2 log(1/delta) / T): eps = T / (2 z^2) + sqrt(2 T log(1/delta)) / z
    (Mironov 2017, Proposition 3). For z=0.5, T=2: 4 + 6.786 / 0.5 = 17.572."""
    delta = 1e-5
    classic = rounds / (2 * noise**2) + math.sqrt(2 * rounds * math.log(1 / delta)) / noise
    ours = privacy.epsilon(noise, rounds, delta)
    assert _exact_gaussian_epsilon(noise, rounds, delta) < ours < classic


FED = ["federated.clients=3", "federated.rounds=2", "federated.fraction=1.0",
       "federated.partition=dirichlet:1.0"]


def _fed_config(tmp_path, *extra):
    return tiny_config(tmp_path, *FED, *extra)  # its epochs=2 give way to rounds


@pytest.fixture(scope="module")
def federated_run(tmp_path_factory):  # trains: every test that uses it is slow
    from tfkarpa.tasks.federate import run as federate

    tmp = tmp_path_factory.mktemp("fed")
    return federate.run(_fed_config(tmp), verbose=0), tmp


@pytest.mark.slow
def test_federation_is_an_ordinary_run(federated_run):
    from tfkarpa import runs, tasks

    result, tmp = federated_run
    run_dir = result["run_dir"]
    with open(f"{run_dir}/history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"]  # one row per round
    assert all(r["clients"] == "3" and 0 <= float(r["test_accuracy"]) <= 1 for r in rows)
    assert result["metrics"]["rounds"] == 2 and result["metrics"]["test_accuracy"] >= 0
    manifest = json.loads(open(f"{run_dir}/manifest.json").read())
    counts = manifest["federated"]["class_counts"]
    assert len(counts) == 3
    assert sum(sum(c.values()) for c in counts.values()) == sum(
        manifest["data"]["class_counts"]["train"].values())
    # float32 weights down and up per client and round
    params = result["metrics"]["params"]
    assert result["metrics"]["bytes_per_client_round"] >= 2 * 4 * params
    assert runs.read_config(run_dir).task == "classify"
    predictor = tasks.load_predictor(result["artifacts"]["saved_model"])
    assert predictor.kind == "saved_model"
    html = tasks.report([run_dir], tmp / "report")
    assert "3 clients (partition `dirichlet:1.0`)" in open(html["report_md"]).read()


@pytest.mark.slow
def test_a_stopped_federation_resumes_from_its_last_round(tmp_path, monkeypatch):
    from tfkarpa.tasks.federate import run as federate

    go_on = stop_federation_in_round(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        federate.run(_fed_config(tmp_path), verbose=0)
    record = json.loads(next(tmp_path.glob("runs/*/checkpoints/round.json")).read_text())
    assert record["round"] == 1
    go_on()
    trained = []
    original_fit = federate.LocalTrainer.fit
    monkeypatch.setattr(federate.LocalTrainer, "fit", lambda self, *a, **k: (
        trained.append(a[3]), original_fit(self, *a, **k))[1])
    result = federate.run(_fed_config(tmp_path), verbose=0)
    assert set(trained) == {2}  # only the missing round trained again
    assert len(result["metrics"]) and result["run_dir"].endswith("-fed")
    assert len(open(f"{result['run_dir']}/history.csv").read().strip().splitlines()) == 3


@pytest.mark.slow
def test_fedprox_with_dp_and_secure_aggregation_trains_and_reports_epsilon(tmp_path):
    """The three together end to end (each is proved on its own below): two rounds of three
    clients, and the epsilon two noise-0.5 releases spend at delta 1e-5."""
    from tfkarpa.tasks.federate import run as federate

    result = federate.run(_fed_config(
        tmp_path, "federated.algorithm=fedprox", "federated.dp.clip=5.0",
        "federated.dp.noise=0.5", "federated.secure=true", "export=false"), verbose=0)
    metrics = result["metrics"]
    # Balle et al. 2020's conversion of RDP 2a / (2 * 0.5^2) = 4a, minimised in NumPy over
    # 2e6 orders from 1 + 1e-4 to 1e4 (at a = 2.624): 16.51141. Between the exact curve
    # (15.456, _exact_gaussian_epsilon) and Mironov's bound (17.572), as proved above.
    assert metrics["epsilon"] == pytest.approx(16.51141, rel=1e-4)
    assert metrics["delta"] == 1e-5
    with open(f"{result['run_dir']}/history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["clients"], r["failures"]) for r in rows] == [("3", "0"), ("3", "0")]
    assert 0 <= metrics["test_accuracy"] <= 1


def test_quorum_skips_a_round_with_too_few_replies():
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

    from tfkarpa.tasks.federate.server import Quorum

    seen = []
    quorum = Quorum(FedAvg(), 2, lambda r, replies, failed, used: seen.append((r, used)))
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.ones(2, np.float32)]), 5,
                 {"loss": 1.0, "accuracy": 0.5})
    assert quorum.aggregate_fit(1, [(None, res)], [RuntimeError("client died")]) == (None, {})
    params, _ = quorum.aggregate_fit(2, [(None, res), (None, res)], [])
    assert params is not None and seen == [(1, False), (2, True)]
    # Flower's DP strategies keep the model when a sampled client failed: the round is skipped.
    private = Quorum(DifferentialPrivacyClientSideFixedClipping(FedAvg(), 0.1, 1.0, 3), 2,
                     lambda r, replies, failed, used: seen.append((r, used)))
    assert private.aggregate_fit(3, [(None, res), (None, res)], [RuntimeError("gone")])[0] is None
    assert seen[-1] == (3, False)


@pytest.mark.parametrize("args, message", [
    (["partition=zipf"], "'zipf' is not a partition"),
    (["clients=5000"], "5000 clients for"),
    (["fraction=1.5"], "'federated.fraction' must be in (0, 1]"),
    (["federated.min_fit_clients=20"], "20 is more than the 10 clients"),
    (["task=detect", "data.image_size=32"], "federate trains classifiers"),  # detect: >= 32 px
    (["dp.noise=1.0"], "needs 'federated.dp.clip'"),
    (["client"], "--id N goes with `federate client`"),
    (["client", "--id", "7", "clients=3"], "client --id 7: the federation has 3 clients"),
    (["serve", "federated.address=nowhere"], "'federated.address': 'nowhere' is not HOST:PORT"),
    (["dp.clip=1.0", "dp.side=server", "secure=true"], "under secure aggregation; use dp.side="),
])
def test_bad_federate_input_exits_1_and_writes_nothing(tmp_path, capsys, args, message):
    from pipelines.federate import main

    code = main(["data.count=240", "data.image_size=16", f"runs_root={tmp_path / 'runs'}",
                 *args])
    assert code == 1
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("runs/*"))


def test_fedadam_steps_trained_weights_and_averages_batchnorm_statistics():
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    from tfkarpa.config import FederatedConfig
    from tfkarpa.tasks.federate import server

    kernel, variance = np.zeros(3, np.float32), np.full(3, 0.01, np.float32)
    fed = FederatedConfig(algorithm="fedadam", server_lr=0.1, fraction=1.0)
    strategy = server.make_strategy(fed, 2, [kernel, variance], lambda r, w: (0.0, {}),
                                    lambda *a: None, statistics=frozenset({1})).inner

    def reply(k, v, n):
        return None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(
            [np.full(3, k, np.float32), np.full(3, v, np.float32)]), n, {})

    new, _ = strategy.aggregate_fit(1, [reply(0.5, 0.012, 30), reply(0.3, 0.006, 10)], [])
    k, v = parameters_to_ndarrays(new)
    assert k.dtype == v.dtype == np.float32  # Flower's own step would send float64 down
    np.testing.assert_allclose(v, (0.012 * 30 + 0.006 * 10) / 40, rtol=1e-6)  # averaged
    # The trained weight took Adam's first step toward the clients' mean (Reddi et al. 2021),
    # worked by hand: delta = (0.5 * 30 + 0.3 * 10) / 40 = 0.45, m = 0.1 * delta = 0.045,
    # v = 0.01 * delta^2 = 0.002025, and Flower's bias correction at t = round + 1 = 2 makes
    # the rate 0.1 * sqrt(1 - 0.99^2) / (1 - 0.9^2) = 0.074246: the step is
    # 0.074246 * 0.045 / (sqrt(v) + tau = 0.046) = 0.072632.
    np.testing.assert_allclose(k, 0.072632, rtol=1e-4)


def test_fedprox_adds_mu_over_two_times_the_squared_drift_to_the_local_loss(monkeypatch):
    """LocalTrainer's proximal term is Li et al. 2020's, mu/2 ||w - w_global||^2: three SGD steps
    of a linear model under MSE land where NumPy's hand-written gradient
    (2/B) X^T (Xw - y) + mu (w - w_global) takes them, the loss Keras reports includes the
    term's value, larger mu keeps the weights nearer the global ones, and once the fit is over
    the term is 0 (the server's evaluations see the plain loss)."""
    import tensorflow as tf

    from tfkarpa import config
    from tfkarpa.tasks.federate import client

    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3)).astype(np.float32)
    y = (x @ [[1.0], [-2.0], [0.5]] + 0.1).astype(np.float32)
    w_global = np.array([[0.5], [-0.2], [0.1]], np.float32)
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)  # 3 steps, in order
    monkeypatch.setattr(client, "pipeline", SimpleNamespace(make_dataset=lambda *a, **k: batches))
    inputs = tf.keras.Input((3,))
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(1, use_bias=False)(inputs))
    lr = 0.1
    model.compile(tf.keras.optimizers.SGD(lr), loss="mse", metrics=["accuracy"])
    cfg = config.build(overrides=["federated.algorithm=fedprox", "federated.local_epochs=1"])
    trainer = client.LocalTrainer(cfg, model, num_classes=2, steps_per_epoch=3)

    def by_hand(mu):
        w, losses = w_global.astype(np.float64), []
        for b in range(3):
            xb, yb = x[4 * b:4 * b + 4], y[4 * b:4 * b + 4]
            losses.append(np.mean((xb @ w - yb) ** 2) + mu / 2 * np.sum((w - w_global) ** 2))
            w = w - lr * (2 / 4 * xb.T @ (xb @ w - yb) + mu * (w - w_global))
        return w, np.mean(losses)

    drift = {}
    for mu in (0.0, 4.0):
        (w,), metrics = trainer.fit([w_global], None, client=0, server_round=1, mu=mu)
        expected, loss = by_hand(mu)
        np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)
        assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
        drift[mu] = np.linalg.norm(w - w_global)
        assert float(trainer.mu) == 0.0 and float(tf.add_n(model.losses)) == 0.0
    # By hand, step 2 on: each step pulls the drift back by lr * mu = 40%.
    assert drift[4.0] < 0.8 * drift[0.0]


class _Replier:
    """LocalTrainer's stand-in for the aggregation tests: client i answers the weights it was
    sent plus updates[i], training on nothing, and records the proximal mu it was sent."""

    def __init__(self, fed, updates):
        self.cfg = SimpleNamespace(federated=fed)
        self.updates, self.mus = updates, []

    def fit(self, weights, shard, client, server_round, mu=0.0):
        self.mus.append(mu)
        return [w + u for w, u in zip(weights, self.updates[client], strict=True)], {
            "loss": 0.0, "accuracy": 1.0}


def _one_round(fed, initial, updates, sizes):
    """The global weights after one round of tfkarpa's server (make_strategy, run_rounds) and its
    client app (ShardClient and Flower's DP and SecAgg+ mods) over the in-process grid, client i
    holding sizes[i] examples; and the stand-in trainer."""
    from tfkarpa.tasks.federate import server
    from tfkarpa.tasks.federate.client import client_app
    from tfkarpa.tasks.federate.simulation import InProcessGrid

    trainer = _Replier(fed, updates)
    shards = [SimpleNamespace(num_examples=n) for n in sizes]
    grid = InProcessGrid(client_app(trainer, shards), len(sizes))
    new = []
    strategy = server.make_strategy(fed, len(sizes), initial,
                                    lambda r, w: (new.append(w), (0.0, {}))[1], lambda *a: None)
    server.run_rounds(grid, strategy, [w.copy() for w in initial], 1, 1, fed, len(sizes))
    assert len(new) == 1, "the round was skipped"
    return new[0], trainer


def _weights(rng, scale=0.1):
    return [(rng.normal(size=s) * scale).astype(np.float32) for s in [(40, 25), (25,), (3, 3, 2)]]


@pytest.mark.parametrize("algorithm, mu", [("fedprox", 0.3), ("fedavg", 0.0)])
def test_the_servers_proximal_mu_reaches_every_client(algorithm, mu):
    from tfkarpa.config import FederatedConfig

    rng = np.random.default_rng(1)
    initial = _weights(rng)
    zero = [np.zeros_like(w) for w in initial]
    fed = FederatedConfig(clients=3, fraction=1.0, algorithm=algorithm, proximal_mu=0.3)
    _, trainer = _one_round(fed, initial, [zero] * 3, [10, 20, 30])
    assert trainer.mus == [mu] * 3


@pytest.mark.parametrize("side", ["client", "server"])
def test_dp_noise_is_gaussian_with_std_noise_times_clip_over_the_sampled_clients(side):
    """Every client sends the same small update u (norm 0.45, under the clip), so the new global
    weights minus the old, minus u, are the noise alone. Flower's fixed-clipping DP adds
    N(0, (z C / m)^2) to the average of the m sampled updates (McMahan et al. 2018; the std
    privacy.epsilon's noise multiplier z assumes): with z = 1.5, C = 2 and 4 clients sampled
    at fraction 0.5, m = 2 and the std is 1.5 (not 0.75: all 4 clients). (Not u = 0: Flower's
    clipping divides by the update's norm.)"""
    from tfkarpa.config import FederatedConfig, PrivacyConfig

    np.random.seed(0)  # Flower draws its noise from NumPy's global generator
    initial = [np.zeros(150_000, np.float32), np.zeros((250, 200), np.float32)]
    same = [np.full_like(w, 1e-3) for w in initial]  # norm 1e-3 * sqrt(200,000) = 0.45
    fed = FederatedConfig(clients=4, fraction=0.5, dp=PrivacyConfig(clip=2.0, noise=1.5,
                                                                    side=side))
    new, trainer = _one_round(fed, initial, [same] * 4, [10, 20, 30, 40])
    assert len(trainer.mus) == 2  # two clients trained
    noise = np.concatenate([(n - w - 1e-3).ravel() for n, w in zip(new, initial)])
    noise = noise.astype(np.float64)
    std, n = 1.5, noise.size  # 200,000 draws
    # Standard errors: mean std/sqrt(n) = 0.0034; sample std std/sqrt(2n) = 0.16%; a share p
    # of the draws sqrt(p(1-p)/n) = 0.001. Bounds at about 5 of them.
    assert abs(noise.mean()) < 5 * std / math.sqrt(n)
    assert noise.std() == pytest.approx(std, rel=0.008)
    # A Gaussian's mass within 1 and 2 std: erf(1/sqrt(2)) = 0.6827, erf(sqrt(2)) = 0.9545.
    assert np.mean(np.abs(noise) < std) == pytest.approx(0.6827, abs=0.005)
    assert np.mean(np.abs(noise) < 2 * std) == pytest.approx(0.9545, abs=0.0025)


@pytest.mark.parametrize("side, secure", [("client", False), ("server", False), ("client", True)])
@pytest.mark.parametrize("norm", [3.0, 0.5])
def test_dp_clips_each_update_to_the_norm_and_weighs_every_client_the_same(side, secure, norm):
    """Client 0's update of norm 3 C reaches the average of 2 as exactly C / 2 (the sensitivity
    privacy.epsilon's accounting assumes), one of norm C / 2 unclipped as C / 4, whatever the
    shards' sizes (30 and 10 examples here: weighted by them, the update would count 3/4, not
    1/2). Client 1 sends v of norm C / 10, unclipped. With SecAgg+, to its quantization: under
    DP each value is quantized with step 2 * SECAGG_RANGE / 2^24 = 7.6e-6 and weight 1, so the
    average of the two is off by less than that step."""
    from tfkarpa.config import FederatedConfig, PrivacyConfig
    from tfkarpa.tasks.federate.server import SECAGG_RANGE

    clip = 1.0
    rng = np.random.default_rng(2)
    initial = _weights(rng)

    def update(length):
        direction = [rng.normal(size=w.shape) for w in initial]
        scale = length / math.sqrt(sum(np.sum(d ** 2) for d in direction))
        return [(d * scale).astype(np.float32) for d in direction]

    u, v = update(norm * clip), update(0.1 * clip)
    fed = FederatedConfig(clients=2, fraction=1.0, secure=secure,
                          dp=PrivacyConfig(clip=clip, noise=0.0, side=side))
    new, _ = _one_round(fed, initial, [u, v], [30, 10])
    by_u = [n - w - b / 2 for n, w, b in zip(new, initial, v)]  # what client 0 moved
    tolerance = 2 * SECAGG_RANGE / 2**24 if secure else 1e-6
    for got, a in zip(by_u, u, strict=True):
        np.testing.assert_allclose(got, a * min(1.0, clip / norm) / 2, rtol=0, atol=tolerance)
    assert math.sqrt(sum(np.sum(m ** 2) for m in by_u)) == pytest.approx(
        min(norm * clip, clip) / 2, rel=1e-4)


def test_secure_aggregation_gives_the_plain_weighted_average_to_its_quantization():
    """SecAgg+ (Flower's workflow and mod, as tfkarpa configures them) against NumPy's average
    weighted by the shards' sizes. Client i sends each value times r_i = n_i / max_weight (1000,
    without DP) quantized with step d = 2 * SECAGG_RANGE / 2^24 = 7.6e-6, by stochastic
    rounding: off by less than d each; the server divides the masked sum by sum(r_i), so the
    average is off by less than m d / sum(r_i) = 3 * 7.6e-6 / 0.06 = 3.8e-4. Without it, the
    same average to float32 rounding."""
    from tfkarpa.config import FederatedConfig
    from tfkarpa.tasks.federate.server import SECAGG_RANGE

    rng = np.random.default_rng(3)
    initial = _weights(rng)
    updates = [_weights(rng, scale=0.05) for _ in range(3)]
    sizes = [30, 10, 20]
    reference = [sum(n * (w + u[k]).astype(np.float64) for n, u in zip(sizes, updates)) / 60
                 for k, w in enumerate(initial)]
    bound = 3 * (2 * SECAGG_RANGE / 2**24) / (sum(sizes) / 1000)
    for secure in (False, True):
        fed = FederatedConfig(clients=3, fraction=1.0, secure=secure)
        new, _ = _one_round(fed, initial, updates, sizes)
        error = max(np.max(np.abs(n - r)) for n, r in zip(new, reference, strict=True))
        if secure:
            assert 0 < error < bound  # quantized (masked values, not the plain sum), within d
        else:
            assert error < 1e-6
