"""Federated training on Flower: clients keep their shards, a server aggregates their updates.

`partition` shares a training split among clients, `client` trains on one shard (a Flower
ClientApp), `server` aggregates with Flower's strategies and workflows (FedAvg, FedProx,
FedAdam, differential privacy, SecAgg+), `simulation` runs the clients in this process and
`run` makes the whole federation one ordinary classification run.
"""
