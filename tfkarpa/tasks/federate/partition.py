"""Sharing a training split among federated clients: which examples each client keeps.

Pure NumPy on the split's labels, deterministic per seed, so a client process and the server
(or a restarted one) agree on every shard without talking. Three schemes, the usual ones in
federated-learning papers:

- `iid`: a seeded shuffle cut into equal shards.
- `dirichlet:ALPHA`: label skew (Hsu et al. 2019): each class is shared among the clients in
  proportions drawn from Dirichlet(ALPHA). Small ALPHA (0.1-0.5) gives clients a few dominant
  classes; large ALPHA approaches iid.
- `by_class:K`: pathological skew (McMahan et al. 2017): every client holds exactly K classes,
  each class cut evenly among the clients that hold it.
"""

from __future__ import annotations

import numpy as np

from tfkarpa.errors import TfkarpaError

SCHEMES = ("iid", "dirichlet:ALPHA", "by_class:K")
# A Dirichlet draw can leave a client (nearly) empty; it is drawn again, up to this many times,
# until every client holds at least `_min_share` of an even share.
_DRAWS = 100
_MIN_SHARE = 0.1


def parse(spec: str, num_classes: int) -> tuple[str, float]:
    """("iid" | "dirichlet" | "by_class", its parameter) or an error naming the key."""
    kind, _, value = spec.partition(":")
    where = f"config key 'federated.partition': '{spec}'"
    if kind == "iid" and not value:
        return "iid", 0.0
    if kind not in ("dirichlet", "by_class"):
        raise TfkarpaError(f"{where} is not a partition (choose {', '.join(SCHEMES)})")
    try:
        amount = float(value)
    except ValueError:
        raise TfkarpaError(f"{where} needs a number after ':' (e.g. {kind}:"
                           f"{'0.3' if kind == 'dirichlet' else '2'})") from None
    if kind == "dirichlet" and amount <= 0:
        raise TfkarpaError(f"{where}: the Dirichlet concentration must be positive")
    if kind == "by_class" and (amount != int(amount) or not 1 <= amount <= num_classes):
        raise TfkarpaError(f"{where}: K must be a whole number from 1 to the {num_classes} "
                           "classes")
    return kind, amount


def partition(labels: np.ndarray, clients: int, spec: str, seed: int,
              num_classes: int) -> list[np.ndarray]:
    """The sorted example indices of each client's shard; every example in exactly one."""
    kind, amount = parse(spec, num_classes)
    if clients > len(labels):
        raise TfkarpaError(f"config key 'federated.clients': {clients} clients for "
                           f"{len(labels)} training examples; use at most {len(labels)}")
    rng = np.random.default_rng([seed, 7])
    if kind == "iid":
        shards = np.array_split(rng.permutation(len(labels)), clients)
    elif kind == "dirichlet":
        shards = _dirichlet(labels, clients, amount, rng, spec)
    else:
        shards = _by_class(labels, clients, int(amount), rng, num_classes)
    empty = [i for i, s in enumerate(shards) if len(s) == 0]
    if empty:
        raise TfkarpaError(f"config key 'federated.partition': '{spec}' leaves client {empty[0]} "
                           f"without examples ({len(labels)} examples, {clients} clients); use "
                           "fewer clients or a less skewed partition")
    return [np.sort(s) for s in shards]


def _dirichlet(labels, clients, alpha, rng, spec) -> list[np.ndarray]:
    smallest = max(1, int(_MIN_SHARE * len(labels) / clients))
    for _ in range(_DRAWS):
        shards = [[] for _ in range(clients)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha)))[:-1] * len(idx)).astype(int)
            for client, part in enumerate(np.split(idx, cuts)):
                shards[client].extend(part.tolist())
        if min(len(s) for s in shards) >= smallest:
            return [np.array(s, np.int64) for s in shards]
    raise TfkarpaError(f"config key 'federated.partition': '{spec}' left some client under "
                       f"{smallest} examples in {_DRAWS} draws ({len(labels)} examples, {clients} "
                       "clients); raise alpha or use fewer clients")


def _by_class(labels, clients, k, rng, num_classes) -> list[np.ndarray]:
    # Client c holds classes order[c*k .. c*k+k-1] (mod C): every class is held by about the
    # same number of clients, and each holder gets an equal cut of it.
    order = rng.permutation(num_classes)
    held = [[int(order[(c * k + j) % num_classes]) for j in range(k)] for c in range(clients)]
    holders = {cls: [c for c in range(clients) if cls in held[c]] for cls in range(num_classes)}
    unheld = [cls for cls, who in holders.items() if not who]
    if unheld:
        raise TfkarpaError(f"config key 'federated.partition': by_class:{k} with {clients} clients "
                           f"holds {clients * k} class shares, fewer than the {num_classes} "
                           "classes; raise K or the number of clients")
    shards = [[] for _ in range(clients)]
    for cls, who in holders.items():
        idx = rng.permutation(np.flatnonzero(labels == cls))
        for client, part in zip(who, np.array_split(idx, len(who))):
            shards[client].extend(part.tolist())
    return [np.array(s, np.int64) for s in shards]


def class_counts(labels: np.ndarray, shards: list[np.ndarray], num_classes: int) -> np.ndarray:
    """[clients, classes] example counts."""
    return np.stack([np.bincount(labels[s], minlength=num_classes) for s in shards])
