"""The (epsilon, delta) that Gaussian-noised federated rounds spend, by Renyi DP accounting.

Flower's fixed-clipping DP wrappers clip every client's update to `clip` and add Gaussian noise
of std `noise * clip / m` to the average of the m sampled updates: each round is a Gaussian
mechanism with noise multiplier `noise` on one client's contribution (user-level DP). Its Renyi
DP at order a is a / (2 noise^2) (Mironov 2017), rounds add up, and the conversion to
(epsilon, delta) is Balle et al. 2020's (as Google's dp-accounting does).

Written here rather than taken from Flower's accountant: that one needs `dp-accounting`, whose
pin (attrs < 24) would downgrade attrs beside the stack. Sampling amplification is not claimed
(Flower samples a fixed number of clients without replacement, not Poisson), so the figure is
an upper bound, the same as Flower's `no-amplification` accounting; a test checks it against
values computed with dp-accounting 0.6.0.
"""

from __future__ import annotations

import math

import numpy as np

# Orders from just above 1 to 1024; the bound is minimised over them.
_ORDERS = np.concatenate([1.0 + np.geomspace(1e-3, 10.0, 400), np.linspace(11.5, 1024.0, 800)])


def epsilon(noise: float, rounds: int, delta: float) -> float:
    """Epsilon after `rounds` Gaussian releases with multiplier `noise` (inf without noise)."""
    if noise <= 0:
        return math.inf
    if rounds <= 0:
        return 0.0
    a = _ORDERS
    rdp = rounds * a / (2.0 * noise**2)
    eps = rdp + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
    return float(max(0.0, eps.min()))
