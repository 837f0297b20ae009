"""python -m pipelines federate [RECIPE] clients=10 rounds=30 fraction=0.5 ... [key=value ...]"""

from __future__ import annotations

import sys

from pipelines import _cli

SUMMARY = ("train a classifier across clients that keep their data (Flower: FedAvg, FedProx, "
           "FedAdam, DP, SecAgg+); the global model is an ordinary run")
DEFAULT_RECIPE = "federated"  # pipelines/recipes/federated.yaml: batch and local epochs
# The short spellings of the `federated.*` config keys.
ALIASES = {"clients": "clients", "rounds": "rounds", "fraction": "fraction",
           "local_epochs": "local_epochs", "min_fit_clients": "min_fit_clients",
           "strategy.fl": "algorithm", "partition": "partition", "proximal_mu": "proximal_mu",
           "server_lr": "server_lr", "secure": "secure", "dp.clip": "dp.clip",
           "dp.noise": "dp.noise", "dp.side": "dp.side", "dp.delta": "dp.delta"}
EPILOG = """federated options (short for the federated.* config keys):
  clients=N              clients the training split is shared among [10]
  rounds=N               rounds: sampled clients train, the server aggregates and evaluates [30]
  fraction=F             share of clients sampled each round, in (0, 1] [0.5]
  local_epochs=N         epochs each sampled client trains on its shard per round [3]
  min_fit_clients=N      a round with fewer replies is skipped (0: all sampled) [0]
  strategy.fl=NAME       fedavg | fedprox (proximal_mu=) | fedadam (server_lr=) [fedavg]
  partition=SPEC         iid | dirichlet:ALPHA | by_class:K [iid]
  dp.clip=C dp.noise=Z   clip each update to norm C and add Gaussian noise (multiplier Z); the
                         (epsilon, delta=dp.delta) spent is reported [off]
  dp.side=client|server  where updates are clipped [client]
  secure=true            SecAgg+ secure aggregation [false]
The same command resumes an interrupted federation from its last finished round.

processes of their own (Flower's deployment engine, on federated.address):
  federate serve [RECIPE] [keys]             the server: a SuperLink and the run's ServerApp
  federate client --id N [RECIPE] [keys]     client N (0 <= N < clients), with the same keys

"""


def aliased(items: list[str]) -> list[str]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        out.append(f"federated.{ALIASES[key]}={value}" if sep and key in ALIASES else item)
    return out


def main(argv: list[str] | None = None) -> int:
    p = _cli.parser("federate", SUMMARY, "[serve | client --id N] [RECIPE | FILE.yaml] "
                    "[clients=N] [rounds=N] [partition=SPEC] [strategy.fl=NAME] [key=value ...]")
    p.epilog = EPILOG + (p.epilog or "")
    p.add_argument("args", nargs="*", help="a recipe name or YAML file, then federated options "
                   "and key=value config overrides")
    p.add_argument("--config", help="a YAML config file (applied after the recipe)")
    p.add_argument("--id", type=int, default=None, help="federate client: this client's shard")
    args = p.parse_intermixed_args(argv)

    def handle(args):
        from tfkarpa.errors import TfkarpaError
        from tfkarpa.tasks.federate import deploy
        from tfkarpa.tasks.federate import run as federate

        overrides, words = _cli.split_overrides(aliased(args.args))
        role = words.pop(0) if words and words[0] in ("serve", "client") else ""
        if (role == "client") != (args.id is not None):
            raise TfkarpaError("--id N goes with `federate client` (the shard it holds), and "
                               "`federate client` needs it")
        if not words and not args.config:
            words = [DEFAULT_RECIPE]
        cfg = _cli.build_config(args, words, overrides)
        if role == "serve":
            return deploy.serve(cfg)
        if role == "client":
            return deploy.client(cfg, args.id)
        return federate.run(cfg, verbose=0 if args.quiet else 2 if not sys.stdout.isatty() else 1)

    return _cli.run_verb("federate", args, handle)


if __name__ == "__main__":
    raise SystemExit(main())
