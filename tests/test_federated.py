"""Federated training on Flower: partitions, privacy accounting, a simulated federation as an
ordinary run (history, export, resume), FedProx/FedAdam, DP with SecAgg+, and bad input."""

import csv
import json

import numpy as np
import pytest

from tests.conftest import tiny_config
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


FED = ["federated.clients=3", "federated.rounds=2", "federated.fraction=1.0",
       "federated.partition=dirichlet:1.0"]


def _fed_config(tmp_path, *extra):
    return tiny_config(tmp_path, *FED, *extra)  # its epochs=2 give way to rounds


@pytest.fixture(scope="module")
def federated_run(tmp_path_factory):
    from tfkarpa.tasks.federate import run as federate

    tmp = tmp_path_factory.mktemp("fed")
    return federate.run(_fed_config(tmp), verbose=0), tmp


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


def test_a_stopped_federation_resumes_from_its_last_round(tmp_path, monkeypatch):
    from tfkarpa.tasks.federate import run as federate

    real = federate.RoundBook.evaluate

    def stop_in_round_two(self, server_round, weights):
        if server_round == 2:
            raise KeyboardInterrupt
        return real(self, server_round, weights)

    monkeypatch.setattr(federate.RoundBook, "evaluate", stop_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        federate.run(_fed_config(tmp_path), verbose=0)
    record = json.loads(next(tmp_path.glob("runs/*/checkpoints/round.json")).read_text())
    assert record["round"] == 1
    monkeypatch.setattr(federate.RoundBook, "evaluate", real)
    trained = []
    original_fit = federate.LocalTrainer.fit
    monkeypatch.setattr(federate.LocalTrainer, "fit", lambda self, *a, **k: (
        trained.append(a[3]), original_fit(self, *a, **k))[1])
    result = federate.run(_fed_config(tmp_path), verbose=0)
    assert set(trained) == {2}  # only the missing round trained again
    assert len(result["metrics"]) and result["run_dir"].endswith("-fed")
    assert len(open(f"{result['run_dir']}/history.csv").read().strip().splitlines()) == 3


def test_fedprox_with_dp_and_secure_aggregation_trains_and_reports_epsilon(tmp_path):
    from tfkarpa.tasks.federate import run as federate

    result = federate.run(_fed_config(
        tmp_path, "federated.algorithm=fedprox", "federated.dp.clip=5.0",
        "federated.dp.noise=0.5", "federated.secure=true", "export=false"), verbose=0)
    metrics = result["metrics"]
    assert metrics["epsilon"] == pytest.approx(privacy.epsilon(0.5, 2, 1e-5))
    assert np.isfinite(metrics["test_accuracy"])


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
    (["task=detect"], "federate trains classifiers"),
    (["dp.noise=1.0"], "needs 'federated.dp.clip'"),
    (["client"], "--id N goes with `federate client`"),
    (["client", "--id", "7", "clients=3"], "client --id 7: the federation has 3 clients"),
    (["serve", "federated.address=nowhere"], "'federated.address': 'nowhere' is not HOST:PORT"),
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
    # The trained weight took Adam's first step: about server_lr toward the clients' mean.
    assert 0.05 < float(k[0]) < 0.35
